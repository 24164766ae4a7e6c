"""A run's products: where they live (`RunLayout`), the stamp that says which config made each, and how a stage
replaces, refuses or resumes one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from geosteer.models.hub import GeometryMismatch, finite, read_config, strict_json
from geosteer.pipeline.common import SAFE_NAME, StageError, atomic_write_text, log

STAMP = "stage.json"
LOCK = ".lock"
DIGEST_BLOCK = 1 << 22  # bytes read at a time when a product file is hashed


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
    if outer := [p for p in run_dir.parents if holds_products(p)]:
        outer = outer[-1]  # the outermost: the other run's own folder
        free = next(d for n in range(1, 1000) if not (d := outer.parent / f"{run_dir.name}-{n}").exists())
        fix = f"Run it outside any run, under a name not taken there (e.g. paths.outputs={free.parent} run_name={free.name})"
        if is_run(run_dir):  # this run's own products are in there: move them out, to a free name
            fix = (f"Move this run's folder out of it (`mv {run_dir} {free}`) and run it with "
                   f"paths.outputs={free.parent} run_name={free.name}")  # fmt: skip
        raise StageError(
            f"paths.run_dir={cfg.paths.run_dir} is inside {outer}, which holds another run's products: that run's "
            f"stages would count this run's files as theirs, and could remake them. {fix}."
        )
    own = {run_dir / d / STAMP for d in PRODUCT_DIRS} | set(run_dir.glob(f"geometry/*/*/{STAMP}"))
    if cfg.model.get("embedded"):  # the embedded LM, wherever inside the run model.pretrained puts it
        own.add(Path(str(cfg.model.pretrained)).resolve() / STAMP)
    try:
        stamps = sorted(run_dir.rglob(STAMP))
    except FileNotFoundError:  # ranks started together: another one's check made and removed the folder meanwhile
        stamps = []
    if nested := next((s.parent for s in stamps if s not in own and not _at_work(s, run_dir)), None):
        nested = next((p for p in reversed(nested.parents) if p.is_relative_to(run_dir) and p != run_dir and is_run(p)),
                      nested)  # the other run's folder, not one of its products  # fmt: skip
        product = next((run_dir / d for d in (*PRODUCT_DIRS, "geometry") if nested.is_relative_to(run_dir / d)), None)
        where = (f"{product}, which this run's stages replace whole" if product else
                 f"this run's folder {run_dir}, whose stages would count them as theirs")  # fmt: skip
        raise StageError(
            f"{nested} holds a product that is not one of this run's own (a {STAMP} of its own, of another run or "
            f"moved there by hand) inside {where}. Move that folder out of the run (or pick another run_name=... for "
            f"this one)."
        )


def _at_work(stamp: Path, run_dir: Path) -> bool:
    """Whether a stamp lies in a stage's work folder, or in a product being replaced (`replace_dir`'s): both hidden."""
    return any(p.startswith(".") for p in stamp.relative_to(run_dir).parts)


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder holding products (not itself a product)."""
    return not (folder / STAMP).is_file() and holds_products(folder)


PRODUCT_DIRS = ("lm", "extract", "targets", "eval")  # a run's product folders with one stage.json each


def holds_products(folder: Path) -> bool:
    """Whether `folder` is a product (it holds a `stage.json`) or a run folder (one of its products does)."""
    folder = Path(folder)
    return ((folder / STAMP).is_file() or any((folder / d / STAMP).is_file() for d in PRODUCT_DIRS)
            or any(folder.glob(f"geometry/*/*/{STAMP}")))  # fmt: skip


