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

import functools
import math
import numbers
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geosteer.models.arguments import is_count, is_finite
from geosteer.models.geodesics import lbfgs_geodesic
from geosteer.models.hub import GeometryMismatch, load_geometry
from geosteer.models.lm import SKETCH_TOLERANCE, ModelLoadError, _hidden, decoder_layers, lm_shape, sketch_distance, weight_sketch
from geosteer.models.metrics import pullback_of, recorded_scale, regularisation, scaled_lam

METHODS = ("geometry", "linear", "caa")
ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → the Steering active on it
DRAFTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")  # generate()'s drafting


class SteeringError(ValueError):
    """Steering asked for something the geometry or the model cannot give; the message names it and the fix."""


@dataclass(frozen=True)
class Concepts:
    """The concept schema a geometry was trained with, and each class's centroid in h."""

    values: tuple[str, ...]
    variant_ids: tuple[tuple[int, ...], ...]  # the single-token ids of each value
    centroids: torch.Tensor  # (K, d), NaN for a class without rows

    @classmethod
    def of(cls, meta: dict[str, Any]) -> Concepts:
        """The schema in an export's `meta.concepts`, checked to be whole: K values, K token-id lists, K centroids
        of the LM's width (None for a class that had no rows)."""
        c, d = meta.get("concepts"), (meta.get("lm_shape") or {}).get("hidden_size")
        if not isinstance(c, dict) or not {"values", "variant_ids", "centroids"} <= set(c):
            raise GeometryMismatch(
                "this geometry records no concept schema and centroids (meta.concepts), which steering needs; "
                "export it again with `pipeline stage=train overwrite=true`."
            )
        values, ids, rows = c["values"], c["variant_ids"], c["centroids"]
        whole = (
            isinstance(values, list) and all(isinstance(v, str) for v in values) and len(set(values)) == len(values) > 1
            and isinstance(ids, list) and len(ids) == len(values)
            and all(isinstance(v, list) and v and all(isinstance(i, int) and i >= 0 for i in v) for v in ids)
            and isinstance(rows, list) and len(rows) == len(values)
            and all(r is None or (isinstance(r, list) and len(r) == d and all(is_finite(x) for x in r)) for r in rows)
        )  # fmt: skip
        if not whole:
            raise GeometryMismatch(
                f"this geometry's meta.concepts (config.json) is not whole: it needs K distinct values, K lists of "
                f"token ids and K centroids of {d} finite numbers (null for a class without rows). Export it again "
                f"with `pipeline stage=train overwrite=true`."
            )
        centroids = torch.tensor([[math.nan] * d if r is None else r for r in rows], dtype=torch.float32)
        return cls(tuple(values), tuple(tuple(v) for v in ids), centroids)

    def index(self, value: str, role: str = "target") -> int:
        value = str(value)
        if value not in self.values:
            raise SteeringError(f"{role} {value!r} is not a concept of this geometry; use one of {list(self.values)}.")
        k = self.values.index(value)
        if torch.isnan(self.centroids[k]).any():
            raise SteeringError(f"concept {value!r} had no rows when the geometry was trained, so it has no centroid "
                                f"to steer toward; pick another target.")  # fmt: skip
        return k

    def nearest(self, h: torch.Tensor) -> torch.Tensor:
        """The class of the nearest centroid of each row. (B, d) → (B,)"""
        known = torch.nonzero(~torch.isnan(self.centroids).any(1)).flatten().to(h.device)  # classes that had rows
        return known[torch.cdist(h, self.centroids.to(h)[known]).argmin(1)]


# The solver settings of `steering_point` that `Steering(**solver)` passes on, each with what it accepts.
SOLVER = {"steps": lambda x: is_count(x, 2), "max_iter": is_count, "history_size": is_count,  # a path: ≥ 1 inner waypoint
          "lam_rel": lambda x: is_finite(x) and 0 <= x <= 1e3}  # fmt: skip  # above 1000 × the scale: the chord


