"""What every shipped geometry shares: strict safetensors + JSON loading, a compatibility check,
and the optional PCA ambient space.

A geometry is an `nn.Module` that also subclasses `ShippedGeometry`. It keeps its
constructor arguments in `config.json` and JSON-able facts (LM, layer, task,
metrics) in `self.meta`; `from_pretrained` never unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import HfApi, PyTorchModelHubMixin, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError

from geosteer.models import arguments
from geosteer.models.geodesics import PCA
from geosteer.models.lm import SKETCH_DIM

UMASK = os.umask(0o022)  # read once (umask can only be read by setting it) and put back at once
os.umask(UMASK)
FILE_MODE = 0o666 & ~UMASK  # the mode open() gives a new file


def finite(obj: Any) -> Any:
    """`obj` (JSON-able) with every NaN or ±Inf number as None: JSON has no such numbers, and strict parsers (a
    browser's, jq's, the Hub's) refuse the bare `NaN` Python's json writes. Readers take None as "no value"."""
    if isinstance(obj, numbers.Real) and not isinstance(obj, numbers.Integral) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def strict_json(obj: Any, **dumps: Any) -> str:
    """`obj` as standard JSON: non-finite numbers written as null (`finite`)."""
    return json.dumps(finite(obj), allow_nan=False, **dumps)


class GeometryMismatch(ValueError):
    """A checkpoint used with activations it was not trained on; the message names both."""


class CheckpointError(ValueError):
    """A geometry folder that cannot be loaded as safetensors + JSON (corrupt, incomplete, or a pickle)."""


class PushError(RuntimeError):
    """A push to the Hub that failed (no connection, no write access); the message names the repo and the fix."""


def read_config(folder: Path) -> dict:
    """An exported geometry's `config.json`, or CheckpointError naming the folder and the fix."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        if not isinstance(config, dict) or not isinstance(config.get("meta") or {}, dict):
            raise ValueError("it holds no settings object with a meta object in it")
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{folder}/config.json cannot be read ({type(e).__name__}: {e}); the export is incomplete or damaged. "
            f"{remedy(folder)}"
        ) from e
    check_meta(Path(folder), config.get("meta") or {})
    return config


def _is_export(config: Path) -> bool:
    """Whether a config.json is a geometry export's (it carries `meta`; an LM's does not)."""
    try:
        return isinstance(meta := json.loads(config.read_text()).get("meta"), dict) and "family" in meta
    except (OSError, ValueError, AttributeError):
        return False


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name on the Hub
HUB_OPTIONS = ("endpoint", "token", "cache_dir", "local_files_only", "force_download")  # snapshot_download's
SHIPPED = ["config.json", "model.safetensors", "README.md", "training.png"]  # what an export ships (not its stage.json)


def remedy(folder: Path) -> str:
    """What to do about a damaged export: download it again when it is a Hub snapshot in the Hugging Face cache
    (`<cache>/models--owner--name/snapshots/<commit>/`), else export or copy it again."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        repo_id = repo.removeprefix("models--").replace("--", "/")
        return (
            f"It is the Hugging Face cache's copy of the Hub repo {repo_id}: download it again with "
            f"load_geometry({repo_id!r}, force_download=True), or delete {folder.parent.parent}."
        )
    return "Re-export it with `pipeline stage=train` (delete the folder first), or copy it again."


def content_digest(folder: Path, leave_out: tuple[str, ...] = ("digest",), config: dict | None = None) -> str:
    """A SHA-256 of an export's config.json (the `meta` keys in `leave_out` aside; `config`: as it will read back)
    and weights: an export checks itself with it."""
    config = read_config(folder) if config is None else json.loads(json.dumps(config))
    config["meta"] = {k: v for k, v in (config.get("meta") or {}).items() if k not in leave_out}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    with open(Path(folder) / "model.safetensors", "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def seal(folder: Path) -> None:
    """Record `content_digest` in the export's `meta.digest`: a config.json or weights changed afterwards (by hand,
    or on the way from the Hub) is refused by `load_geometry`, with or without the run's stage.json beside it."""
    config = finite(read_config(folder))  # standard JSON: a metric that is NaN (no pair to score) is null
    meta = config.get("meta") or {}  # a user's network may have none
    config["meta"] = {**meta, "digest": content_digest(folder, config=config)}
    tmp = Path(folder) / f".config.json.{os.getpid()}.tmp"
    tmp.write_text(strict_json(config, indent=2, sort_keys=True))
    tmp.replace(Path(folder) / "config.json")


