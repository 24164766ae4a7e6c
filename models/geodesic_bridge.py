"""GeodesicBridge: an amortised curve generator between two activations (docs/method.md §5).

    γ(t; x_a, x_b) = (1−t)·x_a + t·x_b + 4t(1−t) · s · σ ⊙ MLP([x̃_a, x̃_b, t])

The chord plus a bump that vanishes at both ends, so γ(0) = x_a and γ(1) = x_b
exactly, whatever the network. x̃ are the endpoints standardised per dimension
(shift μ, scale σ, fitted on training activations); the MLP's output is in those
standardised units and s is a learned scalar gain. The MLP's last layer starts
at zero (and s at one), so an untrained bridge is the chord and every layer gets
a gradient from the first step. One call evaluates a batch of pairs on a time
grid; `velocity` gives γ̇ by forward-mode differentiation in t.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import jvp

from geosteer.models import arguments
from geosteer.models.hub import ShippedGeometry


def chord(x_a: torch.Tensor, x_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1−t)·x_a + t·x_b at every time of every pair. (P, d), (P, d), (T,) → (P, T, d)"""
    t = t.view(1, -1, 1).to(x_a)
    return (1 - t) * x_a.unsqueeze(1) + t * x_b.unsqueeze(1)


def pullback_speed2(encode, curve: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """‖J_E(γ_t) γ̇_t‖² at every point of every curve, by one forward-mode pass through E (no Jacobian formed).

    `encode` maps rows (N, d) → (N, k), each row independently (eval mode). curve, velocity (P, T, d) → (P, T)
    """
    P, T, d = curve.shape
    _, moved = jvp(encode, (curve.reshape(P * T, d),), (velocity.reshape(P * T, d),))  # (P·T, k)
    return moved.pow(2).sum(1).view(P, T)


class GeodesicBridge(nn.Module, ShippedGeometry, family="bridge", tags=["geosteer", "geodesic-bridge", "steering-geometry"]):
    """Curves between pairs of activations.

    Args:
        input_dim: d, the width of the activations.
        hidden: widths of the MLP's hidden layers (SiLU, so that γ is smooth in t).
        meta: JSON-able facts to ship with the weights (LM, layer, the encoder it was trained against).
    """

    def __init__(self, input_dim: int, hidden: list[int] | tuple[int, ...] = (256, 256), meta: dict[str, Any] | None = None):
        super().__init__()
        arguments.counts("GeodesicBridge", input_dim=input_dim)
        hidden = arguments.widths("GeodesicBridge", "hidden", hidden)
        self.input_dim, self.pca_dim, self.meta = input_dim, None, arguments.json_facts("GeodesicBridge", meta)
        self.register_buffer("shift", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))
        sizes = [2 * input_dim + 1, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(sizes[-1], input_dim))
        nn.init.zeros_(layers[-1].weight)  # the bump starts at zero: an untrained bridge is the chord
        nn.init.zeros_(layers[-1].bias)
        self.mlp = nn.Sequential(*layers)
        self.gain = nn.Parameter(torch.ones(()))  # s

    @torch.no_grad()
    def fit_normalisation(self, h: torch.Tensor) -> None:
        """Per-dimension standardisation of the endpoints from training activations h (N, d)."""
        self.shift.copy_(h.mean(0))
        self.scale.copy_(h.std(0).clamp_min(1e-6 * h.std(0).max()))

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """γ at every time of every pair. x_a, x_b (P, d), t (T,) in [0, 1] (a tensor or a list) → (P, T, d)"""
        if not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t, dtype=x_a.dtype, device=x_a.device)
        if t.dim() == 0:
            t = t.reshape(1)
        if t.dim() != 1 or x_a.shape != x_b.shape or x_a.dim() != 2 or x_a.shape[1] != self.input_dim:
            raise ValueError(f"the bridge takes x_a, x_b of one shape (P, {self.input_dim}) and times t (T,) in [0, 1]; "
                             f"got {tuple(x_a.shape)}, {tuple(x_b.shape)} and {tuple(t.shape)}.")  # fmt: skip
        for name, x in (("x_a", x_a), ("x_b", x_b)):
            self.check_dtype(x, "the bridge", "endpoints", name)
        if not ((t >= 0) & (t <= 1)).all():
            raise ValueError(
                f"the bridge's times t must lie in [0, 1] (0: x_a, 1: x_b); got {t.flatten()[:8].tolist()}{' …' * (len(t) > 8)}."
            )
        P, T = len(x_a), len(t)
        ends = torch.cat([(x_a - self.shift) / self.scale, (x_b - self.shift) / self.scale], 1)  # (P, 2d)
        inputs = torch.cat([ends.unsqueeze(1).expand(P, T, -1), t.view(1, T, 1).expand(P, T, 1).to(ends)], 2)
        bump = self.gain * self.scale * self.mlp(inputs)  # (P, T, d)
        envelope = 4 * t * (1 - t)
        return chord(x_a, x_b, t) + envelope.view(1, T, 1).to(bump) * bump

    def velocity(self, x_a: torch.Tensor, x_b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """γ and γ̇ = ∂γ/∂t, by one forward-mode pass in t (each γ(·, t_j) depends on t_j alone). → (P, T, d) twice"""
        return jvp(lambda s: self(x_a, x_b, s), (t,), (torch.ones_like(t),))


# ---- the maths of training and scoring a bridge ------------------------------------------------


def knn_mean_distance(points: torch.Tensor, data: torch.Tensor, k: int, exclude_self: bool = False,
                      chunk: int = 4096) -> torch.Tensor:  # fmt: skip
    """Mean distance from each point to its k nearest data rows, `chunk` points at a time. (M, d), (N, d) → (M,)

    The neighbours are found without autograd and only the k distances to them are taken with it: the
    same value and gradient as a backward through the whole (M, N) distance matrix, at O(M·k·d).
    """
    out, skip = [], int(exclude_self)
    for part in points.split(chunk):
        with torch.no_grad():  # cdist by matrix product: several times faster than the exact mode
            nearest = torch.cdist(part, data).topk(k + skip, dim=1, largest=False).indices[:, skip:]  # (m, k)
        out.append((part.unsqueeze(1) - data[nearest]).norm(dim=-1).mean(1))
    return torch.cat(out)


def drift(curve: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Max over t of the distance from γ_t to the nearest data row, over the chord length. (P, T, d) → (P,)

    T includes both ends; the ends are data points themselves when the pairs are.
    """
    P, T, d = curve.shape
    nearest = torch.cat([torch.cdist(part, data).min(1).values for part in curve.reshape(P * T, d).split(4096)])
    return nearest.view(P, T).max(1).values / (curve[:, -1] - curve[:, 0]).norm(dim=1)


def secant_energy(encode, curve: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """Σ_i (‖E(γ_{i+1}) − E(γ_i)‖² + λ‖γ_{i+1} − γ_i‖²) / (u_{i+1} − u_i): ∫‖J_E γ̇‖² + λ‖γ̇‖² dt by latent secants.

    curve (P, T, d) at increasing times u (T,) → (P,)
    """
    P, T, d = curve.shape
    z = encode(curve.reshape(P * T, d)).view(P, T, -1)  # (P, T, k)
    step = z.diff(dim=1).pow(2).sum(-1) + lam * curve.diff(dim=1).pow(2).sum(-1)  # (P, T−1)
    return (step / u.diff().to(step)).sum(1)


def speed_energy(encode, curve: torch.Tensor, velocity: torch.Tensor, lam: float, dt: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t (‖J_E(γ_t) γ̇_t‖² + λ‖γ̇_t‖²)·dt_t: ∫ … dt by one jvp through E, dt (T,) the time each point stands for
    (None: equal shares, the mean). curve, velocity (P, T, d) → (P,)"""
    speed = pullback_speed2(encode, curve, velocity) + lam * velocity.pow(2).sum(-1)  # (P, T)
    return speed.mean(1) if dt is None else (speed * dt.to(speed)).sum(1)


def stratified_times(T: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """0, one uniform draw in each of [i/T, (i+1)/T) for i < T, and 1. → (T+2,)"""
    inner = (torch.arange(T, dtype=torch.float64) + torch.rand(T, dtype=torch.float64, generator=generator)) / T
    return torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)]).to(like)
