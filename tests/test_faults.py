"""Faults: `kill -9` at a seeded random point of extract, targets and train, then the same command again.

The re-run must give what an uninterrupted run gives (the same store, the same targets,
training continued from `last.ckpt` to the same weights), and after the kill no file
may be readable as complete unless it is.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from geosteer.data.store import ActivationStore, StoreError
from geosteer.pipeline import extract, targets, train
from geosteer.pipeline.products import RunLayout
from tests.conftest import make_cfg

ROOT = Path(__file__).resolve().parents[1]


def kill_point(stage: str) -> np.random.Generator:
    """The kill points are random, and the same on every run, whichever tests run; each stage has its own."""
    return np.random.default_rng([2026, *stage.encode()])  # the whole name: "targets" and "train" share a letter


GEOMETRY = ["geometry=[gaga_out]", "geometry.gaga_out.max_epochs=12", "geometry.gaga_out.patience=100",
            "geometry.gaga_out.hidden=[16]", "geometry.gaga_out.batch_size=64",
            "geometry.gaga_out.min_steps_per_epoch=6"]  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_lm_dir):
    """An uninterrupted run of extract, targets and train, and the overrides that made it."""
    root = tmp_path_factory.mktemp("faults")
    args = [f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1", "tasks=[weekdays,months]",
            "extract.chunk_size=16", "extract.batch_size=2", "logger=none", *GEOMETRY]  # fmt: skip
    cfg = make_cfg(root, "run_name=clean", *args)
    for stage in (extract, targets, train):
        stage.run(cfg)
    return root, args


def kill_when(command: list[str], reached: Callable[[], bool], timeout: float = 300) -> None:
    """Start `command`, and SIGKILL its whole process group the moment `reached()` holds."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not reached():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the kill point was never reached")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def command(root: Path, args: list[str], stage: str) -> list[str]:
    """`pipeline stage=<stage>` in the run folder `faulty-<stage>` beside the clean run."""
    return [sys.executable, "-m", "geosteer.pipeline", f"paths.outputs={root}", f"run_name=faulty-{stage}", f"stage={stage}",
            *args]  # fmt: skip