def geometry_source(source: str | Path, revision: str | None = None, **hub: Any) -> Path:
    """An export folder: `source` itself when it is one, else the snapshot of the Hub repo `source` (owner/name)
    in the Hugging Face cache, downloaded when it is not there (`HF_HUB_OFFLINE=1` reads the cache only).

    `hub` goes to `snapshot_download` (endpoint, token, cache_dir, local_files_only, ...).
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise TypeError(f"a geometry's source is an export folder's path or a Hub repo id ('owner/name'), not {source!r}.")
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision={revision!r} must be a branch, tag or commit id (a string), or None for main.")
    folder = Path(source)
    if folder.is_file() and folder.name in SHIPPED:  # the export's config.json or weights: the folder is meant
        raise CheckpointError(f"{folder} is a file of an export; give the export's folder, {folder.parent}.")
    if folder.exists() and (revision is not None or hub):  # only the Hub has revisions and options
        raise CheckpointError(f"{folder} is a folder here, which has no revision or Hub options "
                              f"({', '.join(['revision'] * (revision is not None) + sorted(hub))}); leave them out, or "
                              f"give a Hub repo id (owner/name) to download that revision.")  # fmt: skip
    if not folder.exists() and not REPO_ID.fullmatch(str(source)):
        raise CheckpointError(f"{folder} does not exist; give an export's folder (a run's geometry/<task>/<name>) or a "
                              f"Hub repo id (owner/name).")  # fmt: skip
    if folder.is_dir() and not (folder / "config.json").exists():  # a folder above the exports (a task's, a run's, the outputs')
        inner = sorted(str(p.parent.relative_to(folder)) for depth in ("*", "*/*", "*/*/*", "*/*/*/*")
                       for p in folder.glob(f"{depth}/config.json") if _is_export(p))  # fmt: skip
        if inner:
            raise CheckpointError(f"{folder} is not an export but holds {len(inner)}: {inner[:8]}; give one of them, "
                                  f"e.g. {folder / inner[0]}.")  # fmt: skip
        if not (folder / "model.safetensors").exists():  # else an export without its config.json: named as damaged
            raise CheckpointError(f"{folder} is not an export (it holds no config.json) and holds none below it; give "
                                  f"an export's folder (a run's geometry/<task>/<name>) or a Hub repo id (owner/name).")  # fmt: skip
    if folder.exists() or not REPO_ID.fullmatch(str(source)):  # a folder here, whole or not, is never a repo id
        return folder
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=SHIPPED, **hub))
    except (HfHubHTTPError, OSError, ValueError) as e:  # no such repo or revision, no access, offline, a bad id
        if isinstance(e, LocalEntryNotFoundError):
            why = ("it is not in the Hugging Face cache and the Hub cannot be reached (or HF_HUB_OFFLINE=1)",
                   "download it once with the Hub in reach (or copy the export folder here and give its path)")  # fmt: skip
        elif isinstance(e, EntryNotFoundError):
            why = ("it holds no geometry export", "push one with `push_geometry`")
        else:
            why = (f"the Hub answered {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                   "check the repo id and revision, and log in (`hf auth login` or HF_TOKEN) for a private repo")  # fmt: skip
        raise CheckpointError(
            f"{source} is not an export folder here, and as a Hub repo (revision {revision or 'main'}) {why[0]}. "
            f"Give an export folder's path, or {why[1]}."
        ) from e


HFAPI_KEYWORDS = sorted(set(inspect.signature(HfApi.__init__).parameters) - {"self"})  # endpoint, token, ...


# What each keyword of a push takes (the HfApi ones besides repo_id's, commit_message's, private's, revision's).
PUSH_KINDS = {"commit_message": (str, "a text"), "private": (bool, "True or False"), "revision": (str, "a branch name"),
              "endpoint": (str, "a URL"), "token": ((str, bool), "a token, or True/False"), "headers": (dict, "a dict"),
              "library_name": (str, "a text"), "library_version": (str, "a text"),
              "user_agent": ((str, dict), "a text or dict")}  # fmt: skip


def check_push(call: str, repo_id: Any, pushing: bool = True, **pushed: Any) -> None:
    """Refuse, before anything is written or sent, a repo id or a keyword that a push does not take (`pushing`
    False: only a keyword no push takes)."""
    if unknown := sorted(set(pushed) - set(PUSH_KINDS) - set(HFAPI_KEYWORDS)):
        raise TypeError(f"{call}: {', '.join(unknown)}: not keywords of a push, which takes repo_id, commit_message, "
                        f"private, revision and HfApi's {', '.join(HFAPI_KEYWORDS)}.")  # fmt: skip
    if not pushing:
        return
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise PushError(f"{call}: repo_id={repo_id!r} is not a Hub repo id; give one as 'owner/name'.")
    if bad := [f"{k}={v!r} ({PUSH_KINDS[k][1]})" for k, v in pushed.items()
               if v is not None and k in PUSH_KINDS and not isinstance(v, PUSH_KINDS[k][0])]:  # fmt: skip
        raise TypeError(f"{call}: {', '.join(bad)}: not of the kind a push takes.")


def push_geometry(folder: str | Path, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                  revision: str | None = None, **hub: Any) -> str:  # fmt: skip
    """Upload an exported geometry folder, as it is (weights, config.json, model card, training figure), to the Hub
    repo `repo_id`, creating the repo if needed; returns the commit's id. The folder is checked first: only an
    export that `load_geometry` accepts is shipped.

    `hub` goes to `HfApi` (endpoint, token). Load it back with `load_geometry(repo_id)`.
    """
    check_push("push_geometry", repo_id, commit_message=commit_message, private=private, revision=revision, **hub)
    if not isinstance(folder, (str, os.PathLike)) or not Path(folder).is_dir():
        raise PushError(f"folder={folder!r} is not an export folder here; give the path of one (e.g. "
                        f"outputs/default/geometry/weekdays/gaga_out).")  # fmt: skip
    folder = Path(folder)
    model = load_geometry(folder)
    try:
        api = HfApi(**hub)
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, allow_patterns=SHIPPED, revision=revision,
            commit_message=commit_message or f"geosteer: {model.meta.get('geometry')} ({model.family}) on "
                                             f"{(model.meta.get('task') or {}).get('name')}, layer {model.meta.get('layer')}",
        )  # fmt: skip
    except Exception as e:
        # huggingface_hub's own errors (a repo id it refuses among them), and its HTTP client's (httpx or httpx2)
        if not isinstance(e, (HfHubHTTPError, OSError, ValueError)) and type(e).__module__.split(".")[0] not in (
            "httpx",
            "httpx2",
        ):
            raise
        raise PushError(
            f"pushing {folder} to the Hub repo {repo_id} failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
            f"Check that the Hub is in reach (and HF_HUB_OFFLINE is not set), and log in with write access "
            f"(`hf auth login` or HF_TOKEN), then push again: a push that failed half-way is safe to repeat."
        ) from e
    return info.oid


class ShippedGeometry(PyTorchModelHubMixin):
    """Subclass it as `class Net(nn.Module, ShippedGeometry, family="name")`: `load_geometry` then finds it by name."""

    families: ClassVar[dict[str, type[ShippedGeometry]]] = {}  # family name → network class
    family: ClassVar[str]
    input_dim: int
    pca_dim: int | None
    meta: dict

    def __init_subclass__(cls, family: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if family is not None:
            cls.family = family
            ShippedGeometry.families[family] = cls

    def register_ambient(self) -> None:
        """Buffers of the PCA projection, when `pca_dim` is set (call in `__init__`)."""
        if self.pca_dim is not None:
            self.register_buffer("pca_mean", torch.zeros(self.input_dim))
            self.register_buffer("pca_components", torch.eye(self.pca_dim, self.input_dim))  # (D, d), orthonormal rows

    @torch.no_grad()
    def fit_ambient(self, h: torch.Tensor) -> torch.Tensor:
        """Fit the PCA projection (if any) to training activations h (N, d); their ambient coordinates (N, D)."""
        if self.pca_dim is not None:
            pca = PCA.fit(h, self.pca_dim)
            self.pca_mean.copy_(pca.mean)
            self.pca_components.copy_(pca.components)
        return self.ambient(h)

    def ambient(self, h: torch.Tensor, rows: bool = False) -> torch.Tensor:
        """Raw activations to the ambient space: h itself, or its PCA coordinates. (…, d) → (…, D); `rows`: (B, d)
        alone (a network with batch norm)."""
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or (rows and h.dim() != 2) or h.shape[-1:] != (self.input_dim,):
            raise GeometryMismatch(
                f"this geometry takes activations of width {self.input_dim} (layer {self.meta.get('layer')}) as a "
                f"tensor (B, {self.input_dim}), but was given "
                f"{f'one of shape {tuple(h.shape)}' if isinstance(h, torch.Tensor) else type(h).__name__}."
            )
        self.check_dtype(h, "this geometry", "activations", "h")
        return h if self.pca_dim is None else (h - self.pca_mean) @ self.pca_components.T

    def check_dtype(self, x: torch.Tensor, call: str, what: str, name: str) -> None:
        """Refuse a tensor of another dtype than the network's (integers included), naming the cast that fixes it."""
        want = next((b.dtype for b in self.buffers() if b.is_floating_point()), torch.float32)
        if x.dtype != want:
            raise TypeError(f"{call} computes in {want}, but was given {x.dtype} {what}: pass {name}.to({want}).")

    def check_compatible(self, d: int, layer: int) -> None:
        """Refuse activations of another width or layer than the ones this geometry was trained on."""
        trained_layer = self.meta.get("layer")
        if d != self.input_dim or (layer is not None and layer != trained_layer):
            raise GeometryMismatch(
                f"this geometry was trained on d={self.input_dim} activations of layer {trained_layer}, "
                f"but {'its activations here are ' if layer is not None else 'it was given '}d={d}"
                f"{f' at layer {layer}' if layer is not None else ''}. Use the activations it was trained on, "
                f"or train a geometry for this one (pipeline stage=train)."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, revision: str | None = None, **kwargs):
        """Load `config.json` + `model.safetensors` from an export folder or a Hub repo id (`geometry_source`; the
        Hub options endpoint, token, cache_dir, local_files_only and force_download go to the download). Anything
        else (a pickle, a torn file, content that differs from its `meta.digest`) raises CheckpointError."""
        hub = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unknown keyword(s) {sorted(kwargs)}; it takes "
                            f"revision and the Hub options {list(HUB_OPTIONS)}.")  # fmt: skip
        folder = geometry_source(pretrained_model_name_or_path, revision, **hub)
        family = (read_config(Path(folder)).get("meta") or {}).get("family")
        if getattr(cls, "family", None) and isinstance(family, str) and family != cls.family:
            raise CheckpointError(
                f"{folder} holds a geometry of family {family!r}, not {cls.family!r} ({cls.__name__}). Load it with "
                f"load_geometry('{pretrained_model_name_or_path}'), which picks the class its meta.family names."
            )
        try:
            model = super().from_pretrained(folder, **kwargs)
        except CheckpointError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(
                f"{folder} is not a {cls.__name__} checkpoint that loads safely: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:400]}. A geometry is "
                f"config.json + model.safetensors (never a pickle). {remedy(folder)}"
            ) from e
        if (recorded := model.meta.get("digest")) is not None and recorded != content_digest(folder):
            raise CheckpointError(
                f"{folder}: config.json or model.safetensors changed after the export was written (meta.digest does "
                f"not match their content). {remedy(folder)} A geometry changed on purpose loads once meta.digest is "
                f"removed from config.json."
            )
        return model

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    revision: str | None = None, **hub: Any) -> str:  # fmt: skip
        """Upload this geometry as it is now (config.json with its meta, model.safetensors, sealed with a new
        `meta.digest`) to the Hub repo `repo_id`; returns the commit id. `hub` goes to `HfApi` (endpoint, token).
        `push_geometry(folder, repo_id)` ships a whole export folder instead, with its model card and figure."""
        pushed = {"commit_message": commit_message, "private": private, "revision": revision, **hub}
        check_push(f"{type(self).__name__}.push_to_hub", repo_id, **pushed)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            seal(Path(tmp))
            try:
                return push_geometry(tmp, repo_id, **pushed)
            except PushError as e:  # named as the user knows it, not by the folder it was staged in
                raise PushError(str(e).replace(tmp, f"this {type(self).__name__}")) from e

    def save_pretrained(self, save_directory: str | Path, *, repo_id: str | None = None, push_to_hub: bool = False,
                        commit_message: str | None = None, private: bool | None = None, revision: str | None = None,
                        **hub: Any) -> str | None:  # fmt: skip
        """huggingface_hub's save, made safe: `meta` and the weights are checked before anything is written; the
        files are written beside the folder, sealed (`meta.digest`) and moved in whole, config.json as standard JSON
        (NaN as null). A model card already there is kept, but the card and figure of another export this one
        replaces are not; a stage's record there, no longer true, is removed. A folder that holds anything else
        (another model, a run's products, a damaged export) is refused.

        A geometry loaded from an export and changed (its weights or meta) is no longer that export: the facts of its
        training that would now be false go (the training config's `fingerprint`, `metrics.metric_scale`, which eval
        then fits again); unchanged, it saves as it was. `push_to_hub=True` pushes as `push_to_hub(repo_id, ...)`."""
        call = f"{type(self).__name__}.save_pretrained"
        if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory).strip():
            raise TypeError(f"{call}: save_directory={save_directory!r} names no folder; give the folder to save the "
                            f"geometry in.")  # fmt: skip
        pushed = {"commit_message": commit_message, "private": private, "revision": revision, **hub}
        if not isinstance(push_to_hub, bool):
            raise TypeError(f"{call}: push_to_hub={push_to_hub!r} must be True or False.")
        if push_to_hub and repo_id is None:
            raise TypeError(f"{call}: push_to_hub=True needs repo_id='owner/name', the Hub repo to push to.")
        check_push(call, repo_id, push_to_hub, **pushed)
        if not push_to_hub and (given := sorted(k for k, v in {"repo_id": repo_id, **pushed}.items() if v is not None)):
            raise TypeError(f"{call}: {', '.join(given)}: keywords of a push, given without push_to_hub=True; "
                            f"save_pretrained takes the folder alone.")  # fmt: skip
        meta = arguments.json_facts(call, getattr(self, "meta", None))  # a user's network may have none
        if wrong := wrong_meta(meta):
            raise TypeError(f"{call}: {', '.join(wrong)}: not of the kind an export holds (meta.layer an int, "
                            f"meta.task a dict, ...), so load_geometry would refuse it. Fix .meta first.")  # fmt: skip
        if (family := getattr(self, "family", None)) and meta.get("family", family) != family:
            raise TypeError(f"{call}: meta.family={meta['family']!r}, but this is a {family} geometry "
                            f"({type(self).__name__}); load_geometry would build the wrong class. Fix .meta first.")  # fmt: skip
        if broken := [n for n, t in self.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]:
            raise ValueError(f"{call}: the weights hold NaN or Inf ({broken[:3]}); load_geometry refuses such an "
                             f"export. Save finite weights.")  # fmt: skip
        folder = Path(save_directory)
        if folder.is_symlink() and not folder.exists() or folder.exists() and not folder.is_dir():
            raise CheckpointError(f"{call}: {folder} is {'a link to nothing' if folder.is_symlink() else 'a file'}; "
                                  f"give a folder to save the geometry in.")  # fmt: skip
        replaced = None  # the digest of the export this save replaces, if the folder holds one
        if folder.is_dir():  # a folder of something else (an LM, a run's products) is not saved over
            kept = {*SHIPPED, "stage.json"}
            if others := sorted(p.name for p in folder.iterdir() if p.name not in kept and not p.name.startswith(".")):
                raise CheckpointError(f"{call}: {folder} holds {', '.join(others[:5])}, which no geometry export "
                                      f"holds (an LM, a run's products?); save into a new folder or an export's.")  # fmt: skip
            if odd := [name for name in SHIPPED if (folder / name).exists() and not (folder / name).is_file()]:
                raise CheckpointError(f"{call}: {folder} holds {', '.join(odd)} as a folder, not a file; save into "
                                      f"a new folder.")  # fmt: skip
            with contextlib.suppress(ValueError):  # weights there are an export's only beside its sealed config.json
                replaced = (read_config(folder).get("meta") or {}).get("digest")
            if replaced is None and ((folder / "config.json").exists() or (folder / "model.safetensors").exists()):
                raise CheckpointError(f"{call}: {folder} holds a config.json or weights that are not a geometry "
                                      f"export's (no readable config.json with meta.digest: another model's, or a "
                                      f"damaged export); save into a new folder, or remove them first.")  # fmt: skip
        meta = json.loads(json.dumps(meta))  # its keys as JSON text (a number's too, and sortable)
        recorded = meta.pop("digest", None)  # an export's, when it was loaded from one
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{call}: cannot make the folder {folder.parent} ({e.strerror}: is a part of that "
                                  f"path a file?); give a folder path.") from e  # fmt: skip
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
            staged = Path(tmp)
            super().save_pretrained(staged, config={**(self._hub_mixin_config or {}), "meta": meta})
            config = json.loads((staged / "config.json").read_text())
            if recorded is not None and content_digest(staged, config=config) != recorded:  # changed since loaded
                config["meta"].pop("fingerprint", None)  # no longer that training's product
                (config["meta"].get("metrics") or {}).pop("metric_scale", None)  # of other weights: eval fits it again
            (staged / "config.json").write_text(strict_json(config, indent=2, sort_keys=True))
            seal(staged)  # what it saves, sealed: load_geometry refuses a later change
            another = replaced not in (None, read_config(staged)["meta"]["digest"])  # not a save of the same export
            folder.mkdir(exist_ok=True)
            for name in ("model.safetensors", "config.json", "README.md"):  # a card of the folder's own is kept
                if name != "README.md" or another or not (folder / name).exists():
                    os.replace(staged / name, folder / name)
        if another:  # the figure of the export this replaced
            (folder / "training.png").unlink(missing_ok=True)
        (folder / "stage.json").unlink(missing_ok=True)  # a stage's record of the export this replaced
        return self.push_to_hub(repo_id, **{k: v for k, v in pushed.items() if v is not None}) if push_to_hub else None

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        os.chmod(Path(save_directory) / "model.safetensors", FILE_MODE)  # safetensors writes it owner-only

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from local directory"
            return super()._from_pretrained(strict=strict, **kwargs)  # every tensor must be in the file

    @classmethod
    def _load_as_pickle(cls, model, model_file: str, map_location: str, strict: bool):
        raise CheckpointError(f"{model_file} is a pickle; geosteer loads geometries only from model.safetensors.")


