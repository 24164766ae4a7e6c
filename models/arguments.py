"""Argument checks of the public Python API: a refusal names the call, the value and what it takes.

The pipeline checks its settings where the config is read (`pipeline.settings`); these guard the
same networks and solvers when a user calls them directly, where torch would otherwise fail deep
inside (or, worse, accept a zero width or a NaN and return garbage).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def is_finite(x: Any) -> bool:
    """A finite real number (numpy's scalars too), not a boolean."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and math.isfinite(x)


def is_count(x: Any, least: int = 1) -> bool:
    """An integer (numpy's too, not a boolean) of at least `least`."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) and x >= least


def counts(call: str, least: int = 1, optional: tuple[str, ...] = (), **values: Any) -> None:
    """Refuse any of `values` that is not an integer ≥ `least` (None passes for the names in `optional`)."""
    bad = [k for k, v in values.items() if not (v is None and k in optional) and not is_count(v, least)]
    if bad:
        raise ValueError(f"{call}: {', '.join(f'{k}={values[k]!r}' for k in bad)} must be an integer ≥ {least}"
                         f"{' (or None)' if any(k in optional for k in bad) else ''}.")  # fmt: skip


def ambient_width(call: str, input_dim: int, pca_dim: int | None) -> None:
    """A PCA ambient space of at most the input's width."""
    if pca_dim is not None and pca_dim > input_dim:
        raise ValueError(f"{call}: pca_dim={pca_dim} exceeds input_dim={input_dim}; a PCA keeps at most the input's "
                         f"width: lower pca_dim, or pass None for the raw activations.")  # fmt: skip


def widths(call: str, name: str, value: Any) -> list[int]:
    """A sequence (list, tuple, ListConfig) of layer widths, each an integer ≥ 1."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(is_count(v) for v in value):
        raise ValueError(f"{call}: {name}={value!r} must be a list of layer widths, each an integer ≥ 1.")
    return [int(v) for v in value]


def number(call: str, name: str, value: Any, rule: str = "", test: Callable[[float], bool] = lambda x: True) -> float:
    """A finite real number for which `test` holds (`rule` says which, e.g. " > 0")."""
    if not is_finite(value) or not test(value):
        raise ValueError(f"{call}: {name}={value!r} must be a finite number{rule}.")
    return float(value)


def metric(call: str, value: Any) -> None:
    """A metric: `jacobian` and a finite λ ≥ 0 (`models.metrics.Metric`)."""
    if not callable(getattr(value, "jacobian", None)) or not is_finite(getattr(value, "lam", None)) or value.lam < 0:
        raise TypeError(f"{call}: metric must be a models.metrics.Metric (jacobian() and a finite lam ≥ 0), e.g. "
                        f"pullback_of(geometry); got {type(value).__name__}.")  # fmt: skip


def tensor(call: str, name: str, value: Any, dims: int | None, width: int | None = None) -> torch.Tensor:
    """A floating tensor of `dims` dimensions (None: at least one) and last dimension `width` (None: any)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() < 1 or (
            dims is not None and value.dim() != dims) or (width is not None and value.shape[-1] != width):  # fmt: skip
        shape = ", ".join({None: ["…"], 2: ["N"], 3: ["P", "T"]}.get(dims, ["…"]) + [str(width or "D")])
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{call}: {name} must be a floating tensor ({shape}); got {got}.")
    return value


def pair(call: str, x_a: Any, x_b: Any, dims: int | None = 2, width: int | None = None) -> None:
    """Two endpoint tensors of one shape."""
    tensor(call, "x_a", x_a, dims, width)
    tensor(call, "x_b", x_b, dims, width)
    if x_a.shape != x_b.shape or x_a.dtype != x_b.dtype:
        raise ValueError(f"{call}: x_a and x_b must be of one shape and dtype, one row per path; got "
                         f"{tuple(x_a.shape)} {x_a.dtype} and {tuple(x_b.shape)} {x_b.dtype}.")  # fmt: skip


def index(call: str, name: str, value: Any, n: int, what: str, per_point: bool = True) -> None:
    """An index among `n` things (`what`, e.g. "the tail's {n} carriers"): an integer in 0 … n−1, or, with
    `per_point`, a 1-D integer tensor of them (checked by one min and max, no loop over its entries)."""
    takes = (f"an integer in 0 … {n - 1}{', or a 1-D integer tensor of them' if per_point else ''} "
             f"(an index among {what.format(n=n)})")  # fmt: skip
    if isinstance(value, torch.Tensor) and ((value.ndim == 1 and per_point) or value.ndim == 0):
        if value.dtype not in (torch.int64, torch.int32):  # torch reads uint8 as a mask, and indexes by no int16
            raise TypeError(f"{call}: {name} must be {takes}; got a {value.dtype} tensor"
                            f"{' (pass .long())' if not value.dtype.is_floating_point else ''}.")  # fmt: skip
        if value.numel() and not (0 <= int(value.min()) and int(value.max()) < n):
            bad = int(value.min()) if int(value.min()) < 0 else int(value.max())
            raise ValueError(f"{call}: {name} holds {bad}; it must be {takes}.")
        return
    if not is_count(value, 0) or value >= n:
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(f"{call}: {name}={got} must be {takes}.")


def token_lists(call: str, name: str, value: Any, V: int) -> None:
    """A non-empty list of non-empty lists of token ids, each in 0 … V−1 (a concept schema's `variant_ids`)."""
    listed = lambda v: isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str) and len(v) > 0  # noqa: E731
    if not listed(value) or not all(listed(v) for v in value):
        raise ValueError(f"{call}: {name}={value!r} must be a non-empty list of concepts, each a non-empty list of "
                         f"token ids (e.g. [[5], [6, 7]]).")  # fmt: skip
    bad = [t for v in value for t in v if not is_count(t, 0) or t >= V]
    if bad:
        raise ValueError(f"{call}: {name} holds token id {bad[0]!r}, outside the vocabulary; "
                         f"token ids are integers in 0 … {V - 1}.")  # fmt: skip
    ids = [int(t) for v in value for t in v]
    if len(set(ids)) < len(ids):  # a token in two concepts (or twice in one) would count its probability twice
        twice = sorted({t for t in ids if ids.count(t) > 1})
        raise ValueError(f"{call}: {name} holds token id {twice[0]} more than once; each token belongs to one "
                         f"concept, once (q sums a concept's tokens, and the other bin the rest).")  # fmt: skip


