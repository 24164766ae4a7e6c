"""What every shipped geometry shares: strict safetensors + JSON loading, a compatibility check,
and the optional PCA ambient space.

A geometry is an `nn.Module` that also subclasses `ShippedGeometry`. It keeps its
constructor arguments in `config.json` and JSON-able facts (LM, layer, task,
metrics) in `self.meta`; `from_pretrained` never unpickles.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors import SafetensorError

from geosteer.models.geodesics import PCA


class GeometryMismatch(ValueError):
    """A checkpoint used with activations it was not trained on; the message names both."""


class CheckpointError(ValueError):
    """A geometry folder that cannot be loaded as safetensors + JSON (corrupt, incomplete, or a pickle)."""


def read_config(folder: Path) -> dict:
    """An exported geometry's `config.json`, or CheckpointError naming the folder and the fix."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        if not isinstance(config, dict) or not isinstance(config.get("meta") or {}, dict):
            raise ValueError("it holds no settings object with a meta object in it")
        return config
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{folder}/config.json cannot be read ({type(e).__name__}: {e}); the export is incomplete or damaged. "
            f"Re-export it with `pipeline stage=train` (delete the folder first), or copy it again."
        ) from e


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

    def ambient(self, h: torch.Tensor) -> torch.Tensor:
        """Raw activations to the ambient space: h itself, or its PCA coordinates. (B, d) → (B, D)"""
        return h if self.pca_dim is None else (h - self.pca_mean) @ self.pca_components.T

    def check_compatible(self, d: int, layer: int) -> None:
        """Refuse activations of another width or layer than the ones this geometry was trained on."""
        trained_layer = self.meta.get("layer")
        if d != self.input_dim or (layer is not None and layer != trained_layer):
            raise GeometryMismatch(
                f"this geometry was trained on d={self.input_dim} activations of layer {trained_layer}, "
                f"but the store holds d={d} at layer {layer}. Use the store it was trained on, "
                f"or train a geometry for this one (pipeline stage=train)."
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load `config.json` + `model.safetensors`; anything else (a pickle, a torn file) raises CheckpointError."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except CheckpointError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(
                f"{pretrained_model_name_or_path} is not a {cls.__name__} checkpoint that loads safely: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:400]}. A geometry is "
                f"config.json + model.safetensors (never a pickle); re-export it with `pipeline stage=train`."
            ) from e

    @classmethod
    def _from_pretrained(cls, *, strict: bool = True, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):  # huggingface_hub prints "Loading weights from local directory"
            return super()._from_pretrained(strict=strict, **kwargs)  # every tensor must be in the file

    @classmethod
    def _load_as_pickle(cls, model, model_file: str, map_location: str, strict: bool):
        raise CheckpointError(f"{model_file} is a pickle; geosteer loads geometries only from model.safetensors.")


def load_geometry(folder: str | Path, d: int | None = None, layer: int | None = None) -> ShippedGeometry:
    """An exported geometry, as the class its `meta.family` names, in eval mode and frozen.

    With `d` (and `layer`), it is checked against activations of that width (at that block): GeometryMismatch
    names both sides. Anything but safetensors + config.json raises CheckpointError.
    """
    from geosteer.models import gaga, geodesic_bridge, innsteer  # noqa: F401  the built-in families register

    family = (read_config(Path(folder)).get("meta") or {}).get("family")
    if family is None:
        raise CheckpointError(
            f"{folder}/config.json records no meta.family, so which network it holds is unknown; load it with its class "
            f"(e.g. GAGA.from_pretrained), or re-export it with `pipeline stage=train`."
        )
    if family not in ShippedGeometry.families:
        raise CheckpointError(
            f"{folder}/config.json names the geometry family {family!r}; this geosteer loads "
            f"{sorted(ShippedGeometry.families)}. Re-export it with `pipeline stage=train`, or import the module "
            f"that defines that family first."
        )
    model = ShippedGeometry.families[family].from_pretrained(folder).eval()
    if broken := [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]:
        raise CheckpointError(f"{folder}/model.safetensors holds NaN or Inf in {broken[:5]}: the export is damaged. "
                              f"Re-export it with `pipeline stage=train` (delete the folder first), or copy it again.")  # fmt: skip
    if d is not None:
        try:
            model.check_compatible(d=d, layer=layer)
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