# The kind of each fact an export's `meta` records, where it records it (a hand edit can change it).
META_KINDS = {"geometry": str, "family": str, "target": str, "lm": str, "lm_fingerprint": (str, type(None)),
              "fingerprint": str, "store": str, "split": str, "layer": int, "task": dict, "concepts": dict,
              "lm_shape": (dict, type(None)), "lm_sketch": (list, type(None)), "needs": dict, "metrics": dict}  # fmt: skip


def check_meta(folder: Path, meta: dict) -> None:
    """Refuse a `meta` fact of another kind than an export writes (`"layer": "1"`, a task given by its name)."""
    if wrong := wrong_meta(meta):
        raise CheckpointError(f"{folder}/config.json holds {', '.join(wrong)}: not of the kind an export writes. "
                              f"{remedy(folder)}")  # fmt: skip


def wrong_meta(meta: dict) -> list[str]:
    """The `meta` facts of another kind than an export writes, as `meta.key=value`."""
    wrong = [f"meta.{k}={meta[k]!r}" for k, kind in META_KINDS.items()
             if k in meta and (not isinstance(meta[k], kind) or isinstance(meta[k], bool))]  # fmt: skip
    if isinstance(meta.get("task"), dict) and not isinstance(meta["task"].get("name"), str):
        wrong.append(f"meta.task.name={meta['task'].get('name')!r}")
    for k, v in (meta.get("lm_shape") or {}).items() if isinstance(meta.get("lm_shape"), dict) else ():
        if not isinstance(v, str if k == "model_type" else int) or isinstance(v, bool):
            wrong.append(f"meta.lm_shape.{k}={v!r}")
    sketch = meta.get("lm_sketch")
    if isinstance(sketch, list) and (len(sketch) != SKETCH_DIM or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                  for x in sketch)):  # fmt: skip
        wrong.append(f"meta.lm_sketch (a list of {len(sketch)}, not {SKETCH_DIM} numbers)")
    return wrong


