"""Shared fixtures: composed configs and a tiny randomly initialised Llama saved like any HF model."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from wandb.proto import wandb_internal_pb2

from geosteer.data.tasks import load_task
from geosteer.models.task_lm import build_task_lm, build_word_tokenizer
from geosteer.pipeline import extract, targets
from geosteer.pipeline.common import CONFIG_DIR

TASK_DIR = CONFIG_DIR / "task"


def reloads_alike_in_a_fresh_process(folder: Path, args: tuple[torch.Tensor, ...], out: torch.Tensor, scratch: Path,
                                     method: str = "encode") -> bool:  # fmt: skip
    """Whether `geosteer.load_geometry(folder)` in a new Python process, outside the repository, is in eval mode and
    maps args to exactly out; `method` is the one called ("__call__" for the module itself)."""
    torch.save(list(args), scratch / "args.pt")
    torch.save(out, scratch / "out.pt")
    script = (
        f"import sys, torch; from geosteer import load_geometry; "
        f"m = load_geometry(r'{folder}'); "
        f"args = torch.load(r'{scratch / 'args.pt'}', weights_only=True); "
        f"out = torch.load(r'{scratch / 'out.pt'}', weights_only=True); "
        f"sys.exit(0 if torch.equal(getattr(m, '{method}')(*args), out) and not m.training else 1)"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=scratch).returncode == 0


def run_model_card(folder: Path, **names) -> dict:
    """Run the Python block of an export's model card, with `names` defined (e.g. h); its namespace afterwards."""
    card = (folder / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(folder))
    namespace = dict(names)
    exec(code, namespace)
    return namespace


def wandb_records(run_dir: Path) -> list:
    """Every record of a W&B run's `.wandb` transaction log (LevelDB-style log of protobuf `Record`s)."""
    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos = path.read_bytes(), 32768, 7  # a 7-byte file header, then 32 KiB blocks
    records, payload = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE/LAST sequence
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_history(records: list) -> list[dict]:
    """The logged rows of a run's records, keys joined ("a/b" keys are stored nested)."""
    name = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    return [{name(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]


def make_cfg(tmp_path: Path, *overrides: str):
    """The project's config with outputs under `tmp_path` and no tracking."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"paths.outputs={tmp_path}", "logger=none", *overrides],
        )


def random_weekdays_lm(hidden_size: int, intermediate_size: int):
    """A seeded random 3-block Llama with the weekdays word tokenizer (left padding); its prompts."""
    prompts = load_task("weekdays", TASK_DIR).prompts()
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = build_task_lm(tokenizer, hidden_size=hidden_size, num_layers=3, num_heads=2, intermediate_size=intermediate_size)
    return model.eval(), tokenizer, prompts


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


# ---------------------------------------------------------------- geometry training

SMALL = {"batch_size": 64, "min_steps_per_epoch": 4}  # every geometry
SMALL_BY_NAME = {
    "gaga_out": {"hidden": "[32,16]"},
    "gaga_phate": {"hidden": "[32,16]", "pca_dim": 16},
    "bridge": {"hidden": "[32]", "times": 8, "eval.pairs": 8, "eval.steps": 4},
}


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tiny_lm_dir):
    """Activations and targets of weekdays from the tiny LM, and a config maker for training runs on them."""
    root = tmp_path_factory.mktemp("train")
    tiny = [f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1", "tasks=[weekdays]"]
    base = make_cfg(root, "run_name=base", *tiny)
    extract.run(base)
    targets.run(base)

    def cfg(run_name, *overrides, geometries=("gaga_out",), epochs=3):
        run_dir = root / run_name
        run_dir.mkdir(exist_ok=True)
        for product in ("extract", "targets"):
            if not (run_dir / product).exists():
                (run_dir / product).symlink_to(root / "base" / product)
        small = [f"geometry=[{','.join(geometries)}]"]
        for g in geometries:
            settings = {**SMALL, "max_epochs": epochs, **SMALL_BY_NAME.get(g, {})}
            small += [f"geometry.{g}.{k}={v}" for k, v in settings.items()]
        return make_cfg(root, f"run_name={run_name}", *tiny, *small, *overrides)

    return cfg


class SpoilAt(L.Callback):
    """Calls `spoil(model)` on the system's network, without gradients, before training step `step`."""

    def __init__(self, step: int, spoil):
        self.step, self.spoil = step, spoil

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                self.spoil(pl_module.model)
