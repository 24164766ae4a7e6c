"""Every config under configs/ composes, and its `_target_` instantiates on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from geosteer.data.tasks import load_task
from geosteer.pipeline.common import CONFIG_DIR
from geosteer.pipeline.train import selected_geometries
from tests.conftest import make_cfg

GROUPS = ["model", "lm", "extract", "geometry", "trainer", "logger", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_config_composes_and_instantiates(tmp_path, group, option):
    cfg = make_cfg(tmp_path, f"{group}={option}")
    node = cfg[group] if group != "debug" else cfg
    if group == "trainer":
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("a GPU trainer needs CUDA")
        trainer = instantiate(cfg.trainer, logger=False)
        assert trainer.max_steps == -1
    elif group == "logger" and node.get("_target_"):
        logger = instantiate(node, name="compose-test")
        assert logger.save_dir is not None
    elif group == "geometry":
        assert list(selected_geometries(cfg)) == [option]
    elif group == "model":
        assert isinstance(node.layer, int) and node.pretrained
        assert cfg.targets.phate.knn == (15 if option == "task_lm" else 5), "docs/method.md's knn = 5 except the embedded LM"
    assert [load_task(t, CONFIG_DIR / "task") for t in cfg.tasks]


def test_help_lists_stages_and_knobs():
    out = subprocess.run([sys.executable, "-m", "geosteer.pipeline", "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("stage=", "lm", "extract", "train", "model.layer", "tasks=", "geometry=", "Config groups", "trainer:"):
        assert word in out
    knobs = out.split("Main knobs:")[1]
    for group in ("model", "geometry", "method"):  # every option of the groups a user picks from is named
        assert not (missing := [p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if p.stem not in knobs]), missing


def test_every_sweep_syntax_of_a_config_group_is_read_as_hydras_sweeper_reads_it():
    """`a,b`, `choice(a,b)` and `glob(...)` over a group's options pick its files; a name no file has is refused by
    name, and a glob that matches none is refused."""
    from geosteer.pipeline.cli import sweep_jobs, unknown_choices

    tasks = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
    for arg in ("task=weekdays,months", "task=choice(weekdays,months)", "task=glob(week*)", "geometry=[gaga_out,bridge]",
                "method=choice([linear],[caa,dual])", "model=null"):  # fmt: skip
        assert unknown_choices([arg]) == [], arg
    assert sweep_jobs(["task=choice(weekdays,months)", "seed=0,1"]) == [
        ["task=weekdays", "seed=0"], ["task=weekdays", "seed=1"], ["task=months", "seed=0"], ["task=months", "seed=1"]
    ]  # fmt: skip
    assert [job[0] for job in sweep_jobs(["task=glob(*)"])] == [f"task={t}" for t in tasks]
    assert unknown_choices(["method=choice([linear],[caa,nosuch])"]) == [
        f"method=nosuch is unknown; method takes one of {sorted(p.stem for p in (CONFIG_DIR / 'method').glob('*.yaml'))} "
        f"(configs/method/*.yaml)"
    ]
    assert unknown_choices(["task=glob(zz*)"]) == [f"task=glob(zz*) picks none of {tasks} (configs/task/*.yaml); give a "
                                                   f"pattern that matches one"]  # fmt: skip


def test_a_key_added_with_plus_is_taken_only_where_something_reads_it(tmp_path):
    """`+`/`++` keys: the Trainer's and the logger's keywords, the optional settings and `++` of a held setting pass;
    any other added key (nothing would read it) is refused by name."""
    from geosteer.pipeline.cli import precheck

    run = [f"paths.outputs={tmp_path}", "stage=train"]
    for arg in ("++steer.alpha=0.5", "+trainer.detect_anomaly=false", "+geometry.gaga_out.monitor=val/loss",
                "++eval.carriers=3"):  # fmt: skip
        assert precheck([*run, arg]) == [], arg
    for arg, named in (("++steer.alpah=0.5", "+steer.alpah"), ("+geometry.innsteer.activation=silu", "+geometry.innsteer.activation"),
                       ("+geometry.gaga_out.knn=3", "+geometry.gaga_out.knn"), ("+eval.foo=1", "+eval.foo"),
                       ("+geometry.gaga_outt.monitor=val/loss", "+geometry.gaga_outt.monitor: geometry.gaga_outt is not")):  # fmt: skip
        (error,) = precheck([*run, arg])
        assert error.startswith(named if ": " in named else f"{named} adds a setting that nothing reads"), error