def check_model(model: nn.Module, meta: dict[str, Any]) -> None:
    """Refuse a model that the geometry was not trained on (another width, depth, vocabulary or architecture), and
    a layer or token ids the model does not have."""
    shape = meta.get("lm_shape")
    if not isinstance(shape, dict):
        raise GeometryMismatch("this geometry records no LM shape (meta.lm_shape); export it again with "
                               "`pipeline stage=train overwrite=true`.")  # fmt: skip
    try:
        found = lm_shape(model)
    except (AttributeError, TypeError, ModelLoadError) as e:
        raise SteeringError(f"model={type(model).__name__} is not a Hugging Face causal LM ({e}); give the LM the "
                            f"geometry was trained on, loaded with AutoModelForCausalLM or load_causal_lm.") from e  # fmt: skip
    differ = [f"{k} {found[k]} (geometry's: {shape.get(k)})" for k in found if found[k] != shape.get(k)]
    if differ:
        raise GeometryMismatch(
            f"this geometry was trained on {meta.get('lm')!r}, and this model differs: {'; '.join(differ)}. "
            f"Load the LM it was trained on, or train a geometry for this one (`pipeline stage=all model=...`)."
        )
    layer = meta.get("layer")
    if not isinstance(layer, int) or not 0 <= layer < found["num_layers"]:
        raise GeometryMismatch(f"this geometry's meta.layer={layer!r} is not a block of the model (0 ... "
                               f"{found['num_layers'] - 1}); export it again.")  # fmt: skip
    recorded = meta.get("lm_sketch")  # exports made before it was recorded carry none
    if recorded is not None and (distance := sketch_distance(weight_sketch(model), recorded)) > SKETCH_TOLERANCE:
        raise GeometryMismatch(
            f"this geometry was trained on {meta.get('lm')!r}, and this model's weights differ from that LM's (weight "
            f"sketch {distance:.2f} apart; the same weights in another dtype are within {SKETCH_TOLERANCE}): another "
            f"model of the same shape, or one trained again. Load the LM it was trained on, or train a geometry for "
            f"this one (`pipeline stage=all model=...`)."
        )
    ids = [i for v in (meta.get("concepts") or {}).get("variant_ids", []) if isinstance(v, list) for i in v]
    if any(not isinstance(i, int) or not 0 <= i < found["vocab_size"] for i in ids):
        raise GeometryMismatch(f"this geometry's concept token ids are not all in the model's vocabulary of "
                               f"{found['vocab_size']}; export it again.")  # fmt: skip


def steering_point(geometry: nn.Module, concepts: Concepts, h: torch.Tensor, target: int, alpha: float,
                   method: str = "geometry", source: int | None = None, steps: int = 16, lam_rel: float = 1e-3,
                   max_iter: int = 200, history_size: int = 20) -> torch.Tensor:  # fmt: skip
    """Each row of h moved by α along its path to the target class; `source`, the rows' class where INNSteer and
    CAA need one (None: the flow's own class of each row, or its nearest centroid). (B, d) → (B, d)"""
    h = h.float()
    c = concepts.centroids.to(h)
    x_b = c[target].expand_as(h)
    if method == "linear":
        return torch.lerp(h, x_b, float(alpha))  # exactly x_b at α = 1
    if method == "caa":
        return h + alpha * (x_b - c[concepts.nearest(h) if source is None else source])
    family = getattr(geometry, "family", None)
    if family == "innsteer":
        return geometry.steer(h, source, target, alpha)  # source None: the flow's class of h, from the same φ(h)
    if family == "bridge":
        return geometry(h, x_b, torch.tensor([float(alpha)]))[:, 0]
    if family == "gaga":
        metric = pullback_of(geometry)
        if (scale := recorded_scale(geometry)) is not None:  # taken on its training rows: λ is the evaluation's
            metric.lam = scaled_lam(lam_rel, scale)
        else:  # an export made before the scale was recorded: the centroids and h stand in for its training rows
            known = c[~torch.isnan(c).any(1)]
            metric.lam = regularisation(metric, torch.cat([known, h]), lam_rel)
        path = lbfgs_geodesic(h, x_b, metric, steps, max_iter, history_size)  # (B, T+1, d)
        return point_at(path, alpha)
    raise SteeringError(f"method={method!r} with a {family!r} geometry: use one of {METHODS}.")


def point_at(path: torch.Tensor, alpha: float) -> torch.Tensor:
    """The point a fraction α along each path's waypoints, linear between neighbours. (B, W, d) → (B, d)"""
    s = alpha * (path.shape[1] - 1)
    i = min(int(s), path.shape[1] - 2)
    return torch.lerp(path[:, i], path[:, i + 1], s - i)  # exactly the last waypoint at α = 1


