"""Injection of paths into the LM (SPEC §7) and the point-wise steering baselines (SPEC §6).

Injection replaces block ℓ's output at a carrier's last position, either
wholly or within a PCA subspace, and reads `q` back; all waypoints × carriers
go through `CarrierTail` as one batch. The baselines step `h` until the target
concept's probability reaches a threshold:
- CAA (mean difference of class activations);
- Euclidean gradient ascent on log q_target;
- FishBack's natural gradient (G_F + λI)⁻¹∇log q_target, by matrix-free conjugate gradient;
- dual steering (Park et al. 2026): (Cov_p[g] + αI)⁻¹β over the unembedding rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from models.geodesics import PCA
from models.metrics import FisherPullback
from models.tail import CarrierTail, log_concept_probs


def subspace_replace(h: torch.Tensor, w: torch.Tensor, pca: PCA) -> torch.Tensor:
    """h ← h + (w − P(h − m)) Pᵀ: the PCA coordinates of h become w; the off-subspace part stays. (N, d), (N, k) → (N, d)"""
    return h + (w - pca.project(h)) @ pca.components


@torch.no_grad()
def inject(
    tail: CarrierTail,
    waypoints: torch.Tensor,
    variant_ids: Sequence[Sequence[int]],
    pca: PCA | None = None,
) -> torch.Tensor:
    """q at every waypoint on every carrier, one batch. waypoints (W, d), or (W, k) PCA coordinates → (W, C, K+1)

    With `pca`, each carrier keeps the part of its own `h` outside the subspace
    (subspace replacement); without, `h` is replaced wholly.
    """
    W, C = len(waypoints), len(tail)
    carrier = torch.arange(C, device=waypoints.device).repeat(W)  # (W·C,) row w·C + c
    w = waypoints.repeat_interleave(C, 0).to(tail.h.dtype)
    h = w if pca is None else subspace_replace(tail.h[carrier], w, pca)
    return log_concept_probs(tail.logits(h, carrier), variant_ids).exp().view(W, C, -1)


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float = 1e-8, max_iter: int = 200) -> torch.Tensor:
    """Solve A x = b for symmetric positive-definite A given only x ↦ A x. (D,) → (D,)"""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = r @ r
    for _ in range(max_iter):
        if rs.sqrt() <= tol * b.norm():
            break
        Ap = matvec(p)
        alpha = rs / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


@dataclass
class Trajectory:
    h: torch.Tensor  # (n+1, d) the steered activation after each step, h[0] unsteered
    q: torch.Tensor  # (n+1, K+1) its behaviour
    reached: bool  # q_target reached the threshold


def log_q_grad(tail: CarrierTail, carrier: int, h: torch.Tensor, variant_ids, target: int) -> torch.Tensor:
    """∇_h log q_target on one carrier. (d,) → (d,)"""
    h = h.detach().requires_grad_()
    log_q = log_concept_probs(tail.logits(h.unsqueeze(0), torch.tensor([carrier])), variant_ids)[0, target]
    return torch.autograd.grad(log_q, h)[0]


def steer(
    tail: CarrierTail,
    carrier: int,
    variant_ids: Sequence[Sequence[int]],
    target: int,
    direction: Callable[[torch.Tensor], torch.Tensor],
    step: float,
    threshold: float = 0.5,
    max_steps: int = 50,
) -> Trajectory:
    """Iterate h ← h + step · direction(h) from the carrier's own h until q_target ≥ threshold."""
    hs, qs = [tail.h[carrier]], []
    for n in range(max_steps + 1):
        with torch.no_grad():
            qs.append(log_concept_probs(tail.logits(hs[-1].unsqueeze(0), torch.tensor([carrier])), variant_ids).exp()[0])
        if qs[-1][target] >= threshold or n == max_steps:
            break
        hs.append(hs[-1] + step * direction(hs[-1]))
    return Trajectory(torch.stack(hs), torch.stack(qs), bool(qs[-1][target] >= threshold))


# Each *_direction returns the function h (d,) → step direction (d,) that `steer` iterates.


def caa_direction(mean_source: torch.Tensor, mean_target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """CAA: the unit mean difference of the two classes' activations, the same at every step."""
    delta = mean_target - mean_source
    return lambda h: delta / delta.norm()


def gradient_direction(tail: CarrierTail, carrier: int, variant_ids, target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Euclidean gradient ascent on log q_target, unit length."""

    def direction(h: torch.Tensor) -> torch.Tensor:
        g = log_q_grad(tail, carrier, h, variant_ids, target)
        return g / g.norm()

    return direction


def fishback_direction(fisher: FisherPullback, variant_ids, target: int, lam: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """FishBack: δ = (G_F + λI)⁻¹ ∇log q_target by matrix-free CG, of unit length in the (G_F + λI) norm."""

    def direction(h: torch.Tensor) -> torch.Tensor:
        F = fisher.jacobian(h.unsqueeze(0))[0].detach()  # (r, d) factor: G_F = FᵀF

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return F.T @ (F @ v) + lam * v

        g = log_q_grad(fisher.tail, fisher.carrier, h, variant_ids, target)
        delta = conjugate_gradient(matvec, g)
        return delta / (delta @ matvec(delta)).sqrt()

    return direction


def dual_direction(
    tail: CarrierTail,
    carrier: int,
    unembedding: torch.Tensor,
    variant_ids: Sequence[Sequence[int]],
    source: int,
    target: int,
    alpha: float = 1e-3,
    top_k: int = 256,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dual steering: δ ∝ (Cov_p[g] + αI)⁻¹ β, Cov_p[g] = Gᵀdiag(p)G − μμᵀ over the top-k unembedding rows G.

    β is the difference of the target and source concepts' mean unembedding rows. unembedding (V, d).
    """
    beta = unembedding[list(variant_ids[target])].mean(0) - unembedding[list(variant_ids[source])].mean(0)

    def direction(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = tail.logits(h.unsqueeze(0), torch.tensor([carrier]))[0].softmax(-1)  # (V,)
        p_top, tokens = p.topk(min(top_k, len(p)))
        p_top = p_top / p_top.sum()
        G = unembedding[tokens].to(h.dtype)  # (k, d)
        mu = p_top @ G

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return G.T @ (p_top * (G @ v)) - mu * (mu @ v) + alpha * v

        delta = conjugate_gradient(matvec, beta.to(h.dtype))
        return delta / delta.norm()

    return direction
