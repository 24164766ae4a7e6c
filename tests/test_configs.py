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
