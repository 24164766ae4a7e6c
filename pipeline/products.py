"""A run's products: where they live (`RunLayout`), the stamp that says which config made each, and how a stage
replaces, refuses or resumes one."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from geosteer.pipeline.common import SAFE_NAME, StageError, atomic_write_text, log, to_plain

STAMP = "stage.json"


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse a run folder outside `paths.outputs`: every stage writes only under `paths.run_dir`."""
    if not SAFE_NAME.fullmatch(str(cfg.run_name)):
        raise StageError(
            f"run_name={cfg.run_name!r} is not a plain folder name (letters, digits and _.=,+- ; no '/' or leading "
            f"'.'), so its outputs could land outside paths.outputs={cfg.paths.outputs}. Pick a name like run_name=exp1."
        )
    outputs, run_dir = Path(cfg.paths.outputs).resolve(), Path(cfg.paths.run_dir).resolve()
    if not run_dir.is_relative_to(outputs) or run_dir == outputs:
        raise StageError(
            f"paths.run_dir={cfg.paths.run_dir} is not inside paths.outputs={cfg.paths.outputs}; stages write only "
            f"under the run folder. Set paths.outputs to the parent folder you want and choose run_name instead."
        )


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (the config that makes a product)."""
    return hashlib.sha256(json.dumps(to_plain(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stamp(product_dir: Path) -> dict | None:
    path = Path(product_dir) / STAMP
    return json.loads(path.read_text()) if path.is_file() else None


def write_stamp(product_dir: Path, stage: str, fp: str, result: dict) -> None:
    stamp = {"stage": stage, "fingerprint": fp, "result": result}
    atomic_write_text(Path(product_dir) / STAMP, json.dumps(stamp, indent=2, default=str))


def current_result(product_dir: Path, fp: str, what: str, overwrite: bool) -> dict | None:
    """The stored result if `product_dir` was made by this config; refuses another config's output.

    Returns None when the product must be (re)made.
    """
    stamp = read_stamp(product_dir)
    if stamp is not None and stamp["fingerprint"] == fp:
        log.info("%s is current (config %s): skipping", what, fp)
        return stamp["result"]
    if stamp is not None and not overwrite:
        raise StageError(
            f"{what} at {product_dir} was made by a different config ({stamp['fingerprint']}, now {fp}). "
            f"Pass overwrite=true to replace it, or pick another run_name=... to keep both."
        )
    return None


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an old one only once the new one is complete."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def resume_checkpoint(last: Path, what: str) -> Path | None:
    """`last` when it is a checkpoint to resume `what` from, None when there is none.

    Raises StageError for a checkpoint that holds more than tensors (loading it would run
    pickled code: refused, as `weights_only=True` loads always are) or that is torn.
    """
    if not last.is_file():
        return None
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise StageError(
            f"{last} holds pickled objects other than tensors (it asks for {found[1] if found else 'a global'}), "
            f"and geosteer never unpickles code. Delete it to train {what} from scratch, or put back the checkpoint "
            f"this run wrote."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise StageError(f"{last} is damaged ({type(e).__name__}: {e}); delete it to train {what} from scratch.") from e
    log.info("resuming %s from %s", what, last)
    return last


@dataclass(frozen=True)
class RunLayout:
    """Where every product of a run lives, under `paths.run_dir`; the one place that knows the folder layout."""

    root: Path

    @classmethod
    def of(cls, cfg: DictConfig) -> RunLayout:
        return cls(Path(cfg.paths.run_dir))

    @property
    def extract(self) -> Path:
        return self.root / "extract"

    @property
    def store(self) -> Path:
        return self.extract / "activations.h5"

    @property
    def targets(self) -> Path:
        return self.root / "targets"

    def targets_file(self, task: str) -> Path:
        return self.targets / f"{task}.h5"

    @property
    def geometries(self) -> Path:
        return self.root / "geometry"

    def geometry(self, task: str, name: str) -> Path:
        return self.geometries / task / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"
