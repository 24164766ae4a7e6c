"""Shared fixtures: composed configs and a tiny randomly initialised Llama saved like any HF model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.tasks import load_task
from models.task_lm import build_task_lm, build_word_tokenizer
from pipeline.common import CONFIG_DIR

TASK_DIR = CONFIG_DIR / "task"


def encodes_alike_in_a_fresh_process(folder: Path, h: torch.Tensor, z: torch.Tensor, scratch: Path) -> bool:
    """Whether `GAGA.from_pretrained(folder)` in a new Python process, in eval mode, maps h to exactly z."""
    torch.save(h, scratch / "h.pt")
    torch.save(z, scratch / "z.pt")
    script = (
        "import sys, torch; from models.gaga import GAGA; "
        f"m = GAGA.from_pretrained(r'{folder}'); "
        f"h = torch.load(r'{scratch / 'h.pt'}', weights_only=True); "
        f"z = torch.load(r'{scratch / 'z.pt'}', weights_only=True); "
        "sys.exit(0 if torch.equal(m.encode(h), z) and not m.training else 1)"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 0


def make_cfg(tmp_path: Path, *overrides: str):
    """The project's config with outputs under `tmp_path` and no tracking."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.outputs={tmp_path}", "logger=none", *overrides],
        )


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-block Llama with the word tokenizer of weekdays + months, saved with save_pretrained."""
    prompts = [p for name in ("weekdays", "months") for p in load_task(name, TASK_DIR).prompts()]
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts)
    torch.manual_seed(0)
    model = build_task_lm(tokenizer, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_cfg(tmp_path, tiny_lm_dir):
    """Config that extracts weekdays + months from the tiny LM."""
    return lambda *o: make_cfg(
        tmp_path,
        "tasks=[weekdays,months]",
        f"model.pretrained={tiny_lm_dir}",
        "model.embedded=false",
        "model.layer=1",
        "extract.chunk_size=100",
        "extract.batch_size=32",
        *o,
    )
