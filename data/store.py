"""The activation store: one HDF5 file, one group per task (layout in docs/methods.md).

Extraction writes finished chunks as separate files (each renamed into place
when complete), so a crash loses at most the chunk in progress. Each extraction
rank then gathers its chunks into one shard file, and the store's row arrays
(`h`, `q`, `top1`) are HDF5 virtual datasets over the shards, in rank order: a
reader sees one store, however many processes wrote it. The store is written
to a temporary file and renamed at the end, so a reader never sees a
half-written one; opening it checks that every shard it reads from is there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from geosteer.data.tasks import ConceptSchema, Prompt

SCHEMA_VERSION = 1
ROW_ARRAYS = ("h", "q", "top1")  # arrays produced by the model, chunk by chunk
STR = h5py.string_dtype("utf-8")


class StoreError(ValueError):
    """A store that cannot be read or written, with the fix in the message."""


def temp_path(path: Path) -> Path:
    """This process's temporary name for a file to be renamed to `path`; older ones (of crashed runs) are removed.

    One process writes a run at a time (the run lock), so a temporary file of another process is debris.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`; if that fails, `tmp` is removed and the error names `path` and the fix."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        what = "a folder is in its place: move or delete it" if Path(path).is_dir() else "check that you can write it"
        raise StoreError(f"cannot write {path} ({e.strerror}); {what}, then re-run the same command.") from e


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    put_in_place(tmp, path)


def prompts_digest(folder: Path, task: str, texts: Sequence[str]) -> str:
    """A record of which prompts a chunk or shard in `folder` holds: as the folder's name carries the extraction's
    fingerprint, rows moved between chunks, shards, tasks or configs are caught."""
    return hashlib.sha256(json.dumps([Path(folder).name, task, list(texts)]).encode()).hexdigest()


def rows_digest(folder: Path, task: str, texts: Sequence[str], rows: dict[str, np.ndarray]) -> str:
    """`prompts_digest` extended over the rows' bytes (`ROW_ARRAYS`): rows edited, reordered or swapped after they were
    written are caught too."""
    digest = hashlib.sha256(prompts_digest(folder, task, texts).encode())
    for name in ROW_ARRAYS:
        array = np.ascontiguousarray(rows[name])
        digest.update(f"{name} {array.dtype.str} {array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class ChunkDir:
    """Finished extraction chunks of one store-in-progress, `<task>/chunk_00000.npz`, each recording its prompts."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, task: str, index: int) -> Path:
        return self.root / task / f"chunk_{index:05d}.npz"

    def done(self, task: str, index: int) -> bool:
        return self.path(task, index).is_file()

    def write(self, task: str, index: int, rows: dict[str, np.ndarray], texts: Sequence[str]) -> None:
        """Write the rows of `texts`, chunk `index` of `task`."""
        self.path(task, index).parent.mkdir(parents=True, exist_ok=True)
        _atomic_savez(self.path(task, index), digest=np.array(rows_digest(self.root, task, texts, rows)), **rows)

    def read_task(self, task: str, texts: dict[int, Sequence[str]]) -> dict[str, np.ndarray]:
        """The rows of the chunks `texts` names ({chunk index: its prompt texts}), in order.

        Raises StoreError for a missing or damaged chunk, or one that holds rows of other prompts
        (copied from another task, chunk or config), naming the chunk and the fix.
        """
        if missing := [i for i in texts if not self.done(task, i)]:
            raise StoreError(f"chunks {missing} of task '{task}' are missing from {self.root}; re-run the same "
                             f"command: they are extracted again.")  # fmt: skip
        parts = []
        for i, want in texts.items():
            path = self.path(task, i)
            fix = "delete it and re-run the same command: that chunk is extracted again."
            try:
                part = dict(np.load(path, allow_pickle=False))
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise StoreError(f"the extraction chunk {path} is damaged ({type(e).__name__}); {fix}") from None
            if (
                set(part) != {"digest", *ROW_ARRAYS}
                or any(len(part[k]) != len(want) for k in ROW_ARRAYS)
                or str(part["digest"]) != rows_digest(self.root, task, want, part)
            ):
                raise StoreError(f"the extraction chunk {path} does not hold the rows of chunk {i} of task "
                                 f"'{task}' ({len(want)} prompts): it was changed or copied; {fix}")  # fmt: skip
            parts.append(part)
        return {k: np.concatenate([p[k] for p in parts]) for k in ROW_ARRAYS}


def ensure_space(folder: Path, nbytes: int) -> None:
    """Refuse, before it starts, a write of about `nbytes` that the disk or the file-size limit cannot take.

    HDF5 does not fail cleanly when a write runs out of room (the process can crash in
    its clean-up), so the large HDF5 writes check first. Whatever happens, a torn file
    keeps its temporary name and is never read as complete.

    Raises:
        OSError: ENOSPC (too little free space) or EFBIG (over `ulimit -f`), naming the folder and the sizes.
    """
    need = int(nbytes * 1.05) + (1 << 20)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and need > limit:
        raise OSError(errno.EFBIG, f"a file of about {need / 2**20:.1f} MiB is over this process's file-size limit "
                                   f"of {limit / 2**20:.2f} MiB (ulimit -f)", str(folder))  # fmt: skip
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(errno.ENOSPC, f"a file of about {need / 2**20:.1f} MiB needs more than the "
                                    f"{free / 2**20:.1f} MiB free", str(folder))  # fmt: skip


def write_shard(path: Path, rows: dict[str, dict[str, np.ndarray]], texts: dict[str, Sequence[str]],
                compression: str) -> None:  # fmt: skip
    """One extraction rank's rows, `<task>/{h,q,top1}` for every task it has rows of (of prompts `texts[task]`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(path.parent, sum(a.nbytes for arrays in rows.values() for a in arrays.values()))
    tmp = temp_path(path)
    with h5py.File(tmp, "w") as f:
        for task, arrays in rows.items():
            g = f.create_group(task)
            g.attrs["prompts_digest"] = prompts_digest(path.parent, task, texts[task])
            g.attrs["rows_digest"] = rows_digest(path.parent, task, texts[task], arrays)
            for name, arr in arrays.items():
                g.create_dataset(name, data=arr, chunks=(min(len(arr), 1024), *arr.shape[1:]), **_filters(compression))
    put_in_place(tmp, path)


def read_shards(shards: dict[Path, Sequence[str]], task: str) -> dict[str, np.ndarray]:
    """`task`'s rows stacked over the shards ({shard: the prompt texts it holds of `task`, in order}).

    Raises StoreError for a shard that is missing, unreadable or holds other prompts' rows, with the fix.
    """
    parts = []
    for shard, want in shards.items():
        if not want:  # this rank had no rows of the task
            continue
        fix = "delete it and re-run the same command: it is gathered again from its chunks"
        try:
            with h5py.File(shard, "r") as f:
                g = f.get(task)
                if g is None or g.attrs.get("prompts_digest") != prompts_digest(shard.parent, task, want):
                    raise StoreError(f"the extraction shard {shard} does not hold the rows of task '{task}' it "
                                     f"should ({len(want)} prompts): it was changed or copied; {fix}.")  # fmt: skip
                part, recorded = {k: g[k][()] for k in ROW_ARRAYS}, g.attrs.get("rows_digest")
        except (OSError, KeyError) as e:
            raise StoreError(f"the extraction shard {shard} is missing or damaged ({type(e).__name__}); {fix}.") from None
        if any(len(a) != len(want) for a in part.values()):
            raise StoreError(f"the extraction shard {shard} holds {len(part['h'])} rows of task '{task}', not "
                             f"{len(want)}; {fix}.")  # fmt: skip
        if recorded != rows_digest(shard.parent, task, want, part):
            raise StoreError(f"the extraction shard {shard} holds rows of task '{task}' other than those written "
                             f"(edited or reordered); {fix}.")  # fmt: skip
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in ROW_ARRAYS}


def virtual_rows(store: Path, shards: Sequence[Path], task: str) -> dict[str, h5py.VirtualLayout]:
    """`task`'s row arrays as virtual layouts that stack the shards in order.

    Shards are referred to by paths relative to the store's folder, which HDF5
    resolves against the store's own location: a store moves with its shards.
    """
    layouts = {}
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(h5py.File(s, "r")) for s in shards}
        holding = {s: f[task] for s, f in files.items() if task in f}  # a rank may have had no rows of a task
        for name in ROW_ARRAYS:
            parts = {s: g[name] for s, g in holding.items()}
            first = next(iter(parts.values()))
            layout = h5py.VirtualLayout(shape=(sum(len(p) for p in parts.values()), *first.shape[1:]), dtype=first.dtype)
            start = 0
            for shard, part in parts.items():
                layout[start : start + len(part)] = h5py.VirtualSource(
                    os.path.relpath(shard, Path(store).parent), part.name, part.shape
                )
                start += len(part)
            layouts[name] = layout
    return layouts


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
    rows: dict[str, np.ndarray | h5py.VirtualLayout],
    compression: str,
    labels: np.ndarray | None = None,
) -> None:
    """Write one task's group: row arrays (arrays, or layouts from `virtual_rows`), prompt metadata, concept schema.

    `label` is each row's class for the stages after extraction (−1: left out of every class); by default
    the answer's index. `answer_label` is always the answer's index.
    """
    n = len(prompts)
    if any(a.shape[0] != n for a in rows.values()):
        raise StoreError(f"task '{schema.task}': {n} prompts but arrays of {[a.shape[0] for a in rows.values()]} rows.")
    g = f.create_group(schema.task)
    filt = _filters(compression)
    for name, arr in rows.items():
        if isinstance(arr, h5py.VirtualLayout):
            g.create_virtual_dataset(name, arr)
        else:
            g.create_dataset(name, data=arr, chunks=(min(n, 1024), *arr.shape[1:]), **filt)
    g.create_dataset("prompt", data=[p.text for p in prompts], dtype=STR, **filt)
    g.create_dataset("entity", data=[p.entity for p in prompts], dtype=STR, **filt)
    g.create_dataset("answer", data=[p.answer for p in prompts], dtype=STR, **filt)
    g.create_dataset("template_id", data=np.array([p.template_id for p in prompts], np.int16), **filt)
    g.create_dataset("number", data=np.array([p.number for p in prompts], np.int16), **filt)
    answers = np.array([p.label for p in prompts], np.int32)
    g.create_dataset("answer_label", data=answers, **filt)
    g.create_dataset("label", data=answers if labels is None else np.asarray(labels, np.int32), **filt)
    g.attrs["K"] = schema.K
    g.attrs["values"] = json.dumps(list(schema.values))
    g.attrs["variant_ids"] = json.dumps([list(v) for v in schema.variant_ids])
    g.attrs["topology"] = task_def["topology"]
    g.attrs["task"] = json.dumps(task_def)


def write_store(path: Path, file_attrs: dict[str, Any], write_groups) -> None:
    """Create the store at `path` atomically: `write_groups(h5py.File)` fills a temporary file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            for k, v in file_attrs.items():
                f.attrs[k] = v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
            write_groups(f)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a task refused while its group was written: no half-written file stays
        raise
    put_in_place(tmp, path)


def made_by(path: Path) -> str | None:
    """The fingerprint a store file records of the config that made it; None when it is unreadable or records none."""
    try:
        with h5py.File(path, "r") as f:
            fp = f.attrs.get("fingerprint")
            return fp.decode() if isinstance(fp, bytes) else (str(fp) if fp is not None else None)
    except OSError:
        return None


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
        self._check_shards()

    def _check_shards(self) -> None:
        """Refuse a store whose virtual rows point at a missing or unreadable shard (HDF5 would read zeros)."""
        sources: dict[str, list[tuple[str, str]]] = {}  # shard file -> (dataset in it, what reads it)
        for task in self.tasks:
            for name in ROW_ARRAYS:
                ds = self.file[task].get(name)
                for source in ds.virtual_sources() if ds is not None and ds.is_virtual else ():
                    sources.setdefault(source.file_name, []).append((source.dset_name, f"{task}/{name}"))
        for file_name, reads in sources.items():
            shard = self.path.parent / file_name
            try:
                with h5py.File(shard, "r") as f:
                    for dset, _ in reads:
                        f[dset]
            except (OSError, KeyError) as e:
                self.file.close()
                raise StoreError(
                    f"{self.path} reads {reads[0][1]} from the shard {shard}, which is missing or unreadable "
                    f"({type(e).__name__}). A store's shards folder must stay beside it (move or copy them "
                    f"together); otherwise re-extract with `pipeline stage=extract overwrite=true`."
                ) from e

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
            raise StoreError(
                f"task '{task}' is not in {self.path}; it holds {self.tasks}. Ask for tasks it holds, or "
                f"extract every task the run needs: `pipeline stage=extract tasks=[...] overwrite=true`."
            )
        return self.file[task]

    def check_task(self, definition: dict[str, Any]) -> None:
        """Refuse a task definition other than the one this store's rows of that task were extracted with."""
        name, group = definition["name"], self.group(definition["name"])  # a task it does not hold: says so
        try:
            stored, asked = json.loads(group.attrs["task"]), json.loads(json.dumps(definition))
        except (KeyError, ValueError) as e:
            raise StoreError(f"{self.path} records no readable definition of task '{name}' ({type(e).__name__}); "
                             f"re-extract it with `pipeline stage=extract overwrite=true`.") from None  # fmt: skip
        if stored != asked:
            keys = sorted(k for k in {*stored, *asked} if stored.get(k) != asked.get(k))
            raise StoreError(
                f"{self.path} holds task '{name}' extracted from another definition of it (they differ in {keys}). "
                f"Re-extract it with `pipeline stage=extract overwrite=true`, or ask for the task as it was extracted "
                f"(its file as it was, without task.* overrides that change {keys})."
            )

    def schema(self, task: str) -> ConceptSchema:
        g = self.group(task)
        ids = tuple(tuple(v) for v in json.loads(g.attrs["variant_ids"]))
        return ConceptSchema(task, tuple(json.loads(g.attrs["values"])), ids)

    def read(self, task: str, names: Sequence[str] = ROW_ARRAYS) -> dict[str, np.ndarray]:
        g = self.group(task)
        return {n: g[n].asstr()[:] if h5py.check_string_dtype(g[n].dtype) else g[n][:] for n in names}
