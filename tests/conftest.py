"""Shared fixtures: composed configs and a tiny randomly initialised Llama saved like any HF model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.tasks import load_task
from models.task_lm import build_task_lm, build_word_tokenizer
from pipeline.common import CONFIG_DIR

TASK_DIR = CONFIG_DIR / "task"


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
