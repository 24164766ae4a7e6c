"""Behaviour metrics of a steering path (docs/method.md §9), read off the concept distributions q it produces.

A behaviour point q is a distribution over K concept bins plus "other" (last
bin), shape (..., K+1). Trajectories are q (W, C, K+1): waypoints × carriers,
with an optional `mask` (W, C) of valid waypoints for per-carrier lengths.
Hellinger distance d_H(p, q) = ‖√p − √q‖/√2 ∈ [0, 1], so 1 − d_H² is the
Bhattacharyya coefficient ⟨√p, √q⟩. Pure torch; no LM.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from geosteer.models.geodesics import sphere_angle


def hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """d_H(p, q) = ‖√p − √q‖/√2. (..., K+1), (..., K+1) → (...)"""
    return (p.clamp_min(0).sqrt() - q.clamp_min(0).sqrt()).norm(dim=-1) / math.sqrt(2)


class BehaviourManifold:
    """B: a dense cubic spline through the class centroids' √(mean q) on the unit sphere, in label order.

    Periodic (through the K knots and back to the first) on cyclic tasks,
    natural otherwise. Each sample is clamped at 0 and renormalised (the
    nearest point of the sphere's non-negative part); the knots are kept exactly.

    Args:
        centroids: mean q per answer class (K, K+1), rows in label order.
        cyclic: the task's topology.
        points_per_segment: samples per knot interval.
    """

    def __init__(self, centroids: torch.Tensor, cyclic: bool, points_per_segment: int = 32):
        K = len(centroids)
        if K < 2:
            raise ValueError(f"A behaviour manifold needs at least 2 class centroids, got {K}; pass one row per class.")
        knots = centroids.detach().double().cpu().clamp_min(0).sqrt()
        knots = (knots / knots.norm(dim=-1, keepdim=True)).numpy()  # (K, K+1) unit rows
        if cyclic:
            knots = np.vstack([knots, knots[:1]])
            spline = CubicSpline(np.arange(K + 1), knots, bc_type="periodic")
        else:
            spline = CubicSpline(np.arange(K), knots, bc_type="natural")
        n = (len(knots) - 1) * points_per_segment
        points = torch.from_numpy(spline(np.arange(n + 1) / points_per_segment)).clamp_min(0)  # (M, K+1)
        points = points / points.norm(dim=-1, keepdim=True)
        points[::points_per_segment] = torch.from_numpy(knots)  # the knots exactly (and the seam, when cyclic)
        self.points, self.cyclic = points, cyclic  # (M, K+1), unit norm, non-negative

    def distance(self, q: torch.Tensor) -> torch.Tensor:
        """D_B(q, B) = min_m −log(1 − d_H(q, B_m)²) = −log max_m ⟨√q, B_m⟩, ≥ 0. (..., K+1) → (...)"""
        points = self.points.to(q.device)
        bc = (q.to(points.dtype).clamp_min(0).sqrt() @ points.T).amax(-1)  # (...) best Bhattacharyya coefficient
        return -bc.clamp(torch.finfo(bc.dtype).tiny, 1).log().to(q.dtype)


def _valid(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask of valid waypoints, all-true by default. q (W, C, K+1) → (W, C) bool"""
    return torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if mask is None else mask.to(q.device)


def bhattacharyya_energy(q: torch.Tensor, manifold: BehaviourManifold, mask: torch.Tensor | None = None) -> torch.Tensor:
    """E_B = mean_c Σ_{valid t} D_B(q_{t,c}, B); unmasked it is docs/method.md's Σ_t mean_c D_B. q (W, C, K+1) → ()"""
    D = manifold.distance(q)  # (W, C)
    return torch.where(_valid(q, mask), D, 0).sum(0).mean()


def arc_length(q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t d_H(q_t, q_{t+1}) over each carrier's consecutive valid waypoints, mean over carriers. (W, C, K+1) → ()"""
    valid = _valid(q, mask)
    order = torch.argsort((~valid).to(torch.uint8), dim=0, stable=True)  # (W, C) valid waypoints first, in order
    q = q.gather(0, order.unsqueeze(-1).expand_as(q))
    valid = valid.gather(0, order)
    steps = hellinger(q[1:], q[:-1])  # (W−1, C)
    return torch.where(valid[1:] & valid[:-1], steps, 0).sum(0).mean()


def arc_energy(q: torch.Tensor, manifold: BehaviourManifold, mask: torch.Tensor | None = None,
               samples: int = 64) -> torch.Tensor:  # fmt: skip
    """∫ D_B ds over Hellinger arc length, mean over carriers: E_B free of the parametrisation. (W, C, K+1) → ()

    Each carrier's valid waypoints are joined by great-circle arcs of √q (what lies between two waypoints is not
    observed; the arc is the shortest guess) and resampled at `samples` points equally spaced in arc length, so a
    path is scored by where it goes, not by how its waypoints are spread: one that jumps off the manifold between
    two waypoints pays for the jump, and a slow start counts no more than a fast one.
    """
    if len(q) < 2:  # a path that starts where it stops (a carrier already past the threshold) travels no arc
        return q.new_zeros(())
    valid = _valid(q, mask)
    order = torch.argsort((~valid).to(torch.uint8), dim=0, stable=True)  # valid waypoints first, in order
    s = q.gather(0, order.unsqueeze(-1).expand_as(q)).clamp_min(0).sqrt().double()
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-300)  # (W, C, K+1) on the unit sphere
    valid = valid.gather(0, order)
    theta = sphere_angle(s[1:], s[:-1]) * (valid[1:] & valid[:-1])  # (W−1, C) arc of each step
    total = theta.sum(0)  # (C,)
    cum = torch.cat([theta.new_zeros(1, theta.shape[1]), theta.cumsum(0)])  # (W, C) arc at each waypoint
    at = (torch.arange(samples, dtype=s.dtype, device=s.device)[:, None] + 0.5) / samples * total  # (M, C) midpoints
    seg = torch.searchsorted(cum.T.contiguous(), at.T.contiguous(), right=True).T.sub(1).clamp(0, len(theta) - 1)  # (M, C)
    C = torch.arange(q.shape[1], device=q.device)
    start, end, width = s[seg, C], s[seg + 1, C], theta[seg, C]  # (M, C, K+1), (M, C, K+1), (M, C)
    frac = ((at - cum[seg, C]) / width.clamp_min(1e-300)).clamp(0, 1)
    sin = width.sin().clamp_min(1e-300)
    wa = torch.where(width > 1e-9, ((1 - frac) * width).sin() / sin, 1 - frac)
    wb = torch.where(width > 1e-9, (frac * width).sin() / sin, frac)
    point = wa.unsqueeze(-1) * start + wb.unsqueeze(-1) * end  # (M, C, K+1) √q of the resampled points
    D = manifold.distance(point.pow(2))  # (M, C)
    return (D.mean(0) * total / math.sqrt(2)).mean().to(q.dtype)  # ds in d_H units: an arc θ has length θ/√2


def classes_between(a: int, b: int, K: int, cyclic: bool) -> list[int]:
    """The classes strictly between a and b, in order from a to b: the shorter way round when cyclic, a tie forwards.

    The same span rule as `models.geodesics.LabelledSpline.path`.
    """
    span = b - a
    if cyclic:
        span = (span + K // 2) % K - K // 2  # in [−⌊K/2⌋, ⌈K/2⌉)
        span = -span if 2 * span == -K else span
    step = 1 if span > 0 else -1
    return [(a + step * i) % K for i in range(1, abs(span))]


def visit_intermediates(q: torch.Tensor, a: int, b: int, cyclic: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of `classes_between(a, b)` that are top-1 at some valid waypoint, mean over carriers. (W, C, K+1) → ()

    NaN when a and b are adjacent (nothing between): callers leave NaN out of means.
    """
    between = classes_between(a, b, q.shape[-1] - 1, cyclic)
    if not between:
        return torch.tensor(float("nan"), dtype=q.dtype)
    top = q.argmax(-1)  # (W, C)
    hit = (top.unsqueeze(-1) == torch.tensor(between, device=q.device)) & _valid(q, mask).unsqueeze(-1)  # (W, C, n)
    return hit.any(0).to(q.dtype).mean()


def legibility(q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of valid waypoints × carriers whose top-1 bin is a concept, not "other". (W, C, K+1) → ()"""
    valid = _valid(q, mask)
    concept = q.argmax(-1) < q.shape[-1] - 1  # (W, C)
    return (concept & valid).sum().to(q.dtype) / valid.sum()


def _at_end(q: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """q at each carrier's last waypoint (W−1, or `last` (C,)). (W, C, K+1) → (C, K+1)"""
    W, C = q.shape[:2]
    last = torch.full((C,), W - 1, device=q.device) if last is None else last.to(q.device)
    return q[last, torch.arange(C, device=q.device)]


def target_prob_end(q: torch.Tensor, b: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """q_b at each carrier's last waypoint, mean over carriers. q (W, C, K+1), last (C,) long → ()"""
    return _at_end(q, last)[:, b].mean()


def top1_at_end(q: torch.Tensor, b: int, last: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of carriers whose top-1 bin at their last waypoint is b. q (W, C, K+1), last (C,) long → ()"""
    return (_at_end(q, last).argmax(-1) == b).to(q.dtype).mean()


def off_target_kl(logits_ref: torch.Tensor, logits: torch.Tensor, exclude: list[int]) -> torch.Tensor:
    """KL(p_ref ‖ p) over the tokens not in `exclude` (the target's variants), both renormalised. (..., V) → (...)

    `logits_ref` broadcasts against `logits` (e.g. (C, V) against (W, C, V)), so a reference is normalised once.
    """
    drop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    drop[exclude] = True
    log_ref = logits_ref.masked_fill(drop, -math.inf).log_softmax(-1)  # (..., V), −inf on the dropped tokens
    log_p = logits.masked_fill(drop, -math.inf).log_softmax(-1)
    terms = log_ref.exp() * (log_ref - log_p)
    return torch.where(log_ref > -math.inf, terms, 0).sum(-1)  # 0 log 0 = 0


def first_reaching(q: torch.Tensor, b: int, threshold: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per carrier, the first valid waypoint with q_b ≥ threshold, or −1 if none. (W, C, K+1) → (C,) long"""
    hit = (q[..., b] >= threshold) & _valid(q, mask)  # (W, C)
    return torch.where(hit.any(0), hit.long().argmax(0), -1)
