"""Scaling out: processes started by torchrun, Hydra sweeps through submitit, and the SLURM launcher config.

(Spawned data-parallel extraction and training, trainer=ddp_sim, are tested in
test_pipeline.py and test_train.py.)
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from safetensors.numpy import load_file

from geosteer.pipeline import cli, extract, targets, train
from geosteer.pipeline.common import CONFIG_DIR, StageError
from geosteer.pipeline.products import RunLayout
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_CPU = ["trainer=ddp_launched", "trainer.accelerator=cpu", "trainer.precision=32-true"]
GEOMETRY = ["geometry=[gaga_out]", "geometry.gaga_out.max_epochs=3", "geometry.gaga_out.hidden=[16]",
            "geometry.gaga_out.batch_size=64", "geometry.gaga_out.min_steps_per_epoch=4"]  # fmt: skip


def rows_of(store: Path) -> dict[str, dict[str, np.ndarray]]:
    with h5py.File(store, "r") as f:
        return {t: {n: f[t][n][:] for n in ("h", "q", "top1")} for t in f}


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "geosteer.pipeline", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_torchrun_ranks_extract_and_train_like_one_process_and_like_spawned_ranks(tmp_path, tiny_lm_dir):
    """2 CPU processes from torchrun: the store equals a single process's, the weights equal trainer=ddp_sim's."""
    args = [f"paths.outputs={tmp_path}", f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1",
            "tasks=[weekdays]", "extract.chunk_size=100", "logger=none", *GEOMETRY]  # fmt: skip
    torchrun("stage=extract", "run_name=launched", *args, *TORCHRUN_CPU)
    single = make_cfg(tmp_path, "run_name=single", *args)
    extract.run(single)
    launched, one = (RunLayout(tmp_path / r).store for r in ("launched", "single"))
    with h5py.File(launched, "r") as f:
        assert f.attrs["ranks"] == 2
    a, b = rows_of(launched), rows_of(one)
    assert all(np.array_equal(a[t][n], b[t][n]) for t in b for n in b[t]) and a.keys() == b.keys()

    targets.run(make_cfg(tmp_path, "run_name=launched", *args))
    torchrun("stage=train", "run_name=launched", *args, *TORCHRUN_CPU)
    spawned = make_cfg(tmp_path, "run_name=spawned", *args, "trainer=ddp_sim")
    for product in ("extract", "targets"):
        (tmp_path / "spawned" / product).parent.mkdir(exist_ok=True)
        (tmp_path / "spawned" / product).symlink_to(tmp_path / "launched" / product)
    train.run(spawned)
    x, y = (load_file(tmp_path / r / "geometry" / "weekdays" / "gaga_out" / "model.safetensors")
            for r in ("launched", "spawned"))  # fmt: skip
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_launched_ranks_refuse_the_single_process_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    for stage in ("targets", "eval", "all"):
        with pytest.raises(StageError, match=f"stage={stage} runs in one process, but this is rank 1 of 4"):
            cli.run(make_cfg(tmp_path, f"stage={stage}"))
    monkeypatch.delenv("WORLD_SIZE")  # a shell inside a SLURM allocation of two tasks: the fix is not the command
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(StageError, match=r"rank 0 of 2 processes started by SLURM \(SLURM_NTASKS\).*srun --ntasks=1"):
        cli.run(make_cfg(tmp_path, "stage=targets"))


def test_a_sweep_over_tasks_runs_one_job_each_through_submitit(tmp_path, tiny_lm_dir):
    """`-m task=weekdays,months` with the submitit launcher (local executor: SLURM's code path without SLURM)."""
    args = [f"paths.outputs={tmp_path}", f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1",
            "extract.chunk_size=100", "logger=none"]  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "geosteer.pipeline",
        "-m",
        "hydra/launcher=submitit_local",
        "stage=extract",
        "task=weekdays,months",
        "run_name=sweep-${task.name}",
        f"hydra.sweep.dir={tmp_path}/multirun",
        *args,
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    both = make_cfg(tmp_path, "run_name=both", "tasks=[weekdays,months]", *args[1:])
    extract.run(both)
    together = rows_of(RunLayout(tmp_path / "both").store)
    for task in ("weekdays", "months"):
        alone = rows_of(RunLayout(tmp_path / f"sweep-{task}").store)
        assert list(alone) == [task]
        assert all(np.array_equal(alone[task][n], together[task][n]) for n in together[task])


def test_the_slurm_launcher_asks_for_one_task_per_device_on_each_node(tmp_path):
    overrides = ["hydra/launcher=slurm", "trainer=ddp_launched", "trainer.devices=4", "trainer.num_nodes=2",
                 "stage=train", "hydra.launcher.partition=gpu"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", [f"paths.outputs={tmp_path}", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.name == "geosteer-train" and launcher.max_num_timeout > 0
    module, cls = launcher._target_.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), cls), "the submitit launcher plugin is installed"
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2
