"""The bad-input catalogue (docs/troubleshooting.md): every case goes through the `pipeline` command.

Each case starts from a finished run (store, targets, one exported geometry), spoils
one thing or passes one bad override, and must end with exit code 1, one error
paragraph that names the bad value and the fix (no traceback), and every file that
existed before byte for byte intact.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import pathlib
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import yaml

from geosteer.models.gaga import GAGA
from geosteer.models.lm import load_causal_lm
from geosteer.pipeline import cli, extract, targets, train
from geosteer.pipeline.products import RunLayout
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


def wrong_layer(run: Path, _scratch: Path, _args: list[str]):
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
    cfg = make_cfg(run.parent, f"run_name={run.name}", *args, "geometry.gaga_out.max_epochs=3", "overwrite=true")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(cfg, callbacks=[CrashAfterSecondEpoch()])
    (last,) = (run / "geometry" / "weekdays").glob(".gaga_out.partial-*/checkpoints/last.ckpt")
    torch.save({"state_dict": Evil(scratch / "pwned")}, last)


def no_targets(run: Path, _scratch: Path, _args: list[str]):
    shutil.rmtree(run / "targets")


def empty_task(run: Path, scratch: Path, _args: list[str]):
    task_file(scratch, name="empty", templates=[])


def unknown_value(run: Path, scratch: Path, _args: list[str]):
    task_file(scratch, name="caturdays", values=["Monday", "Tuesday", "Caturday"], numbers=[1, 2], number_words=None)


# (id, how to spoil the run, overrides, what the message must say)
CASES = [
    ("unknown stage", None, ["stage=trian"], r"stage 'trian' is unknown; use one of \['lm', 'extract'"),
    ("unknown task", None, ["stage=extract", "tasks=[weekday]"], r"unknown task 'weekday'.*Known tasks: \["),
    ("unknown task group pick", None, ["stage=extract", "task=weekday"], r"task=weekday is unknown; task takes one of"),
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
        r"dtype 'float8' is not supported; use one of",
    ),
    (
        "missing model folder",
        None,
        ["stage=extract", "model.pretrained=/nonexistent/lm", "overwrite=true"],
        r"model path '/nonexistent/lm' does not exist.*save_pretrained",
    ),
    ("another config's store", None, ["stage=extract", "extract.batch_size=16"], r"made by a different config.*overwrite=true"),
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
    ("bad val_fraction", None, ["stage=targets", "targets.val_fraction=1.5"], r"val_fraction.*1.5"),
    ("corrupted store", corrupt, ["stage=targets"], r"not a readable HDF5 file.*re-run `pipeline stage=extract`"),
    ("truncated store", truncate, ["stage=targets"], r"not a readable HDF5 file.*truncated"),
    ("store of another schema version", old_schema, ["stage=targets"], r"schema_version 99.*overwrite=true"),
    ("NaN activations", nan_rows, ["stage=targets"], r"1 of \d+ rows .* hold NaN or Inf \(first at row 3\)"),
    ("missing shard", drop_shard, ["stage=targets"], r"rank-0-of-1.h5, which is missing.*beside it"),
    ("train before targets", no_targets, ["stage=train"], r"no targets for \['weekdays'\].*stage=targets"),
    ("checkpoint of another width", wrong_width, ["stage=eval", "method=[gaga_out]"], r"trained on d=64 .* store holds d=32"),
    (
        "checkpoint of another layer",
        wrong_layer,
        ["stage=eval", "method=[gaga_out]"],
        r"trained on d=32 activations of layer 0, but the store holds d=32 at layer 1",
    ),
    (
        "checkpoint that is a pickle",
        pickled_export,
        ["stage=eval", "method=[gaga_out]"],
        r"not a GAGA checkpoint that loads safely.*never a pickle",
    ),
    (
        "torn checkpoint config",
        torn_config,
        ["stage=eval", "method=[gaga_out]"],
        r"config.json cannot be read \(JSONDecodeError.*Re-export it",
    ),
    (
        "resume checkpoint that is a pickle",
        pickled_last_ckpt,
        ["stage=train", "geometry.gaga_out.max_epochs=3", "overwrite=true"],
        r"last.ckpt holds pickled objects other than tensors.*never unpickles code.*Delete it",
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
    assert "Traceback" not in printed, printed
    assert re.search(message, printed, re.S), printed
    after = snapshot(run)
    assert {k: after.get(k) for k in before} == before, "a file written before the failed command changed"
    assert not (scratch / "pwned").exists(), "a pickled checkpoint ran code"


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
