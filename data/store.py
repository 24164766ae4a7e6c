"""The activation store: one HDF5 file, one group per task (layout in README.md).

Extraction writes finished chunks as separate files (each renamed into place
when complete), so a crash loses at most the chunk in progress; the store is
assembled from the chunks into a temporary file and renamed at the end. A
reader never sees a half-written store.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from data.tasks import ConceptSchema, Prompt

SCHEMA_VERSION = 1
ROW_ARRAYS = ("h", "q", "top1")  # arrays produced by the model, chunk by chunk
STR = h5py.string_dtype("utf-8")


class StoreError(ValueError):
    """A store that cannot be read or written, with the fix in the message."""


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


class ChunkDir:
    """Finished extraction chunks of one store-in-progress, `<task>/chunk_00000.npz`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, task: str, index: int) -> Path:
        return self.root / task / f"chunk_{index:05d}.npz"

    def done(self, task: str, index: int) -> bool:
        return self.path(task, index).is_file()

    def write(self, task: str, index: int, rows: dict[str, np.ndarray]) -> None:
        self.path(task, index).parent.mkdir(parents=True, exist_ok=True)
        _atomic_savez(self.path(task, index), **rows)

    def read_task(self, task: str) -> dict[str, np.ndarray]:
        files = sorted((self.root / task).glob("chunk_*.npz"))
        indices = [int(re.findall(r"\d+", f.stem)[0]) for f in files]
        if indices != list(range(len(files))):
            raise StoreError(f"chunks of task '{task}' in {self.root} are not contiguous: {indices}.")
        parts = [np.load(f, allow_pickle=False) for f in files]
        return {k: np.concatenate([p[k] for p in parts]) for k in ROW_ARRAYS}


def _filters(compression: str) -> dict[str, Any]:
    if compression == "none":
        return {}
    if compression not in ("gzip", "lzf"):
        raise StoreError(f"compression '{compression}' is unknown; use gzip, lzf or none.")
    return {"compression": compression, "shuffle": True}


def write_task_group(
    f: h5py.File,
    schema: ConceptSchema,
    task_def: dict[str, Any],
    prompts: Sequence[Prompt],
    rows: dict[str, np.ndarray],
    compression: str,
) -> None:
    """Write one task's group: row arrays, prompt metadata and the concept schema."""
    n = len(prompts)
    if any(len(a) != n for a in rows.values()):
        raise StoreError(f"task '{schema.task}': {n} prompts but arrays of {[len(a) for a in rows.values()]} rows.")
    g = f.create_group(schema.task)
    filt = _filters(compression)
    for name, arr in rows.items():
        g.create_dataset(name, data=arr, chunks=(min(n, 1024), *arr.shape[1:]), **filt)
    g.create_dataset("prompt", data=[p.text for p in prompts], dtype=STR, **filt)
    g.create_dataset("entity", data=[p.entity for p in prompts], dtype=STR, **filt)
    g.create_dataset("answer", data=[p.answer for p in prompts], dtype=STR, **filt)
    g.create_dataset("template_id", data=np.array([p.template_id for p in prompts], np.int16), **filt)
    g.create_dataset("number", data=np.array([p.number for p in prompts], np.int16), **filt)
    g.create_dataset("label", data=np.array([p.label for p in prompts], np.int32), **filt)
    g.attrs["K"] = schema.K
    g.attrs["values"] = json.dumps(list(schema.values))
    g.attrs["variant_ids"] = json.dumps([list(v) for v in schema.variant_ids])
    g.attrs["topology"] = task_def["topology"]
    g.attrs["task"] = json.dumps(task_def)


def write_store(path: Path, file_attrs: dict[str, Any], write_groups) -> None:
    """Create the store at `path` atomically: `write_groups(h5py.File)` fills a temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        for k, v in file_attrs.items():
            f.attrs[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
        write_groups(f)
    os.replace(tmp, path)


class ActivationStore:
    """Read access to `activations.h5`. Use as a context manager, or call `close()`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"no activation store at {self.path}; run `pipeline stage=extract` first.")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise StoreError(
                f"{self.path} is not a readable HDF5 file ({e}); it may be truncated. "
                f"Delete it and re-run `pipeline stage=extract`."
            ) from e
        version = self.file.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            self.file.close()
            raise StoreError(
                f"{self.path} has schema_version {version}, but this geosteer reads version {SCHEMA_VERSION}. "
                f"Re-extract it with `pipeline stage=extract overwrite=true`, or use the geosteer release that wrote it."
            )

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def tasks(self) -> list[str]:
        return list(self.file.keys())

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.file.attrs)

    def group(self, task: str) -> h5py.Group:
        if task not in self.file:
            raise StoreError(f"task '{task}' is not in {self.path}; it holds {self.tasks}.")
        return self.file[task]

    def schema(self, task: str) -> ConceptSchema:
        g = self.group(task)
        ids = tuple(tuple(v) for v in json.loads(g.attrs["variant_ids"]))
        return ConceptSchema(task, tuple(json.loads(g.attrs["values"])), ids)

    def read(self, task: str, names: Sequence[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        g = self.group(task)
        return {n: g[n].asstr()[:] if h5py.check_string_dtype(g[n].dtype) else g[n][:] for n in names}
