"""Steering generation with a shipped geometry: a context manager around any Hugging Face causal LM.

    geometry = load_geometry("outputs/default/geometry/weekdays/gaga_out")
    with Steering(model, geometry, target="Thursday", alpha=1.0):
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=4)

Inside the block, the residual stream leaving block ℓ (the geometry's layer) at the last
prompt token is moved from its own point h toward the target concept's class centroid c_b,
by a fraction α ∈ [0, 1] of the path the geometry gives (docs/method.md §5–§7):
- GAGA: the L-BFGS geodesic of its pullback metric G_E + λI, λ at `lam_rel` of its scale;
- INNSteer: its closed form φ⁻¹(φ(h) + α(μ_b − μ_a)), a the class the flow assigns h;
- GeodesicBridge: one forward pass γ(h, c_b, α);
- `method="linear"`: h + α(c_b − h); `method="caa"`: h + α(c_b − c_a), a the class of the nearest centroid.
α = 1 puts h on c_b for every path that ends there (all but INNSteer's and CAA's, which end
where their latent or difference step lands). With `every_token=True` the tokens the model
generates are steered too. The hook is removed when the block exits, error or not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geosteer.models.geodesics import lbfgs_geodesic
from geosteer.models.hub import GeometryMismatch
from geosteer.models.lm import _hidden, decoder_layers, lm_shape
from geosteer.models.metrics import pullback_of, regularisation

METHODS = ("geometry", "linear", "caa")


@dataclass(frozen=True)
class Concepts:
    """The concept schema a geometry was trained with, and each class's centroid in h."""

    values: tuple[str, ...]
    variant_ids: tuple[tuple[int, ...], ...]  # the single-token ids of each value
    centroids: torch.Tensor  # (K, d), NaN for a class without rows

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Concepts:
        c = meta.get("concepts")
        if not isinstance(c, dict) or not {"values", "variant_ids", "centroids"} <= set(c):
            raise GeometryMismatch(
                "this geometry records no concept schema and centroids (meta.concepts), which steering needs; "
                "export it again with `pipeline stage=train overwrite=true`."
            )
        return cls(tuple(c["values"]), tuple(tuple(v) for v in c["variant_ids"]),
                   torch.tensor(c["centroids"], dtype=torch.float32))  # fmt: skip

    def index(self, value: str) -> int:
        if value not in self.values:
            raise ValueError(f"target {value!r} is not a concept of this geometry; use one of {list(self.values)}.")
        k = self.values.index(value)
        if torch.isnan(self.centroids[k]).any():
            raise ValueError(f"concept {value!r} had no rows when the geometry was trained, so it has no centroid.")
        return k

    def nearest(self, h: torch.Tensor) -> torch.Tensor:
        """The class of the nearest centroid of each row. (B, d) → (B,)"""
        c = self.centroids.to(h).nan_to_num(float("inf"))
        return torch.cdist(h, c).argmin(1)


def check_model(model: nn.Module, meta: dict[str, Any]) -> None:
    """Refuse a model that the geometry was not trained on: another hidden size, layer count or vocabulary."""
    shape = meta.get("lm_shape")
    if not isinstance(shape, dict):
        raise GeometryMismatch("this geometry records no LM shape (meta.lm_shape); export it again with "
                               "`pipeline stage=train overwrite=true`.")  # fmt: skip
    found = lm_shape(model)
    differ = [f"{k} {found[k]} (geometry's: {shape.get(k)})" for k in found if found[k] != shape.get(k)]
    if differ:
        raise GeometryMismatch(
            f"this geometry was trained on {meta.get('lm')!r}, and this model differs: {'; '.join(differ)}. "
            f"Load the LM it was trained on, or train a geometry for this one (`pipeline stage=all model=...`)."
        )


def steering_point(geometry: nn.Module, concepts: Concepts, h: torch.Tensor, target: int, alpha: float,
                   method: str = "geometry", steps: int = 16, lam_rel: float = 1e-3, max_iter: int = 200,
                   history_size: int = 20) -> torch.Tensor:  # fmt: skip
    """Each row of h moved by α along its path to the target class. (B, d) → (B, d)"""
    h = h.float()
    c = concepts.centroids.to(h)
    x_b = c[target].expand_as(h)
    if method == "linear":
        return torch.lerp(h, x_b, float(alpha))  # exactly x_b at α = 1
    if method == "caa":
        return h + alpha * (x_b - c[concepts.nearest(h)])
    family = getattr(geometry, "family", None)
    if family == "innsteer":
        return geometry.steer(h, geometry.classify(geometry.encode(h)), target, alpha)
    if family == "bridge":
        return geometry(h, x_b, torch.tensor([float(alpha)]))[:, 0]
    if family == "gaga":
        metric = pullback_of(geometry)
        known = c[~torch.isnan(c).any(1)]
        metric.lam = regularisation(metric, torch.cat([known, h]), lam_rel)
        path = lbfgs_geodesic(h, x_b, metric, steps, max_iter, history_size)  # (B, T+1, d)
        return point_at(path, alpha)
    raise ValueError(f"method={method!r} with a {family!r} geometry: use one of {METHODS}.")