class Steering:
    """Steer `model` toward `target` with `geometry` (an export: a folder through `load_geometry`, or the module).

    A context manager: inside it, every forward pass (and so `model.generate()`, with or without its cache)
    has block ℓ's output at the prompt's last token replaced by its steered point; `every_token=True` also
    steers each generated token. INNSteer and CAA move h by a class difference: from `source` when the
    prompts' class is known, else from the class the flow (or the nearest centroid) gives. Prompts are
    left-padded (the last position is every row's last token). A pass of several tokens, or one without a cache, is
    a new prompt, and one token over a cached prefix is the next generated token; `generate(use_cache=False)` passes
    every id again, so there a pass of the last one's ids plus one token is taken as its next step. Drafting
    generation (an `assistant_model`, `prompt_lookup_num_tokens`) is refused inside the block: its drafted tokens pass
    through the model as if they were a prompt. `last` holds the most recent (h, steered h) rows, and `calls` how
    many forward passes it steered. Refuses a model the geometry was not trained on, and a second Steering on a
    model that has one active.
    """

    def __init__(self, model: nn.Module, geometry: nn.Module | str | os.PathLike, target: str, alpha: float = 1.0,
                 method: str = "geometry", every_token: bool = False, source: str | None = None,
                 **solver: Any):  # fmt: skip
        if method not in METHODS:
            raise SteeringError(f"method={method!r} is unknown; use one of {METHODS}.")
        if not isinstance(every_token, (bool, np.bool_)):
            raise SteeringError(f"every_token={every_token!r} must be True or False.")
        if not is_finite(alpha) or not 0.0 <= alpha <= 1.0:
            raise SteeringError(f"alpha={alpha!r} must be a number in [0, 1] (0: unsteered, 1: the whole path)"
                                + (": pass alpha.item()." if isinstance(alpha, torch.Tensor) else "."))  # fmt: skip
        if unknown := sorted(set(solver) - set(SOLVER)):
            raise SteeringError(
                f"{', '.join(unknown)}: not settings of the steering; the geodesic solver takes {sorted(SOLVER)}."
            )
        if bad := [f"{k}={v!r}" for k, v in solver.items() if not SOLVER[k](v)]:
            raise SteeringError(f"{', '.join(bad)}: steps is a whole number ≥ 2, max_iter and history_size ≥ 1, and "
                                f"lam_rel a number in [0, 1000].")  # fmt: skip
        if isinstance(geometry, (str, os.PathLike)):
            geometry = load_geometry(geometry)
        if not isinstance(getattr(geometry, "meta", None), dict):
            raise SteeringError(f"geometry={type(geometry).__name__} is not a geosteer geometry; give an export "
                                f"(its folder, a Hub repo id, or load_geometry's result).")  # fmt: skip
        check_model(model, geometry.meta)
        self.model, self.geometry, self.alpha, self.method, self.every_token = model, geometry, float(alpha), method, every_token
        self.concepts = Concepts.of(geometry.meta)
        self.target = self.concepts.index(target)
        self.source = None if source is None else self.concepts.index(source, "source")
        family = getattr(geometry, "family", None)
        if source is not None and not (method == "caa" or (method == "geometry" and family == "innsteer")):
            raise SteeringError(f"source={source!r} is used by method='caa' and by INNSteer geometries (they move h by a "
                                f"class difference); method={method!r} with a {family} geometry steers toward the target "
                                f"from h itself. Leave source out.")  # fmt: skip
        if solver and not (method == "geometry" and family == "gaga"):
            raise SteeringError(f"{', '.join(sorted(solver))}: settings of the L-BFGS geodesic, which only a GAGA geometry "
                                f"with method='geometry' solves; method={method!r} with a {family} geometry has none. "
                                f"Leave them out.")  # fmt: skip
        known = getattr(geometry, "known_classes", None)  # INNSteer: the classes whose latent mean was learned
        if method == "geometry" and known is not None and (unlearned := {self.target, self.source} - {None, *known}):
            raise SteeringError(
                f"{[self.concepts.values[k] for k in sorted(unlearned)]}: this flow learned no latent mean for it (no "
                f"training prompt's arg-max q was that class), so it cannot steer to or from it. Pick another class, "
                f"or method='linear' or 'caa' (they steer by the centroids; steer.method=linear on the command line)."
            )
        self.layer = int(geometry.meta["layer"])
        self.solver = solver
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0
        self._prompt: torch.Tensor | None = None  # (B, P) the input ids of the prompt being generated from
        self._length: int | None = None  # P
        self._seen: int | None = None  # the length of the last pass's input ids
        self._handles: list = []
        self._own_generate = None

    def point(self, h: torch.Tensor) -> torch.Tensor:
        """The steered point of each row of h. (B, d) → (B, d)"""
        with torch.inference_mode(False), torch.no_grad():  # the geodesic solver differentiates the encoder
            h = h.clone()  # a plain tensor, also when the forward pass runs in inference mode
            return steering_point(self.geometry, self.concepts, h, self.target, self.alpha, self.method, self.source,
                                  **self.solver)  # fmt: skip

    def _see_input(self, _module, args, kwargs):
        """Before each forward pass: remember the prompt, unless the pass continues it (a generation step)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            if ids is not None and ids.shape[1] > 1:  # a new prompt after a cached prefix: its last token is the prompt's
                self._prompt, self._length, self._seen = None, None, None
            return  # else the next token of the cached prompt
        P = None if self._prompt is None else self._prompt.shape[1]
        continues = (cache is None and kwargs.get("use_cache") is False  # generate() without its cache: all ids again
                     and ids is not None and P is not None and ids.shape[1] == self._seen + 1  # one generated token more
                     and torch.equal(ids[:, :P], self._prompt))  # fmt: skip
        self._seen = None if ids is None else ids.shape[1]
        if not continues:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -1].all()):
                raise SteeringError("Steering moves each prompt's last position, so prompts must be left-padded: a row "
                                    "of this batch ends in padding. Set tokenizer.padding_side = 'left'.")  # fmt: skip
            self._prompt, self._length = ids, None if ids is None else ids.shape[1]

    def _hook(self, _module, _args, kwargs, output):
        hidden = _hidden(output)  # (B, T, d)
        T = hidden.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # holds this block's keys, these tokens included
        past = cache.get_seq_length(self.layer) - T if cache is not None else 0  # positions before this pass
        if self._length is None:  # a prompt given as embeddings: this pass is its first
            self._length = T + past
        P = self._length
        positions = [p - past for p in ([P - 1] + (list(range(P, past + T)) if self.every_token else []))]
        positions = [p for p in positions if 0 <= p < T]
        if not positions:
            return None
        h = hidden[:, positions].flatten(0, 1)  # (B·n, d)
        moved = self.point(h)
        self.last = (h.detach().float(), moved)
        self.calls += 1
        hidden = hidden.clone()
        hidden[:, positions] = moved.view(hidden.shape[0], len(positions), -1).to(hidden)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    def _generate(self, generate, *args, **kwargs):
        """The model's `generate`, refusing drafting: its drafted and verified tokens cannot be told from a prompt."""
        config = kwargs.get("generation_config", args[1] if len(args) > 1 else None) or getattr(
            self.model, "generation_config", None
        )
        if drafting := [
            k for k in DRAFTING if kwargs.get(k) not in (None, False) or getattr(config, k, None) not in (None, False)
        ]:
            raise SteeringError(
                f"generate() with {', '.join(drafting)} drafts tokens and checks them in passes of several tokens, which "
                f"Steering would take for new prompts and steer. Generate without it inside the Steering block."
            )
        return generate(*args, **kwargs)

    def __enter__(self) -> Steering:
        if self._handles:
            raise SteeringError("this Steering is already in use; enter it once at a time (make another for a "
                                "second model or target).")  # fmt: skip
        if (other := ACTIVE.get(self.model)) is not None:
            raise SteeringError(f"another Steering (toward {other.concepts.values[other.target]!r}) is active on this "
                                f"model: the second would steer the first one's output again. Exit it first.")  # fmt: skip
        self.calls, self._prompt, self._length, self._seen = 0, None, None, None
        self._handles = [
            self.model.register_forward_pre_hook(self._see_input, with_kwargs=True),
            decoder_layers(self.model)[self.layer].register_forward_hook(self._hook, with_kwargs=True),
        ]
        self._own_generate = self.model.__dict__.get("generate")  # the model's own, when it set one on itself
        if generate := getattr(self.model, "generate", None):
            self.model.__dict__["generate"] = functools.partial(self._generate, generate)
        ACTIVE[self.model] = self
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._own_generate is None:
            self.model.__dict__.pop("generate", None)
        else:
            self.model.__dict__["generate"] = self._own_generate
        if ACTIVE.get(self.model) is self:
            del ACTIVE[self.model]