def rerun(root: Path, args: list[str], stage: str) -> str:
    """The same command again, to the end; what it printed."""
    done = subprocess.run(command(root, args, stage), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def same_h5(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names = []
        fa.visit(names.append)
        assert names == [n for n in names if n in fb] and len(names) > 0
        for name in names:
            if isinstance(fa[name], h5py.Dataset):
                np.testing.assert_array_equal(fa[name][()], fb[name][()], err_msg=name)


def copy_products(root: Path, run: str, *products: str) -> None:
    for product in products:
        shutil.copytree(root / "clean" / product, root / run / product, symlinks=True)


def test_extract_killed_mid_way_resumes_to_the_same_store(clean):
    root, args = clean
    out = root / "faulty-extract" / "extract"
    k = int(kill_point("extract").integers(2, 30))  # of the 46 chunks (294 + 420 prompts in chunks of 16)
    kill_when(command(root, args, "extract"), lambda: len(list(out.glob(".partial-*/*/chunk_*.npz"))) >= k)
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(RunLayout(out.parent).store)  # nothing half-written reads as complete
    assert not (out / "stage.json").exists()
    rerun(root, args, "extract")
    same_h5(RunLayout(root / "clean").store, RunLayout(out.parent).store)
    assert not list(out.glob(".*")), "chunks and temporary files are gone once the store is complete"


def test_targets_killed_mid_way_resume_to_the_same_targets(clean):
    root, args = clean
    copy_products(root, "faulty-targets", "extract")
    out = root / "faulty-targets" / "targets"
    # Kill while the first task's file is being written, or after it is in place.
    point = kill_point("targets").choice(["writing", "written"])
    where = ".weekdays.h5.*.tmp" if point == "writing" else "weekdays.h5"  # a temporary name carries the writer's PID
    kill_when(command(root, args, "targets"), lambda: any(out.glob(where)))
    for done in out.glob("*.h5"):
        assert done.name == "weekdays.h5", f"{done.name} appeared before it was complete"
        same_h5(root / "clean" / "targets" / done.name, done)  # what is readable is whole
    rerun(root, args, "targets")
    for task in ("weekdays", "months"):
        same_h5(root / "clean" / "targets" / f"{task}.h5", out / f"{task}.h5")


def test_train_killed_mid_way_continues_from_last_ckpt_to_the_same_weights(clean):
    root, args = clean
    copy_products(root, "faulty-train", "extract", "targets")
    geometry = root / "faulty-train" / "geometry" / "weekdays"
    epochs = int(kill_point("train").integers(2, 8))  # of 12
    seen = {"mtime": None, "saves": 0}

    def saved_epochs() -> bool:  # last.ckpt is rewritten at the end of every epoch
        for last in geometry.glob(".gaga_out.partial-*/checkpoints/last.ckpt"):
            mtime = last.stat().st_mtime_ns
            if mtime != seen["mtime"]:
                seen["mtime"], seen["saves"] = mtime, seen["saves"] + 1
        return seen["saves"] >= epochs

    kill_when(command(root, args, "train"), saved_epochs)
    assert not (geometry / "gaga_out").exists(), "no export before training has finished"
    assert "resuming weekdays/gaga_out from" in rerun(root, args, "train")
    for task in ("weekdays", "months"):
        a, b = (
            load_file(r / "geometry" / task / "gaga_out" / "model.safetensors") for r in (root / "clean", root / "faulty-train")
        )
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), task


@pytest.mark.parametrize(("every", "crash"), [(3, 5), (5, 7)], ids=["mid-epoch", "on-the-epoch-end"])
def test_an_lm_training_that_crashed_resumes_to_the_same_weights(tmp_path, every, crash):
    """The task LM's checkpoints keep where its draws stand (the sampler's epoch, the batches done, torch's
    generator), so a training that crashed resumes from its last checkpoint, taken mid-epoch or on an epoch's last
    batch (an epoch is 5 steps), crosses into the next epoch, and ends on the uninterrupted weights after as many
    steps."""
    import lightning as L

    from geosteer.pipeline import lm

    class Crash(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == 2:
                time.sleep(3)  # a slow first part, which the training's seconds must count
            if trainer.global_step == crash:  # the last.ckpt of step `every` is on disk by now
                raise RuntimeError("simulated crash")

    small = ["model.embedded=true", "tasks=[weekdays]", "logger=none", "trainer.log_every_n_steps=1", "lm.hidden_size=32", "lm.num_layers=2",
             "lm.num_heads=2", "lm.intermediate_size=64", "lm.batch_size=64", "lm.max_steps=9", f"lm.checkpoint_every={every}",
             "lm.check_every=0", "lm.min_accuracy=0", "lm.min_swap_rate=0"]  # fmt: skip
    whole = make_cfg(tmp_path, "run_name=whole", *small)
    crashed = make_cfg(tmp_path, "run_name=crashed", *small, "logger=csv")  # its log continues where it stopped
    lm.run(whole)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lm.run(crashed, callbacks=[Crash()])
    (last,) = (tmp_path / "crashed").glob(".lm.partial-*/checkpoints/last.ckpt")
    first_part = torch.load(last, weights_only=True)["geosteer_seconds"]
    assert first_part >= 3
    result = lm.run(crashed)
    assert result["steps"] == 9
    a, b = (load_file(tmp_path / name / "lm" / "model.safetensors") for name in ("whole", "crashed"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert result["train_seconds"] >= round(first_part, 1), "the seconds before the crash count"
    (version,) = (tmp_path / "crashed" / "csv" / "lm").iterdir()  # one log: the resumed training's is the crashed one's
    with (version / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == sorted(set(steps)) and steps, "each step logged once: the rows after the checkpoint are not doubled"
    assert rows[-1]["lm/accuracy_weekdays"] and int(rows[-1]["step"]) == 9, "the final measure at the last step"


class CrashAt(L.Callback):
    """Raises after training step `step` (at module level: spawned DDP workers unpickle it)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize(("every", "crash"), [(2, 3), (3, 4)], ids=["mid-epoch", "on-the-epoch-end"])
def test_an_lm_training_under_spawned_ddp_that_crashed_resumes_to_the_same_weights(tmp_path, every, crash):
    """Two spawned processes, each an epoch of 3 batches (every other row): resumed from rank 0's checkpoint, each
    takes up its own rows where it stopped, and the training ends on the uninterrupted weights after all steps."""
    from geosteer.pipeline import lm
    from geosteer.pipeline.common import StageError

    small = ["model.embedded=true", "tasks=[weekdays]", "logger=none", "lm.hidden_size=32", "lm.num_layers=2",
             "lm.num_heads=2", "lm.intermediate_size=64", "lm.batch_size=64", "lm.max_steps=8",
             f"lm.checkpoint_every={every}", "lm.check_every=0", "lm.min_accuracy=0", "lm.min_swap_rate=0",
             "trainer=ddp_sim"]  # fmt: skip
    lm.run(make_cfg(tmp_path, "run_name=whole", *small))
    crashed = make_cfg(tmp_path, "run_name=crashed", *small)
    with pytest.raises(StageError, match="simulated crash") as refused:
        lm.run(crashed, callbacks=[CrashAt(crash)])
    assert "Traceback" not in str(refused.value), "the worker's error, not its traceback"
    assert lm.run(crashed)["steps"] == 8
    a, b = (load_file(tmp_path / name / "lm" / "model.safetensors") for name in ("whole", "crashed"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("finished", [True, False], ids=["new-one-finished", "new-one-unfinished"])
def test_a_replacement_cut_between_its_two_moves_is_finished_by_the_next_run(clean, caplog, finished):
    """A kill inside `replace_dir`, after the old product moved aside and before the new one moved in, leaves no
    product in place. The next run moves in the new one when it lies complete in its work folder, else puts the old
    one back; either way nothing is trained again. (The state is built by hand: the window is two renames wide.)"""
    root, args = clean
    run = f"cut-{finished}"
    copy_products(root, run, "extract", "targets", "geometry")
    out = root / run / "geometry" / "weekdays" / "gaga_out"
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    fp = json.loads((out / "stage.json").read_text())["fingerprint"]
    old, work = out.with_name(".gaga_out.replaced"), out.with_name(f".gaga_out.partial-{fp}")
    os.replace(out, old)
    work.mkdir()
    if finished:  # the new product whole in its work folder; the one it replaced was another
        shutil.copytree(old, work / "export")
        (old / "config.json").write_text("{}")
    else:  # the new one cut short before its record was written
        shutil.copytree(old, work / "export", ignore=shutil.ignore_patterns("stage.json"))
    caplog.set_level(logging.INFO)
    train.run(make_cfg(root, f"run_name={run}", *args))
    assert ("moved in the finished one" if finished else "put back the one it replaced") in caplog.text
    assert "geometry weekdays/gaga_out is current" in caplog.text, "trained again"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written
    assert not old.exists() and not work.exists(), "the leftovers of the cut stay"


def interrupted(root: Path, args: list[str], stage: str, run: Path, reached: str) -> str:
    """`pipeline stage=<stage>` in `run`, sent SIGINT once a file matching `reached` is there: it ends with status
    130, the message that says how to resume and no traceback, its lock released; what it printed."""
    proc = subprocess.Popen(command(root, args, stage)[:-1] + [f"run_name={run.name}", f"stage={stage}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(run.glob(reached)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    printed = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, printed[-3000:]
    assert "interrupted" in printed and "re-run the same command to resume" in printed, printed[-3000:]
    assert "Traceback" not in printed and "KeyboardInterrupt" not in printed, printed[-3000:]
    assert not (run / ".lock").exists(), "the lock is released"
    return printed


def test_ctrl_c_ends_in_one_paragraph_releases_the_lock_and_the_same_command_resumes(clean):
    """SIGINT (Ctrl-C) in the middle of extraction: exit status 130, one paragraph that says how to resume, no
    traceback, the run lock released; the same command then finishes the store that an uninterrupted run makes."""
    root, args = clean
    run = root / "faulty-interrupt"
    interrupted(root, args, "extract", run, "extract/.partial-*/**/*.npz")  # inside the stage: its first chunk on disk
    rerun(root, [*args, "run_name=faulty-interrupt"], "extract")
    same_h5(RunLayout(run).store, RunLayout(root / "clean").store)


def test_ctrl_c_inside_a_lightning_fit_ends_as_an_interrupt_not_a_silent_exit(clean):
    """Lightning turns a KeyboardInterrupt inside `fit` into exit(1), which said nothing: geosteer tells it from
    a failure (its SIGINT handler saw it) and ends as any Ctrl-C does, exit status 130 and how to resume."""
    root, args = clean
    run = root / "faulty-interrupt-train"
    shutil.copytree(root / "clean", run, ignore=shutil.ignore_patterns("geometry"))
    interrupted(root, args, "train", run, "geometry/*/.*.partial-*/**/*.ckpt")  # inside fit: an epoch's checkpoint