def resolved(obj: Any) -> Any:
    """`obj` with every OmegaConf node in it resolved to plain containers (`${seed}` becomes the seed's value)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: resolved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [resolved(v) for v in obj]
    return obj


class Fingerprint(str):
    """A fingerprint (a str) that also keeps a digest of each setting it hashes, by dotted key, so that a product
    made by another config can name the settings that differ."""

    parts: dict[str, str]


def fingerprint(obj: Any, run_dir: Path | str | None = None) -> str:
    """A short, stable hash of a JSON-able object (the resolved config that makes a product).

    With `run_dir`, paths inside the run folder count relative to it, so a run folder can move or be copied.
    """
    text = json.dumps(resolved(obj), sort_keys=True, default=str)
    if run_dir is not None:
        for form in {str(Path(run_dir).resolve()), str(run_dir)}:
            text = text.replace(json.dumps(form)[1:-1], "<run_dir>")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_fingerprint(facts: dict[str, Any], run_dir: Path | str | None = None) -> Fingerprint:
    """The fingerprint of what a stage's product depends on, keeping a digest of each of its settings (dotted keys)
    for `write_stamp`, so that another config can be told what differs. Write `str(fp)` into HDF5 or checkpoints."""
    plain = resolved(facts)
    fp = Fingerprint(fingerprint(plain, run_dir))
    fp.parts = {key: fingerprint(leaf, run_dir) for key, leaf in _leaves(plain)}
    return fp


def _leaves(obj: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every value of nested dicts that is not itself a non-empty dict."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif key:
        yield key, obj


def differing(recorded: Any, now: Fingerprint) -> str:
    """The settings in which two fingerprints differ, as a clause for a message; "" when a record keeps none."""
    parts = getattr(now, "parts", None)
    if not isinstance(recorded, dict) or not recorded or not parts:
        return ""
    keys = sorted(k for k in {*recorded, *parts} if recorded.get(k) != parts.get(k))
    keys = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]  # an emptied section: its keys say it
    groups = {"": [k for k in keys if k in parts and k in recorded],
              " (recorded, absent now: no longer asked for, or a file it was made from is gone)": [k for k in keys if k not in parts],
              " (not in the record)": [k for k in keys if k not in recorded]}  # fmt: skip
    said = [", ".join(g[:8]) + (f" and {len(g) - 8} more" if len(g) > 8 else "") + why for why, g in groups.items() if g]
    return f"; it differs in {'; '.join(said)}" if keys else ""


def warn_unapplied(product_dir: Path, facts: dict[str, Any], what: str, fix: str, run_dir: Path | None = None) -> None:
    """Warn when a product's record says it was made with other settings of the sections in `facts` (e.g.
    `{"extract": ...}`) than the config's: `what` uses the product as it is, so those settings of the config do
    nothing here. Silent for a product without a record (copied, shipped) and for the same settings."""
    try:
        recorded = (read_stamp(product_dir) or {}).get("parts")
    except StageError:  # a damaged record: the stage that reads the product names it
        return
    if not isinstance(recorded, dict) or not recorded:
        return
    now = stage_fingerprint(facts, run_dir).parts
    keys = sorted(k for k in {*recorded, *now} if k.split(".")[0] in facts and recorded.get(k) != now.get(k))
    if keys:
        log.warning("%s uses %s as it was made, so the config's %s (not what it was made with) are not applied. %s",
                    what, product_dir, ", ".join(keys), fix)  # fmt: skip


def warn_stale_needs(folder: Path, meta: dict[str, Any], what: str) -> None:
    """Warn when an export trained against another (the bridge against its GAGA encoder, `meta.needs`) finds that
    one trained again since: it approximates the old one's geometry. Silent when the other is not there to compare
    (a shipped export; a run folder path in `needs` counts from the export's run, `<run>/geometry/<task>/<name>`)."""
    for role, facts in (meta.get("needs") or {}).items():
        if not isinstance(facts, dict) or not isinstance(facts.get("path"), str) or not facts["path"]:
            continue
        run = Path(folder).resolve().parents  # the export's run, when it lies at <run>/geometry/<task>/<name>
        if not Path(facts["path"]).is_absolute() and len(run) < 3:
            continue
        other = Path(facts["path"]) if Path(facts["path"]).is_absolute() else run[2] / facts["path"]
        try:
            now = (read_config(other).get("meta") or {}).get("fingerprint")
        except ValueError:  # not there, or damaged: a stage that reads it names it
            continue
        if now != facts.get("fingerprint"):
            log.warning("%s uses %s, which was trained against the %s %s of fingerprint %s; that export is now %s (trained "
                        "again since), so %s follows the old one's geometry. Train it again: `pipeline stage=train "
                        "geometry=[%s,%s]`", what, folder, role, other, facts.get("fingerprint"), now, Path(folder).name,
                        facts.get("geometry"), meta.get("geometry"))  # fmt: skip


def file_record(path: Path) -> dict[str, Any]:
    """A file's size and the SHA-256 of its bytes: any truncation, replacement or edit changes it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(DIGEST_BLOCK):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def product_files(product_dir: Path) -> dict[str, dict[str, Any]]:
    """Every finished file of a product folder (hidden work files and the stamp aside), with its record."""
    root = Path(product_dir)
    return {str(p.relative_to(root)): file_record(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != STAMP and not any(part.startswith(".") for part in p.relative_to(root).parts)}  # fmt: skip


def lm_fingerprint(m) -> str | None:
    """What identifies the embedded LM (None for other LMs): its stage=lm product's fingerprint and the SHA-256 of its
    weights, so an LM trained again changes it even under the same config (a resumed training need not end on the
    same weights)."""
    stamp = read_stamp(folder := Path(m["pretrained"])) if m["embedded"] else None
    if stamp is None and m["embedded"] and (folder / "model.safetensors").is_file():
        raise StageError(
            f"the embedded LM at {folder} has no {STAMP}, the record stage=lm writes (deleted, or the LM copied there "
            f"without it), so it cannot be checked against the products made with it. Put its {STAMP} back, or train "
            f"it and make what follows again with `pipeline stage=all overwrite=true` (an LM used as it is: "
            f"model.embedded=false model.pretrained=<its folder outside the run>)."
        )
    if stamp is None:
        return None
    weights = ((stamp.get("files") or {}).get("model.safetensors") or {}).get("sha256")
    return f"{stamp['fingerprint']}-{weights[:16]}" if weights else stamp["fingerprint"]


SMALL_FILE = 1 << 25  # an outside LM's files up to 32 MiB (config, tokenizer) are hashed whole, larger ones sampled
LM_FILE_TYPES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".model", ".txt", ".tiktoken", ".py")


def sampled_digest(path: Path, blocks: int = 64, block: int = 1 << 16) -> str:
    """A SHA-256 of a large file's size and `blocks` blocks spread evenly over it: a few MiB read, whatever its size."""
    size, digest = path.stat().st_size, hashlib.sha256()
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(size - block, 0) * i // (blocks - 1))
            digest.update(f.read(block))
    return f"sampled:{digest.hexdigest()}"


def lm_files(m) -> dict[str, list]:
    """What identifies the files of an LM read from a folder outside the run, as the store records it: each file's
    size and SHA-256, of the whole file when small (config, tokenizer) or of blocks spread over it (weights). Empty for
    the embedded LM (told by `lm_fingerprint`), a GGUF file (checked against its SHA-256 on every load) and a Hub id
    (pinned by its revision)."""
    folder = Path(str(m["pretrained"]))
    if m["embedded"] or m.get("gguf") is not None or not folder.is_dir():
        return {}
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix in LM_FILE_TYPES:
            size = p.stat().st_size
            files[p.name] = [size, file_record(p)["sha256"] if size <= SMALL_FILE else sampled_digest(p)]
    return files


def check_lm_unchanged(m, store: Path, store_attrs: dict[str, Any], model: torch.nn.Module | None = None) -> None:
    """Refuse an LM that is not the one the store at `store` was extracted from (`lm_change`), with the fix."""
    if change := lm_change(m, store_attrs, model):
        raise StageError(
            f"the LM at {m['pretrained']} changed since {store} was extracted from it: {change}. Extract again and "
            f"make what follows with `pipeline stage=all overwrite=true`, or put that LM back."
        )


def lm_change(m, store_attrs: dict[str, Any], model: torch.nn.Module | None = None) -> str | None:
    """How the LM of the model config `m` differs from the one the store records it was extracted from, or None:
    its files (`lm_files`), and with `model` (the LM loaded) a sketch of its weights (`weight_sketch`). A store
    written before it recorded these is taken as it is."""
    from geosteer.models.lm import SKETCH_TOLERANCE, sketch_distance, weight_sketch

    recorded_files, recorded_sketch = (json.loads(store_attrs.get(k) or "null") for k in ("lm_files", "lm_sketch"))
    if isinstance(recorded_files, dict) and (now := lm_files(m)) != recorded_files:
        if not Path(str(m["pretrained"])).is_dir():
            return "its folder is missing (moved, renamed or deleted)"
        kinds = {"added since": sorted(set(now) - set(recorded_files)), "gone": sorted(set(recorded_files) - set(now)),
                 "changed": sorted(k for k in set(now) & set(recorded_files) if now[k] != recorded_files[k])}  # fmt: skip
        hint = "; a file added beside an unchanged LM counts too: move it out" if kinds["added since"] else ""
        return "its files differ (" + "; ".join(f"{kind}: {names}" for kind, names in kinds.items() if names) + hint + ")"
    if model is not None and recorded_sketch is not None:
        distance = sketch_distance(weight_sketch(model), recorded_sketch)
        if distance > SKETCH_TOLERANCE:
            return f"its weights differ from the ones the store was extracted with (weight sketch {distance:.2f} apart)"
    return None


def warn_lm_config(cfg: DictConfig, what: str) -> None:
    """Warn when the config's `lm.*` differ from the settings the embedded LM was trained with: `what` uses the LM as
    it is (only stage=lm trains it)."""
    stamp = read_stamp(Path(cfg.model.pretrained)) if cfg.model.embedded else None
    trained, now = ((stamp or {}).get("result") or {}).get("config"), OmegaConf.to_container(cfg.lm, resolve=True)
    if isinstance(trained, dict) and (differ := {k: (v, now.get(k)) for k, v in trained.items() if now.get(k) != v}):
        log.warning("%s uses the embedded LM at %s as it was trained; the config's lm.* differ in %s (trained, config). "
                    "To train it with this config: `pipeline stage=all overwrite=true`.", what, cfg.model.pretrained,
                    differ)  # fmt: skip


def read_stamp(product_dir: Path) -> dict | None:
    """The record of the config that made a product, None when there is none; StageError when it is damaged."""
    path = Path(product_dir) / STAMP
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
        if not isinstance(stamp, dict) or not isinstance(stamp.get("fingerprint"), str):
            raise ValueError("it holds no fingerprint")
        files = stamp.get("files") or {}
        if not isinstance(files, dict) or any(not _inside(name) for name in files):
            raise ValueError("its file list names files outside its folder")
        if stamp.get("check") != _stamp_check(stamp):
            raise ValueError("it was changed after its stage wrote it")
        return stamp
    except (OSError, ValueError) as e:
        stage = Path(product_dir).name if Path(product_dir).name in ("lm", "extract", "targets", "eval") else "train"
        fix = (f"Make that product again with `pipeline stage={stage} overwrite=true` (and the same overrides), or "
               f"delete {product_dir}.")  # fmt: skip
        if (Path(product_dir) / "config.json").is_file():  # an export: valid without its record
            fix = (f"Delete {path} alone: an export without it is checked by its own digest as it loads (or train "
                   f"it again with `pipeline stage=train overwrite=true` in its run).")  # fmt: skip
        raise StageError(f"{path} is damaged ({type(e).__name__}: {e}), so which config made {product_dir} is "
                         f"unknown. {fix}") from e  # fmt: skip


def _inside(name: Any) -> bool:
    """Whether a recorded file name stays inside its product folder (relative, no '..')."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _stamp_check(stamp: dict) -> str:
    """A hash of a stamp's content, kept in it: a stamp edited by hand (its result, its file list) is not trusted."""
    content = {k: v for k, v in stamp.items() if k != "check"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def in_run(path: Path | str, run_root: Path) -> str:
    """`path` as a run's records name it: `<run>/...` inside the run (true of any copy of it), else as given."""
    where, root = Path(path).resolve(), Path(run_root).resolve()
    return f"<run>/{where.relative_to(root)}" if where.is_relative_to(root) else str(path)


PATH_KEYS = ("path", "dir", "report", "figures")  # a result's entries that name files or folders (or hold such names)


def _paths_mapped(result: Any, move, under: bool = False) -> Any:
    """`result` with `move` applied to every string under a PATH_KEYS key, at any depth."""
    if isinstance(result, dict):
        return {k: _paths_mapped(v, move, under or k in PATH_KEYS) for k, v in result.items()}
    if isinstance(result, list):
        return [_paths_mapped(v, move, under) for v in result]
    return move(result) if under and isinstance(result, str) else result


def write_stamp(product_dir: Path, stage: str, fp: str, result: dict, home: Path | None = None) -> None:
    """Record the config that made a finished product, and every file of it (`product_files`).

    `home`: the folder the product will lie in (default `product_dir`; a product staged elsewhere is moved there).
    The result's files and folders inside it are recorded relative to it, so that a run folder copied or moved
    reports its own paths when its products are found current (`current_result`).
    """
    home = Path(home or product_dir).resolve()

    def relative(value: str) -> str:
        where = Path(value).resolve()
        return str(where.relative_to(home)) if where.is_relative_to(home) else value

    stamp = {"stage": stage, "fingerprint": fp, "files": product_files(product_dir),
             "result": _paths_mapped(result, relative), "paths": "relative to this folder"}  # fmt: skip
    if parts := getattr(fp, "parts", None):  # to name what differs when another config meets this product
        stamp["parts"] = parts
    stamp = finite(json.loads(json.dumps(stamp, default=str)))  # as it reads back, which is what the check is compared with
    stamp["check"] = _stamp_check(stamp)
    atomic_write_text(Path(product_dir) / STAMP, strict_json(stamp, indent=2))


def product_damage(product_dir: Path, stamp: dict) -> list[str]:
    """How the files of a product differ from its stamp's record: missing, other size, other content."""
    files = stamp.get("files")
    if not files:
        return [f"{STAMP} records none of its files (written by an older geosteer)"]
    damage = []
    for name, record in files.items():
        path = Path(product_dir) / name
        if not path.is_file():
            damage.append(f"{name} is missing")
        elif (now := file_record(path)) != record:
            what = "size" if now["size"] != record["size"] else "content"
            damage.append(f"{name} has another {what} than the one written")
    return damage


def refuse_unrecorded(product_dir: Path, what: str, overwrite: bool, keep: str) -> None:
    """Refuse to replace a folder that holds files but no `stage.json` (copied, shipped or kept there by hand):
    its stage would replace it whole. `keep` says how to keep using it elsewhere."""
    if overwrite or (product_dir / STAMP).is_file() or not product_dir.is_dir() or not any(product_dir.iterdir()):
        return
    raise StageError(
        f"{product_dir} holds files but no {STAMP}, the record its stage writes (copied, shipped or kept there by "
        f"hand), and making {what} would replace it whole. Move it elsewhere ({keep}), or pass overwrite=true to "
        f"replace it."
    )


def check_product(product_dir: Path, fix: str) -> None:
    """For a stage that reads a product: refuse it when its files differ from what its stage recorded writing.

    A product without a record (shipped, copied without its `stage.json`) is taken as it is.
    """
    stamp = read_stamp(product_dir)
    if stamp is not None and (damage := product_damage(product_dir, stamp)) and stamp.get("files"):
        raise StageError(f"{product_dir} is not as its stage wrote it: {'; '.join(damage)}. {fix}")


def check_inside(run_dir: Path | str, product_dir: Path, hint: str = "") -> None:
    """Refuse to write a product that would land outside the run folder: through a link placed in the run (on the
    product's path or inside it) or a path setting pointing elsewhere. Other runs' products may still be read."""
    root, product_dir = Path(run_dir).resolve(), Path(product_dir)
    links = [Path(d) / n for d, dirs, files in os.walk(product_dir) for n in dirs + files if (Path(d) / n).is_symlink()]
    for path in [product_dir, *links]:
        if not path.resolve().is_relative_to(root):
            raise StageError(
                f"{path} leads outside the run folder {run_dir} (to {path.resolve()}), and geosteer writes products "
                f"only inside it. {hint or 'Replace the link with a copy of what it points to (cp -rL), or delete it.'}"
            )


def trainer_facts(cfg: DictConfig) -> dict[str, Any]:
    """The trainer settings a trained product depends on, for its fingerprint: all but what it shows while it
    trains (how often it logs, the progress bar, the model summary)."""
    facts = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
             if k not in ("log_every_n_steps", "enable_progress_bar")}  # fmt: skip
    if "enable_model_summary" in facts:  # held at its config value, so that fingerprints made before stay
        facts["enable_model_summary"] = False
    return facts


def current_result(product_dir: Path, fp: str, what: str, overwrite: bool, remove_damaged: bool = True) -> dict | None:
    """The stored result if `product_dir` was made by this config and its files are as written; refuses another
    config's output.

    Returns None when the product must be (re)made: there is none, or this config's is damaged (then, with
    `remove_damaged`, its damaged files are removed, so that nothing reuses them; a stage whose reader checks each
    file's content itself passes False, and a damaged file stays until it is replaced).
    """
    try:
        stamp = read_stamp(product_dir)
    except StageError:
        if not overwrite:
            raise
        stamp = None
    if stamp is not None and stamp["fingerprint"] == fp:
        if not (damage := product_damage(product_dir, stamp)):
            log.info("%s is current (config %s): skipping", what, fp)
            if stamp.get("paths") != "relative to this folder":  # written by an older geosteer: as recorded
                return stamp["result"]
            return _paths_mapped(stamp["result"], lambda value: str(Path(product_dir) / value))
        log.warning("%s was made by this config, but %s: making it again", what, "; ".join(damage))
        for name in (stamp.get("files") or ()) if remove_damaged else ():
            path = Path(product_dir) / name
            if path.is_file() and file_record(path) != stamp["files"][name]:
                path.unlink()
        return None  # the stamp stays until the new one replaces it: the product reads as damaged until then
    if stamp is not None and not overwrite:
        raise StageError(
            f"{what} at {product_dir} was made by a different config or from other inputs ({stamp['fingerprint']}, "
            f"now {fp}{differing(stamp.get('parts'), fp)}). "
            f"Pass overwrite=true to replace it, or pick another run_name=... to keep both."
        )
    return None


def _holder(path: Path) -> dict | None:
    """Who holds a run lock, as it wrote itself into the file; None when the file is unreadable or gone."""
    try:
        holder = json.loads(path.read_text())
        ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and 0 < holder["pid"] < 2**31
        return holder if ok else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run folder: `<run>/.lock` holds the writer's PID, host, start time and command.

    A lock whose process is gone (same host, PID not running) is stale: it is named and taken over. A live one, or
    one of another host, refuses the run, naming its holder.
    """
    path = Path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(["pipeline", *sys.argv[1:]])}  # fmt: skip
    with _held(path.parent):  # one process at a time judges the lock: two taking over a stale one would both hold it
        with os.fdopen(_take(path, run_dir, me), "w") as f:
            json.dump(me, f)
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """An exclusive flock on a folder for a moment (the kernel drops it if the process dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _take(path: Path, run_dir: Path, me: dict) -> int:
    """Create the lock file `path` (its fd), taking over a stale one; StageError naming a live holder."""
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _holder(path)
            if holder is not None and holder.get("host") == me["host"] and not _alive(holder["pid"]):
                log.warning("removing the stale lock %s of process %d (%s), which is no longer running", path,
                            holder["pid"], holder.get("command"))  # fmt: skip
                path.unlink(missing_ok=True)
                continue
            who = (f"process {holder['pid']} on host {holder.get('host')}, since {holder.get('since')} "
                   f"(`{holder.get('command')}`)" if holder else "a process that left no readable record")  # fmt: skip
            raise StageError(
                f"the run folder {run_dir} is in use by {who}: two commands must not write one run. Wait for it to "
                f"end, or pick another run_name=...; if no command is using that run any more, delete {path}."
            ) from None
    return fd


def as_json(obj: Any) -> Any:
    """`obj` as it reads back from JSON (integer keys become strings), to compare with a recorded one."""
    return json.loads(json.dumps(obj))


def lm_source(pretrained: Any, revision: Any) -> str:
    """Where an LM's weights come from, to compare: a local folder as its absolute path, a Hub id at its revision."""
    if not pretrained:
        return ""  # a store written before it recorded its LM's source
    where = str(Path(pretrained).resolve()) if Path(str(pretrained)).exists() else str(pretrained)
    return f"{where}@{revision}" if revision else where


def check_provenance(folder: Path, meta: dict[str, Any], task: dict[str, Any], lm: str, lm_fingerprint: str,
                     layer: int, store: str, split: str, source: str | None = None) -> None:  # fmt: skip
    """Refuse an exported geometry made for another task (or task definition), LM, layer or train/val split.

    `task` is the task definition asked for; `lm`, `lm_fingerprint` (the embedded LM's training, "" for
    other LMs), `layer`, `store` (fingerprint) and `split` (its key: labels, val fraction, seed) those of the
    activations used, so that held-out points are the ones it never trained on. Another store of the same LM, layer
    and task (a shipped geometry, a re-extraction), or an LM outside the run read from elsewhere (`source`,
    `lm_source`: a copy, or another model of the same name), is named in a warning.
    """
    wanted = {"task": task["name"], "lm": lm, "lm_fingerprint": lm_fingerprint, "layer": layer, "split": split}
    found = {k: meta.get(k) for k in wanted} | {"task": (meta.get("task") or {}).get("name")}
    found["lm_fingerprint"] = meta.get("lm_fingerprint", "")
    differ = [f"{k} {found[k]!r} (asked: {wanted[k]!r})" for k in wanted if found[k] != wanted[k]]
    if not differ and as_json(meta.get("task")) != as_json(task):
        keys = sorted(k for k in {*task, *(meta.get("task") or {})} if as_json(meta["task"].get(k)) != as_json(task.get(k)))
        differ = [f"the definition of task {task['name']!r} (it differs in {keys})"]
    if differ:
        raise GeometryMismatch(
            f"{folder} was not trained for this use: {'; '.join(differ)}. Train one for it (`pipeline stage=train`, "
            f"with overwrite=true if asked; a split differs with targets.val_fraction or seed), or point "
            f"eval.geometry_dir at the run whose store it was trained on."
        )
    trained = lm_source(meta.get("lm_pretrained"), meta.get("lm_revision"))
    if source and trained and not lm_fingerprint and trained != source:  # the embedded LM is told by its fingerprint
        log.warning("%s was trained on the LM from %s, and these activations come from the LM at %s (both named %r): "
                    "a copy of one model gives the same results; another model would make them wrong", folder,
                    trained, source, lm)  # fmt: skip
    if meta.get("store") != store:
        log.warning("%s was trained on another activation store (%s) of the same LM, layer and task as this one (%s)",
                    folder, meta.get("store"), store)  # fmt: skip


def drop_leftovers(out: Path, work: Path) -> None:
    """For a current product: remove its own work folder and the copy it replaced, which a crash between the
    product's move into place and the clean-up leaves behind."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.replaced"), ignore_errors=True)


def finish_replace(out: Path, new: Path, fp: str) -> None:
    """Finish a `replace_dir` cut between its two moves (a kill), which leaves no product in place: move in the new
    product when it lies complete in its work folder `new`, made by this config (`fp`); else put back the one it
    was replacing, as it was before the command."""
    old = out.with_name(f".{out.name}.replaced")
    if out.exists() or not (new.is_dir() or old.is_dir()):
        return
    try:
        stamp = read_stamp(new)
    except StageError:
        stamp = None
    whole = stamp is not None and stamp["fingerprint"] == fp and not product_damage(new, stamp)
    src = new if whole else old
    if not src.is_dir():
        return
    try:
        os.replace(src, out)
    except OSError:  # launched DDP: another rank moved it first
        if not out.exists():
            raise
        return
    log.warning("%s was missing, its replacement cut short: %s", out,
                "moved in the finished one from its work folder" if whole else "put back the one it replaced")  # fmt: skip


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an old one only once the new one is complete."""
    old = dst.with_name(f".{dst.name}.replaced")  # hidden: a work folder, never a user's own `<name>.old`
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


class FingerprintCheckpoints(L.Callback):
    """Writes the fingerprint of the product in training into every checkpoint (`resume_checkpoint` requires it),
    and the seconds trained so far, those before a resume included (`trained_seconds`)."""

    def __init__(self, fp: str):
        self.fp = str(fp)  # a plain str: checkpoints load with weights_only=True
        self.started, self.before = time.perf_counter(), 0.0

    def on_load_checkpoint(self, _trainer, _module, checkpoint: dict[str, Any]) -> None:
        self.before = trained_seconds(checkpoint)

    def on_save_checkpoint(self, _trainer, _module, checkpoint: dict[str, Any]) -> None:
        checkpoint["geosteer_fingerprint"] = self.fp
        checkpoint["geosteer_seconds"] = self.before + time.perf_counter() - self.started


def trained_seconds(checkpoint: dict[str, Any] | None) -> float:
    """The seconds of training a checkpoint records (0 for none, or one written before they were recorded)."""
    return float((checkpoint or {}).get("geosteer_seconds", 0.0))


def resume_checkpoint(folder: Path, what: str, system: torch.nn.Module, fp: str, best: bool = False) -> Path | None:
    """`folder/last.ckpt` when it is a checkpoint of `system` written for fingerprint `fp`; None when there is none.

    With `best`, `folder/best.ckpt` (the best epoch so far, read at the end) must be one too. Raises StageError for
    a checkpoint that holds more than tensors (loading it would run pickled code: refused, as `weights_only=True`
    loads always are), that is torn or missing, that another config wrote, or whose weights are not `system`'s.
    """
    last = folder / "last.ckpt"
    if not last.is_file():
        return None
    fix = f"delete the folder {folder.parent} to train {what} from scratch"
    loaded = {}
    for path in (last, folder / "best.ckpt") if best else (last,):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise StageError(f"{path} is missing beside {last}; {fix}.") from None
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise StageError(
                f"{path} holds pickled objects other than tensors (it asks for {found[1] if found else 'a global'}), "
                f"and geosteer never unpickles code. Put back the checkpoint this run wrote, or {fix}."
            ) from e
        except (RuntimeError, EOFError, OSError) as e:
            raise StageError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}.") from e
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise StageError(f"{path} is not a Lightning checkpoint (it has no state_dict); {fix}.")
        if ckpt.get("geosteer_fingerprint") != fp:
            raise StageError(f"{path} was written for another config ({ckpt.get('geosteer_fingerprint')}, this one "
                             f"is {fp}): it was copied there; {fix}.")  # fmt: skip
        ours = {k: tuple(v.shape) for k, v in system.state_dict().items()}
        theirs = {k: tuple(getattr(v, "shape", ())) for k, v in ckpt["state_dict"].items()}
        if ours != theirs:
            diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise StageError(f"{path} holds the weights of another model than {what} (first differences, name and "
                             f"shape: {diff}); {fix}.")  # fmt: skip
        loaded[path] = ckpt
    rehome_checkpoint(last, loaded[last], folder)
    log.info("resuming %s from %s", what, last)
    return last


def rehome_checkpoint(last: Path, ckpt: dict[str, Any], folder: Path) -> None:
    """Point the checkpoint callbacks' state in `last` (loaded: `ckpt`) at `folder`, where the run now is. Lightning restores a
    ModelCheckpoint's best score only from a checkpoint of the same folder: in a moved or copied run the first epoch
    after the resume would otherwise become "best" whatever its loss."""
    here = os.path.realpath(folder)
    states = [s for s in (ckpt.get("callbacks") or {}).values() if isinstance(s, dict) and "dirpath" in s]
    if all(s["dirpath"] == here for s in states):
        return
    moved = lambda p: str(Path(here) / Path(p).name) if p else p  # noqa: E731
    for s in states:
        s["dirpath"] = here
        for key in ("best_model_path", "last_model_path", "kth_best_model_path"):
            s[key] = moved(s.get(key))
        s["best_k_models"] = {moved(k): v for k, v in (s.get("best_k_models") or {}).items()}
    tmp = last.with_name(f".{last.name}.{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, last)


# The folders of a run that stages make and replace whole (a stage's product, Hydra's logs): nothing else may write there
STAGE_FOLDERS = ("lm", "extract", "targets", "geometry", "eval", "steer", "hydra", "multirun")


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
