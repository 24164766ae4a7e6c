"""INNSteer: invertible latent steering (arXiv 2606.08454), docs/method.md §8.

An invertible flow φ (a FrEIA `SequenceINN` of affine coupling blocks) maps
standardised activations to a latent space where each answer class c is a unit
Gaussian around a learned mean μ_c. Steering from class a to b moves a point by
α(μ_b − μ_a) in the latent and maps it back:

    h' = φ⁻¹(φ(h) + α(μ_b − μ_a)),   α ∈ [0, 1].

So the steering path is a straight line in the latent, and a geodesic of the
pullback metric `G_φ = J_φᵀ J_φ` on the activations (`models.metrics`).

φ acts on the ambient space: raw h, or PCA(D) of h for wide models; there,
steering keeps each carrier's part of h outside the subspace (docs/method.md §7 subspace
replacement). Ambient inputs are standardised per dimension. The coupling
subnets are built from flat config values, so weights go to `model.safetensors`
and constructor arguments to `config.json`, and loading never unpickles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geosteer.models import arguments
from geosteer.models.geodesics import linear_path
from geosteer.models.hub import GeometryMismatch, ShippedGeometry


def atan_clamp(u: torch.Tensor) -> torch.Tensor:
    """FrEIA's "ATAN" soft clamp of coupling log-scales, as a module-level function so that the flow pickles."""
    return 0.636 * torch.atan(u)


def softplus_global_scale(a: torch.Tensor) -> torch.Tensor:
    """AllInOneBlock's "SOFTPLUS" global affine scale, likewise picklable."""
    return 0.1 * F.softplus(a, beta=0.5)


# Affine coupling blocks of FrEIA 0.2 (pinned): constructor and the keyword arguments of their
# clamp. GLOW and RealNVP couple fixed halves, so a seeded channel permutation follows each;
# AllInOneBlock carries its own permutation (a stored buffer) and a learned global affine.
# FrEIA 0.2 keeps these activations as lambdas, which cannot be pickled into DDP-spawned
# workers; the same functions are passed (coupling blocks) or set (AllInOneBlock) instead.
BLOCKS: dict[str, tuple[type, Callable[[float], dict[str, Any]]]] = {
    "all_in_one": (Fm.AllInOneBlock, lambda clamp: {"affine_clamping": clamp, "global_affine_type": "SOFTPLUS"}),
    "glow": (Fm.GLOWCouplingBlock, lambda clamp: {"clamp": clamp, "clamp_activation": atan_clamp}),
    "rnvp": (Fm.RNVPCouplingBlock, lambda clamp: {"clamp": clamp, "clamp_activation": atan_clamp}),
}


def subnet(hidden: int, depth: int) -> Callable[[int, int], nn.Module]:
    """FrEIA subnet constructor: `depth` hidden ReLU layers of width `hidden`; the output layer starts at zero.

    A zero output layer makes every coupling start as the identity, so φ starts as
    the standardisation alone.
    """

    def build(c_in: int, c_out: int) -> nn.Module:
        sizes = [c_in, *[hidden] * depth]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], c_out))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        return nn.Sequential(*layers)

    return build