def json_facts(call: str, meta: Any) -> dict:
    """`meta` (None: {}), a dict of plain JSON values: what an export's config.json can hold and read back."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"{call}: meta={meta!r} must be a dict of facts (JSON values), e.g. {{'layer': 1}}.")

    def walk(value: Any, where: str, inside: tuple[int, ...] = ()) -> None:
        if isinstance(value, (dict, list, tuple)) and id(value) in inside:
            raise TypeError(f"{call}: {where} holds itself (a cycle); JSON holds trees: give it a copy.")
        if isinstance(value, dict):
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, int, float))):  # json writes a number's key as its text
                    raise TypeError(f"{call}: {where} has the key {k!r}; JSON keys are text (str({k!r})).")
                walk(v, f"{where}[{k!r}]", (*inside, id(value)))
            texts = [k if isinstance(k, str) else json.dumps(k) for k in value]
            if len(set(texts)) < len(texts):
                twice = sorted({t for t in texts if texts.count(t) > 1})
                raise TypeError(f"{call}: {where} has keys that JSON writes alike ({twice}, a number and its text): "
                                f"one would be lost. Keep one.")  # fmt: skip
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", (*inside, id(value)))
        elif not (value is None or isinstance(value, (str, int, float))):  # bool is an int; numpy's float64 a float
            raise TypeError(f"{call}: {where}={value!r} ({type(value).__name__}) is not a JSON value; give plain "
                            f"Python values: float(x) or int(x) for a numpy or torch number, .tolist() for an array "
                            f"or tensor, str(p) for a path.")  # fmt: skip

    walk(meta, "meta")
    return meta