def point_at(path: torch.Tensor, alpha: float) -> torch.Tensor:
    """The point a fraction α along each path's waypoints, linear between neighbours. (B, W, d) → (B, d)"""
    s = alpha * (path.shape[1] - 1)
    i = min(int(s), path.shape[1] - 2)
    return torch.lerp(path[:, i], path[:, i + 1], s - i)  # exactly the last waypoint at α = 1


class Steering:
    """Steer `model` toward `target` with `geometry` (an export: a folder through `load_geometry`, or the module).

    A context manager: inside it, every forward pass (and so `model.generate()`) has block ℓ's output at the
    last prompt token replaced by its steered point; `every_token=True` also steers each generated token.
    Prompts are left-padded (the last position is every row's last token). `last` holds the most recent
    (h, steered h) pair, and `calls` how many forward passes it steered. Refuses a model the geometry was not
    trained on.
    """

    def __init__(self, model: nn.Module, geometry: nn.Module, target: str, alpha: float = 1.0,
                 method: str = "geometry", every_token: bool = False, **solver: Any):  # fmt: skip
        if method not in METHODS:
            raise ValueError(f"method={method!r} is unknown; use one of {METHODS}.")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha={alpha} must lie in [0, 1] (0: unsteered, 1: the whole path).")
        check_model(model, geometry.meta)
        self.model, self.geometry, self.alpha, self.method, self.every_token = model, geometry, alpha, method, every_token
        self.concepts = Concepts.of(geometry.meta)
        self.target = self.concepts.index(target)
        self.layer = int(geometry.meta["layer"])
        self.solver = solver
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0
        self._handle = None

    def point(self, h: torch.Tensor) -> torch.Tensor:
        """The steered point of each row of h. (B, d) → (B, d)"""
        with torch.no_grad():
            return steering_point(self.geometry, self.concepts, h, self.target, self.alpha, self.method, **self.solver)

    def _hook(self, _module, args, kwargs, output):
        hidden = _hidden(output)  # (B, T, d)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # holds this block's keys, these tokens included
        prompt = cache is None or cache.get_seq_length(self.layer) <= hidden.shape[1]
        if not (prompt or self.every_token):
            return None
        h = hidden[:, -1]
        moved = self.point(h)
        self.last = (h.detach().float(), moved)
        self.calls += 1
        hidden = hidden.clone()
        hidden[:, -1] = moved.to(hidden)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    def __enter__(self) -> Steering:
        self.calls = 0
        self._handle = decoder_layers(self.model)[self.layer].register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


def control_vector(concepts: Concepts, target: int, source: int | None = None) -> torch.Tensor:
    """The mean-difference direction c_b − c_a (CAA; the linear chord's direction between centroids), with `source`
    None: from the mean of the other classes' centroids. → (d,)"""
    c = concepts.centroids
    known = [k for k in range(len(c)) if k != target and not torch.isnan(c[k]).any()]
    start = c[known].mean(0) if source is None else c[source]
    return c[target] - start


def write_control_vector(path: Path, meta: dict[str, Any], direction: torch.Tensor) -> None:
    """`direction` (d,) as a llama.cpp control vector (GGUF): tensor `direction.<ℓ>` added to the output of block ℓ,
    with the model hint llama.cpp checks. llama.cpp numbers the blocks it steers from 1, so block 0 is refused."""
    import gguf

    layer = int(meta["layer"])
    if layer < 1:
        raise ValueError(f"this geometry was trained at block {layer}; llama.cpp's control vectors steer blocks 1 and "
                         f"up, so it cannot be exported as one. Train at a later model.layer.")  # fmt: skip
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch="controlvector")
    writer.add_string("controlvector.model_hint", str((meta.get("lm_shape") or {}).get("model_type", "llama")))
    writer.add_uint32("controlvector.layer_count", 1)
    writer.add_tensor(f"direction.{layer}", direction.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