class InnSteer(nn.Module, ShippedGeometry, family="innsteer", tags=["geosteer", "innsteer", "steering-geometry"]):
    """An invertible flow on activations with one latent mean per answer class.

    Args:
        input_dim: d, the width of the raw activations h.
        num_classes: K, the task's answer classes.
        pca_dim: D for a PCA ambient space, or None for raw h (D = d).
        block: the coupling block, one of `BLOCKS`.
        num_blocks: how many coupling blocks.
        hidden, depth: width and hidden-layer count of each coupling subnet.
        clamp: soft clamp of the log-scales (FrEIA's `clamp` / `affine_clamping`).
        seed: seeds the blocks' fixed channel permutations.
        meta: JSON-able facts to ship with the weights (LM, layer, task schema, metrics).
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        pca_dim: int | None = None,
        block: str = "all_in_one",
        num_blocks: int = 8,
        hidden: int = 256,
        depth: int = 1,
        clamp: float = 2.0,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        arguments.counts("InnSteer", optional=("pca_dim",), input_dim=input_dim, pca_dim=pca_dim, num_blocks=num_blocks,
                         hidden=hidden)  # fmt: skip
        arguments.counts("InnSteer", 2, num_classes=num_classes)  # class means to steer between
        arguments.counts("InnSteer", 0, depth=depth, seed=seed)
        arguments.number("InnSteer", "clamp", clamp, " > 0", lambda x: x > 0)
        arguments.ambient_width("InnSteer", input_dim, pca_dim)
        if block not in BLOCKS:
            raise ValueError(f"block '{block}' is not supported; use one of {sorted(BLOCKS)}.")
        self.input_dim, self.num_classes, self.pca_dim, self.meta = (
            input_dim,
            num_classes,
            pca_dim,
            arguments.json_facts("InnSteer", meta),
        )
        D = pca_dim or input_dim
        if D < 2:
            raise ValueError(f"a coupling flow needs at least 2 dimensions; got {D}. Raise pca_dim.")
        self.register_buffer("shift", torch.zeros(D))  # per-dimension mean of the ambient inputs
        self.register_buffer("scale", torch.ones(D))  # per-dimension std
        self.register_ambient()
        self.means = nn.Parameter(torch.zeros(num_classes, D))  # μ_c, one row per class
        kind, clamp_args = BLOCKS[block]
        rng = np.random.RandomState(seed)  # FrEIA draws permutations from numpy's global state: seed a copy
        state = np.random.get_state()
        try:
            self.flow = Ff.SequenceINN(D)
            for _ in range(num_blocks):
                np.random.seed(rng.randint(2**31))
                self.flow.append(kind, subnet_constructor=subnet(hidden, depth), **clamp_args(clamp))
                if block == "all_in_one":
                    self.flow.module_list[-1].global_scale_activation = softplus_global_scale
                else:
                    self.flow.append(Fm.PermuteRandom, seed=int(rng.randint(2**31)))
        finally:
            np.random.set_state(state)

    @torch.no_grad()
    def fit_normalisation(self, h: torch.Tensor) -> None:
        """Set the PCA projection (if any) and the per-dimension standardisation from training activations h (N, d)."""
        a = self.fit_ambient(h)
        self.shift.copy_(a.mean(0))
        self.scale.copy_(a.std(0).clamp_min(1e-6 * a.std(0).max()))

    def standardise(self, h: torch.Tensor) -> torch.Tensor:
        """Raw activations to the flow's input: standardised ambient coordinates. (B, d) → (B, D)"""
        return (self.ambient(h) - self.shift) / self.scale

    def latent(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = φ(s) of standardised inputs, and log|det ∂z/∂a| (a the ambient input). (B, D) → (B, D), (B,)"""
        z, log_det = self.flow(s)
        return z, log_det - self.scale.log().sum()

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z = φ(h) and log|det ∂z/∂a| per point, a the ambient input. (B, d) → (B, D), (B,)"""
        return self.latent(self.standardise(h))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """φ(h) alone, for metrics and probes. (B, d) → (B, D)"""
        return self.flow(self.standardise(h), jac=False)[0]

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a = φ⁻¹(z) in the ambient space and log|det ∂a/∂z|. (B, D) → (B, D), (B,)"""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != len(self.shift):
            raise GeometryMismatch(f"InnSteer.inverse takes latents (B, {len(self.shift)}); got "
                                   f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}.")  # fmt: skip
        self.check_dtype(z, "InnSteer.inverse", "latents", "z")
        s, log_det = self.flow(z, rev=True)
        return s * self.scale + self.shift, log_det + self.scale.log().sum()

    @property
    def known_classes(self) -> list[int]:
        """The classes whose latent mean was learned: those with training points (`meta.metrics.classes_trained`;
        every class of an export made before it was recorded, and while the flow trains)."""
        known = (self.meta.get("metrics") or {}).get("classes_trained")
        return list(range(len(self.means))) if known is None else [int(k) for k in known]

    def learned(self, a: int, b: int) -> bool:
        """Whether the flow learned both classes' means: steering from a to b needs them."""
        return {int(a), int(b)} <= set(self.known_classes)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """The class whose latent mean is nearest, of those learned: the flow's own Gaussian classifier, linear in z.
        (B, D) → (B,)"""
        known = torch.tensor(self.known_classes, device=z.device)
        return known[torch.cdist(z, self.means[known]).argmin(1)]

    def steer(self, h: torch.Tensor, source: int | torch.Tensor | None, target: int | torch.Tensor,
              alpha: float | torch.Tensor = 1.0) -> torch.Tensor:  # fmt: skip
        """φ⁻¹(φ(h) + α(μ_target − μ_source)) for every α.

        h (B, d); source/target: class indices, one each or one per row (B,); source None: each row's class by
        `classify` of the same φ(h); alpha: a number → (B, d), or a 1-D tensor of A values → (A, B, d). With a PCA
        ambient space only the subspace part of h moves.
        """
        try:
            alphas = torch.as_tensor(alpha, dtype=h.dtype, device=h.device)
        except (TypeError, ValueError, RuntimeError):
            alphas = None
        if alphas is None or alphas.dim() > 1 or isinstance(alpha, bool) or not alphas.isfinite().all():
            raise TypeError(f"alpha={alpha!r} must be a finite number, or a 1-D tensor of them (one path per value).")
        source, target = self._class(h, "source", source, none=True), self._class(h, "target", target)
        batched = alphas.dim() == 1
        alphas = alphas.reshape(-1, 1, 1)  # (A, 1, 1)
        z = self.encode(h)  # (B, D)
        delta = self.means[target] - self.means[self.classify(z) if source is None else source]  # (D,) or (B, D)
        a_new = self.inverse((z + alphas * delta).flatten(0, 1))[0].view(len(alphas), *z.shape)  # (A, B, D)
        if self.pca_dim is None:
            out = a_new
        else:
            out = h + (a_new - self.ambient(h)) @ self.pca_components  # (A, B, d)
        return out if batched else out[0]

    def _class(self, h: torch.Tensor, name: str, value, none: bool = False):
        """A class index, or one per row of h, checked against the classes this flow knows."""
        K, values = len(self.means), (self.meta.get("concepts") or {}).get("values")
        if value is None and none:
            return None
        try:
            index = torch.as_tensor(value, device=self.means.device)
        except (TypeError, ValueError, RuntimeError):
            index = None
        if (index is None or isinstance(value, bool) or index.is_floating_point() or index.dtype == torch.bool
                or index.dim() > 1 or (index.dim() == 1 and len(index) != len(h)) or ((index < 0) | (index >= K)).any()):  # fmt: skip
            raise ValueError(
                f"{name}={value!r} must be a class index in 0 … {K - 1}, one or one per row of h"
                f"{f' (the classes: {values})' if values else ''}{'; or None for each row its own class' if none else ''}."
            )
        if unlearned := sorted(set(index.flatten().tolist()) - set(self.known_classes)):
            named = [values[k] for k in unlearned] if values else unlearned
            raise ValueError(
                f"{name}={value!r}: the flow learned no latent mean for class(es) {named} (no training point of "
                f"theirs: the LM's arg-max q never gave them), so it cannot steer {'from' if none else 'to'} them; use "
                f"one of the classes {self.known_classes}, or another steering method (CAA, linear)."
            )
        return index

    @torch.no_grad()
    def geodesic(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
        """The exact geodesic of G_φ = J_φᵀJ_φ from x_a to x_b: φ⁻¹ of the latent chord, since φ's latent is flat.

        With a PCA ambient space the rest of h follows the chord. x_a, x_b (P, d) → (P, steps+1, d)
        """
        arguments.counts("InnSteer.geodesic", steps=steps)
        arguments.pair("InnSteer.geodesic", x_a, x_b, width=self.input_dim)
        z = linear_path(self.encode(x_a), self.encode(x_b), steps)  # (P, W, D)
        a = self.inverse(z.flatten(0, 1))[0].view(z.shape)
        if self.pca_dim is None:
            return a
        chord = linear_path(x_a, x_b, steps)
        return chord + (a - self.ambient(chord)) @ self.pca_components
