"""Geodesic solvers (SPEC §5): a path is T+1 waypoints with exact endpoints.

- `linear_path`: the chord, the geodesic of a flat metric.
- `LabelledSpline`: Wurgaft et al. 2026; a cubic spline through the class
  centroids of PCA(64) activations, in label order (periodic on cyclic tasks).
- `lbfgs_geodesic`: Arvanitidis et al. 2018; the discrete energy under a
  frozen metric (any `models.metrics.Metric`), many pairs as one batched problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from models.metrics import Metric


def linear_path(x_a: torch.Tensor, x_b: torch.Tensor, n_steps: int) -> torch.Tensor:
    """x_t = (1 − t/T) x_a + (t/T) x_b. x_a, x_b (..., D) → (..., T+1, D)"""
    t = torch.linspace(0, 1, n_steps + 1, dtype=x_a.dtype, device=x_a.device).unsqueeze(-1)  # (T+1, 1)
    return (1 - t) * x_a.unsqueeze(-2) + t * x_b.unsqueeze(-2)


def path_energy(path: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Σ_t ‖J(x̄_t) Δ_t‖² + λ‖Δ_t‖², J at the segment midpoints. (P, T+1, D) → (P,)"""
    P, T1, D = path.shape
    delta = path.diff(dim=1)  # (P, T, D)
    mid = 0.5 * (path[:, 1:] + path[:, :-1])
    J = metric.jacobian(mid.reshape(-1, D)).view(P, T1 - 1, -1, D)  # (P, T, r, D)
    Jd = torch.einsum("ptrd,ptd->ptr", J, delta)
    return (Jd**2).sum((1, 2)) + metric.lam * (delta**2).sum((1, 2))


def lbfgs_geodesic(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    metric: Metric,
    n_steps: int = 16,
    max_iter: int = 200,
    history_size: int = 20,
    tolerance: float = 1e-6,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise the discrete energy over the interior waypoints, J frozen (detached) at each evaluation.

    Starts on the chord; `torch.optim.LBFGS` with a strong-Wolfe line search
    (SPEC §5). Pairs are independent, so the sum of their energies is one
    problem whose minimiser is every pair's own. x_a, x_b (P, D) → (P, T+1, D)

    Args:
        init: a starting path (P, T+1, D) instead of the chord; its endpoints are ignored.
    """
    chord = linear_path(x_a.detach(), x_b.detach(), n_steps)  # (P, T+1, D)
    interior = (chord if init is None else init.detach())[:, 1:-1].clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [interior],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    P, D = x_a.shape

    def closure() -> torch.Tensor:
        opt.zero_grad()
        path = torch.cat([chord[:, :1], interior, chord[:, -1:]], 1)
        delta = path.diff(dim=1)  # (P, T, D)
        with torch.no_grad():
            J = metric.jacobian((0.5 * (path[:, 1:] + path[:, :-1])).reshape(-1, D)).view(P, n_steps, -1, D)
        energy = (torch.einsum("ptrd,ptd->ptr", J, delta) ** 2).sum() + metric.lam * (delta**2).sum()
        energy.backward()
        return energy

    opt.step(closure)
    return torch.cat([chord[:, :1], interior.detach(), chord[:, -1:]], 1)


@dataclass
class PCA:
    """An affine subspace: `components` (k, d) orthonormal rows, `mean` (d,)."""

    components: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> PCA:
        """Top-k principal directions of x (N, d), signs fixed so that each row's largest entry is positive."""
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[: min(k, *x.shape)]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        return cls(comps * signs, mean)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T  # (..., d) → (..., k)

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        return self.mean + w @ self.components  # (..., k) → (..., d)


class LabelledSpline:
    """Cubic spline through per-class centroids of PCA(k) activations, in label order (Wurgaft et al.).

    Periodic (C² at the seam) for cyclic tasks, natural otherwise. Paths run
    between two classes' centroids along the spline, the shorter way round on
    cyclic tasks, and live in PCA coordinates: inject them by subspace replacement.

    Args:
        h: activations (N, d); labels: answer class per row (N,); cyclic: the task's topology.
    """

    def __init__(self, h: torch.Tensor, labels: torch.Tensor, cyclic: bool, n_components: int = 64):
        self.pca = PCA.fit(h.double(), n_components)
        self.classes = torch.unique(labels).tolist()  # label order
        z = self.pca.project(h.double())
        self.centroids = torch.stack([z[labels == c].mean(0) for c in self.classes])  # (C, k)
        knots = self.centroids.numpy()
        self.cyclic = cyclic
        if cyclic:
            self.spline = CubicSpline(np.arange(len(knots) + 1), np.vstack([knots, knots[:1]]), bc_type="periodic")
        else:
            self.spline = CubicSpline(np.arange(len(knots)), knots, bc_type="natural")

    def path(self, a: int, b: int, n_steps: int) -> torch.Tensor:
        """Waypoints from class a's centroid to class b's, in PCA coordinates. → (T+1, k)"""
        ia, ib = self.classes.index(a), self.classes.index(b)
        span = ib - ia
        if self.cyclic:
            C = len(self.classes)
            span = (span + C // 2) % C - C // 2  # shorter way round, in [−⌊C/2⌋, ⌈C/2⌉)
            span = -span if 2 * span == -C else span  # a tie goes forwards
        u = ia + span * np.linspace(0, 1, n_steps + 1)
        if self.cyclic:
            u = np.mod(u, len(self.classes))
        w = torch.from_numpy(self.spline(u))
        w[0], w[-1] = self.centroids[ia], self.centroids[ib]  # exact endpoints, free of spline round-off
        return w