def load_geometry(source: str | Path, d: int | None = None, layer: int | None = None, *, revision: str | None = None,
                  **hub: Any) -> ShippedGeometry:  # fmt: skip
    """An exported geometry, as the class its `meta.family` names, in eval mode and frozen.

    `source` is an export folder or a Hub repo id (owner/name, at `revision`; `hub` goes to `snapshot_download`).
    With `d` (and `layer`), it is checked against activations of that width (at that block): GeometryMismatch
    names both sides. Anything but safetensors + config.json, or an export whose content differs from the digest it
    was sealed with, raises CheckpointError.
    """
    from geosteer.models import gaga, geodesic_bridge, innsteer  # noqa: F401  the built-in families register

    if unknown := sorted(set(hub) - set(HUB_OPTIONS)):
        raise TypeError(f"load_geometry() got unknown keyword(s) {unknown}; it takes d, layer, revision and the Hub "
                        f"options {list(HUB_OPTIONS)}.")  # fmt: skip
    for key, value in (("d", d), ("layer", layer)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0):
            raise TypeError(
                f"{key}={value!r} must be a whole number ≥ 0 (the activations' {'width' if key == 'd' else 'block'}), or None."
            )
    folder = geometry_source(source, revision, **hub)
    config = read_config(Path(folder))
    family = (config.get("meta") or {}).get("family")
    if family is None and ("model_type" in config or "architectures" in config):
        raise CheckpointError(
            f"{folder} holds a language model ({config.get('model_type') or config.get('architectures')}), not an "
            f"exported geometry; give a geometry export's folder (a run's geometry/<task>/<name>), or a Hub repo of one."
        )
    if family is None:
        raise CheckpointError(
            f"{folder}/config.json records no meta.family, so which network it holds is unknown; load it with its class "
            f"(e.g. GAGA.from_pretrained), or re-export it with `pipeline stage=train`."
        )
    if not isinstance(family, str) or family not in ShippedGeometry.families:
        raise CheckpointError(
            f"{folder}/config.json names the geometry family {family!r}; this geosteer loads "
            f"{sorted(ShippedGeometry.families)}. Re-export it with `pipeline stage=train`, or import the module "
            f"that defines that family first."
        )
    model = ShippedGeometry.families[family].from_pretrained(folder).eval()
    if broken := [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]:
        raise CheckpointError(f"{folder}/model.safetensors holds NaN or Inf in {broken[:5]}: the export is damaged. "
                              f"{remedy(folder)}")  # fmt: skip
    if d is not None or layer is not None:
        try:
            model.check_compatible(d=model.input_dim if d is None else d, layer=layer)
        except GeometryMismatch as e:
            raise GeometryMismatch(f"{folder}: {e}") from e
    return model.requires_grad_(False)


