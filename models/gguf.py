"""Pretrained LMs shipped inside PyPI distributions as GGUF files, found without importing those packages.

A model config names the distributions and the file (`model.gguf`); `locate_gguf`
returns its path, after joining chunked files into a cache and checking the
SHA-256. transformers then loads it with `from_pretrained(folder, gguf_file=name)`.
The distributions are found through `importlib.metadata`, never by importing them:
their own `__init__` may import runtimes geosteer does not install.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from geosteer.models.lm import ModelLoadError


def cache_dir() -> Path:
    """Where joined GGUF files go: $GEOSTEER_CACHE, else $XDG_CACHE_HOME/geosteer, else ~/.cache/geosteer."""
    if os.environ.get("GEOSTEER_CACHE"):
        return Path(os.environ["GEOSTEER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geosteer"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def packaged_file(distribution: str, suffix: str, install: str) -> Path:
    """The one file of an installed distribution whose path ends with `suffix`.

    Raises:
        ModelLoadError: the distribution is not installed (naming `install`, the command that installs it),
            or holds no such file.
    """
    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the PyPI package '{distribution}' that holds this model is not installed. "
                             f"Install it with `{install}`.") from None  # fmt: skip
    hits = [f for f in dist.files or () if str(f).endswith(suffix)]
    if len(hits) != 1:
        raise ModelLoadError(f"the package '{distribution}' has {len(hits)} files ending in '{suffix}', not one; "
                             f"reinstall it with `{install}`.")  # fmt: skip
    path = Path(dist.locate_file(hits[0]))
    if not path.is_file():
        raise ModelLoadError(f"{path} of package '{distribution}' is missing; reinstall it with `{install}`.")
    return path


def join_parts(parts: Sequence[Path], target: Path, sha256: str, install: str = "pip install --force-reinstall") -> Path:
    """Concatenate `parts` into `target` (atomically) unless it is already there with the right hash."""
    if target.is_file() and sha256_of(target) == sha256:
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        got = sha256_of(tmp)
        if got != sha256:
            raise ModelLoadError(f"joining {[p.name for p in parts]} gave SHA-256 {got}, not the expected {sha256}: "
                                 f"a chunk is damaged. Reinstall the chunk packages (`{install}` after "
                                 f"pip uninstall of them).")  # fmt: skip
        os.replace(tmp, target)
    except OSError as e:
        raise ModelLoadError(f"could not write the joined model file {target} ({e.strerror}). Point GEOSTEER_CACHE "
                             f"at a writable folder with {sum(p.stat().st_size for p in parts) >> 20} MiB free.") from e  # fmt: skip
    finally:
        tmp.unlink(missing_ok=True)
    return target


def locate_gguf(spec) -> Path:
    """The GGUF file a `model.gguf` config names, checked against its SHA-256.

    spec keys: `file` (its name); `packages` (the distributions holding it: one for a whole file,
    several for chunks joined in order, each holding one `<file>.partNN`); `sha256`; `install`
    (the command that installs the packages, for the error message).
    """
    fits = isinstance(spec, Mapping) and isinstance(spec.get("file"), str) and isinstance(spec.get("install"), str)
    if not fits or isinstance(spec.get("packages"), str) or not isinstance(spec.get("packages"), Sequence):
        raise ModelLoadError(
            f"model.gguf={spec!r} does not say where a GGUF file is: it must be a mapping with `packages` (a list), "
            f"`file`, `sha256` and `install`, as in configs/model/smollm2.yaml; or null for a Hugging Face folder or id."
        )
    packages, name, install = list(spec["packages"]), str(spec["file"]), str(spec["install"])
    if len(packages) == 1:
        path = packaged_file(packages[0], name, install)
        expected = spec.get("sha256")
        if expected and sha256_of(path) != expected:
            raise ModelLoadError(f"{path} does not have the SHA-256 {expected} this config pins; "
                                 f"reinstall it with `{install}`.")  # fmt: skip
        return path
    parts = [packaged_file(p, f"{name}.part{i:02d}", install) for i, p in enumerate(packages)]
    return join_parts(parts, cache_dir() / "gguf" / name, str(spec["sha256"]), install)