def control_vector(concepts: Concepts, target: int, source: int | None = None) -> torch.Tensor:
    """The mean-difference direction c_b − c_a (CAA; the linear chord's direction between centroids), with `source`
    None: from the mean of the other classes' centroids. → (d,)"""
    c = concepts.centroids
    for name, k in (("target", target), ("source", source)):
        if k is not None and (not isinstance(k, numbers.Integral) or isinstance(k, bool) or not 0 <= k < len(c)):
            raise SteeringError(f"{name}={k!r} must be a class index in 0 … {len(c) - 1} (the classes: {concepts.values})"
                                f"{', or None for the mean of the others' if name == 'source' else ''}.")  # fmt: skip
    rowless = [concepts.values[k] for k in (target, source) if k is not None and torch.isnan(c[k]).any()]
    if rowless:
        raise SteeringError(f"{rowless}: no training prompt of this geometry was of that class, so it has no centroid "
                            f"and no direction. Pick a class with rows.")  # fmt: skip
    known = [k for k in range(len(c)) if k != target and not torch.isnan(c[k]).any()]
    start = c[known].mean(0) if source is None else c[source]
    return c[target] - start


def write_control_vector(path: Path, meta: dict[str, Any], direction: torch.Tensor) -> None:
    """`direction` (d,) as a llama.cpp control vector (GGUF): tensor `direction.<ℓ>` added to the output of block ℓ,
    and the model hint (`controlvector.model_hint`). llama.cpp numbers the blocks it steers from 1, so block 0 is
    refused."""
    import gguf

    layer, shape = (meta.get("layer"), meta.get("lm_shape")) if isinstance(meta, dict) else (None, None)
    if not is_count(layer, 0) or not isinstance(shape, dict) or not all(is_count(shape.get(k)) for k in
                                                                        ("num_layers", "hidden_size")):  # fmt: skip
        raise SteeringError("meta must be a geometry's meta (geometry.meta), with the block it was trained at as "
                            "meta['layer'] and its LM's shape as meta['lm_shape'] (num_layers, hidden_size).")  # fmt: skip
    if layer >= shape["num_layers"]:
        raise SteeringError(f"meta['layer']={layer} is not a block of its LM (0 … {shape['num_layers'] - 1}, "
                            f"meta['lm_shape']); give the geometry's own meta.")  # fmt: skip
    if not Path(path).parent.is_dir() or Path(path).is_dir():
        raise SteeringError(f"cannot write {path}: {'it is a folder' if Path(path).is_dir() else 'its folder does not exist'}"
                            f". Give the path of a .gguf file in an existing folder.")  # fmt: skip
    width = shape["hidden_size"]
    try:
        direction = torch.as_tensor(direction, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SteeringError(f"direction={direction!r:.60} is not a vector of numbers ({e}); give a tensor of the LM's "
                            f"hidden size ({width}), e.g. control_vector(Concepts.of(meta), target).") from None  # fmt: skip
    if direction.dim() != 1 or len(direction) != width:
        raise SteeringError(f"direction has shape {tuple(direction.shape)}; this geometry's LM takes a vector of its "
                            f"hidden size ({width}), e.g. control_vector(Concepts.of(meta), target).")  # fmt: skip
    if not bool(torch.isfinite(direction).all()) or not bool(direction.any()):
        raise SteeringError("direction holds NaN or Inf, or is all zeros: llama.cpp would add nothing, or NaN, to the "
                            "residual stream. Give a finite, non-zero vector, e.g. control_vector(Concepts.of(meta), "
                            "target) of a class with rows.")  # fmt: skip
    if layer < 1:
        raise SteeringError(f"this geometry was trained at block {layer}; llama.cpp's control vectors steer blocks 1 and "
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