def model_card(ctor: dict, meta: dict, *, tags: list[str], title: str, summary: str, rows: list[tuple[str, str]],
               usage: str, header: str = "", note: str = "") -> str:  # fmt: skip
    """The README.md of an exported geometry: front matter, what it is, a table of facts and metrics, and its use.

    A family gives its tags, title, summary paragraph, table rows and the line(s) of use after loading.
    """
    m, task = meta["metrics"], meta["task"]
    rows = [*rows, ("epochs / steps", f"{m['epochs']} / {m['steps']}"), ("git SHA", str(meta.get("git_sha")))]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: geosteer
tags: [geosteer, {", ".join(tags)}, steering-geometry, {task["name"]}]
---
# {meta["geometry"]}: {title}

{summary}

Trained by geosteer on the residual stream of `{meta["lm"]}` after decoder block {meta["layer"]}, at the last prompt
token of the `{task["name"]}` task ({len(task["values"])} values, {task["topology"]}).

| {header} | |
|---|---|
{table}

![training](training.png)

## Use

```python
import torch
from geosteer import load_geometry

# safetensors + config.json, never unpickles; refuses activations of another width or layer
geometry = load_geometry("path/to/this/folder", d={ctor["input_dim"]}, layer={meta["layer"]})
{usage}
```
{note and chr(10) + note}
`config.json` holds the constructor arguments and, under `meta`, the LM, layer, task schema and training metrics.
"""
