"""Behaviour metrics and metric alignment against analytic cases, brute force and scipy (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from scipy.interpolate import CubicSpline

from geosteer.models.behaviour import (
    BehaviourManifold,
    arc_energy,
    arc_length,
    bhattacharyya_energy,
    classes_between,
    first_reaching,
    legibility,
    off_target_kl,
    target_prob_end,
    top1_at_end,
    visit_intermediates,
)
from geosteer.models.geodesics import LabelledSpline
from geosteer.models.metrics import (
    spearman,
)


def d_hellinger(p, r) -> float:
    return float(np.linalg.norm(np.sqrt(p) - np.sqrt(r)) / math.sqrt(2))


def scripted(tops: list[list[int]], K: int, peak: float = 0.6) -> torch.Tensor:
    """q whose top-1 bin is tops[c][t]: `peak` there, the rest spread evenly. → (W, C, K+1)"""
    q = torch.full((len(tops[0]), len(tops), K + 1), (1 - peak) / K, dtype=torch.float64)
    for c, seq in enumerate(tops):
        for t, k in enumerate(seq):
            q[t, c, k] = peak
    return q


def centroids(K: int, seed: int = 0) -> torch.Tensor:
    """Peaked class centroids: mostly on their own bin, the rest random. → (K, K+1)"""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(K, K + 1, generator=g, dtype=torch.float64) + 4 * torch.eye(K, K + 1, dtype=torch.float64)
    return c / c.sum(1, keepdim=True)


@pytest.mark.parametrize("cyclic", [True, False])
def test_manifold_through_centroids_unit_non_negative(cyclic):
    c = 0.9 * torch.eye(5, 6, dtype=torch.float64)
    c[:, 5] = 0.1  # sparse: the spline through √c overshoots below 0 between knots
    B = BehaviourManifold(c, cyclic, points_per_segment=8)
    pts = B.points
    torch.testing.assert_close(pts.norm(dim=1), torch.ones(len(pts), dtype=torch.float64), rtol=0, atol=1e-12)
    assert (pts >= 0).all()
    assert len(pts) == (5 if cyclic else 4) * 8 + 1
    torch.testing.assert_close(pts[::8][:5], c.sqrt(), rtol=0, atol=1e-12)
    if cyclic:
        torch.testing.assert_close(pts[-1], c[0].sqrt(), rtol=0, atol=1e-12)
    else:  # between the knots: scipy's natural spline, clamped at 0 and renormalised
        ref = CubicSpline(np.arange(5), c.sqrt().numpy(), bc_type="natural")(np.arange(33) / 8).clip(0)
        np.testing.assert_allclose(pts.numpy(), ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-12)


def _arc(u: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q along the great circle of √q from u to v at fractions t of the angle. → (len(t), 1, K+1)"""
    a, b = u.sqrt(), v.sqrt()
    theta = (a * b).sum().arccos()
    s = (((1 - t) * theta).sin()[:, None] * a + (t * theta).sin()[:, None] * b) / theta.sin()
    return (s**2).unsqueeze(1)


def test_the_arc_length_energy_does_not_depend_on_how_the_waypoints_are_spread():
    c = centroids(6)
    B = BehaviourManifold(c, cyclic=True)
    uniform = _arc(c[0], c[3], torch.linspace(0, 1, 17, dtype=torch.float64))
    crowded = _arc(c[0], c[3], torch.linspace(0, 1, 17, dtype=torch.float64) ** 3)  # most waypoints near the start
    torch.testing.assert_close(arc_energy(crowded, B, samples=256), arc_energy(uniform, B, samples=256), rtol=2e-3, atol=0)
    assert bhattacharyya_energy(crowded, B) < 0.8 * bhattacharyya_energy(uniform, B), "the waypoint sum does depend on it"


def test_a_jump_pays_for_the_arc_it_skips_where_the_waypoint_sum_sees_nothing():
    c = 0.85 * torch.eye(6, 7, dtype=torch.float64) + 0.15 / 7  # peaked classes: their blends are off the manifold
    B = BehaviourManifold(c, cyclic=True)
    jump = torch.stack([c[0]] * 16 + [c[3]]).unsqueeze(1)  # sits at class 0, then leaps to class 3 in one step
    assert bhattacharyya_energy(jump, B) < 1e-12, "every waypoint is a knot of the manifold"
    leap = _arc(c[0], c[3], torch.linspace(0, 1, 257, dtype=torch.float64))  # the same leap, observed densely
    torch.testing.assert_close(arc_energy(jump, B), arc_energy(leap, B), rtol=0.02, atol=0)
    walk = B.distance(leap[:, 0]).max()
    assert walk > 0.1, "half way, the blend of classes 0 and 3 is far from the manifold"
    along = (B.points[::2] ** 2).unsqueeze(1)  # a path that walks the manifold
    assert arc_energy(along, B) < 0.01 * arc_energy(jump, B)


def test_a_path_of_one_waypoint_has_no_arc_energy_as_one_that_stands_still():
    """A carrier that starts past the threshold stops at its first waypoint: no arc, as a path that stays put."""
    c = centroids(6)
    B = BehaviourManifold(c, cyclic=True)
    off = (0.5 * c[0] + 0.5 * c[3]).expand(1, 2, -1)  # off the manifold, where standing still still costs nothing
    assert arc_energy(off, B) == arc_energy(off.expand(5, -1, -1), B) == 0


def test_distance_and_energy():
    c = centroids(4)
    B = BehaviourManifold(c, cyclic=True)
    on = B.points[[0, 7, 40, 77]] ** 2  # distributions on the manifold
    assert B.distance(on).abs().max() < 1e-12
    assert bhattacharyya_energy(torch.stack([c, c]), B).abs() < 1e-12  # (W=2, C=4)
    torch.manual_seed(0)
    q = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((6, 3))  # (W, C, K+1)
    brute = -np.log((np.sqrt(q.numpy())[..., None, :] * B.points.numpy()).sum(-1).max(-1))  # (W, C)
    np.testing.assert_allclose(B.distance(q).numpy(), brute, rtol=1e-12)
    assert (B.distance(q) > 0).all()
    np.testing.assert_allclose(float(bhattacharyya_energy(q, B)), brute.mean(1).sum(), rtol=1e-12)
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[4:, 1] = False  # carrier 1 has 4 waypoints
    np.testing.assert_allclose(float(bhattacharyya_energy(q, B, mask)), (brute * mask.numpy()).sum(0).mean(), rtol=1e-12)


def test_arc_length():
    g = torch.Generator().manual_seed(1)
    p, r = (torch.rand(5, generator=g, dtype=torch.float64) for _ in range(2))
    p, r = p / p.sum(), r / r.sum()
    d = d_hellinger(p.numpy(), r.numpy())
    assert float(arc_length(p.expand(7, 2, 5))) == pytest.approx(0, abs=1e-15)
    assert float(arc_length(torch.stack([p, r])[:, None])) == pytest.approx(d, rel=1e-12)
    assert float(arc_length(torch.stack([p, r, p])[:, None])) == pytest.approx(2 * d, rel=1e-12)
    q = torch.stack([torch.stack([p, r, p, p]), torch.stack([p, p, r, r])], 1)  # (4, 2, 5)
    mask = torch.tensor([[True, True], [True, False], [True, True], [False, False]])  # carrier 1: p, ·, r, ·
    assert float(arc_length(q, mask)) == pytest.approx(1.5 * d, rel=1e-12)  # (2d + d) / 2


def test_classes_between():
    assert classes_between(1, 5, 7, cyclic=True) == [0, 6]
    assert classes_between(5, 1, 7, cyclic=True) == [6, 0]
    assert classes_between(2, 4, 7, cyclic=True) == [3]
    assert classes_between(1, 4, 6, cyclic=True) == [2, 3]  # a tie goes forwards
    assert classes_between(4, 1, 6, cyclic=True) == [5, 0]
    assert classes_between(1, 5, 7, cyclic=False) == [2, 3, 4]
    assert classes_between(5, 1, 7, cyclic=False) == [4, 3, 2]
    assert classes_between(3, 4, 7, cyclic=False) == classes_between(6, 0, 7, cyclic=True) == []


@pytest.mark.parametrize("K", [5, 6])
def test_classes_between_follows_labelled_spline(K):
    """The spline path's waypoints hit exactly the centroids of the classes between, the same way round."""
    g = torch.Generator().manual_seed(K)
    angle = 2 * math.pi * torch.arange(K, dtype=torch.float64) / K
    ring = torch.stack([angle.cos(), angle.sin(), 0.3 * torch.rand(K, generator=g, dtype=torch.float64)], 1)
    h = ring.repeat_interleave(4, 0) + 0.05 * torch.randn(4 * K, 3, generator=g, dtype=torch.float64)
    spline = LabelledSpline(h, torch.arange(K).repeat_interleave(4), cyclic=True, n_components=3)
    for a in range(K):
        for b in range(K):
            if a == b:
                continue
            path = spline.path(a, b, n_steps=12)  # every span (≤ 3) divides 12: knots are waypoints
            hits = [c for w in path[1:-1] for c in range(K) if (w - spline.centroids[c]).norm() < 1e-9]
            assert hits == classes_between(a, b, K, cyclic=True), (a, b)


def test_visit_intermediates():
    q = scripted([[0, 1, 3, 4], [0, 6, 2, 4]], K=6)  # a=0, b=4, between: 1, 2, 3
    assert float(visit_intermediates(q, 0, 4, cyclic=False)) == pytest.approx((2 / 3 + 1 / 3) / 2)
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[2, 0] = False  # carrier 0 no longer visits 3
    assert float(visit_intermediates(q, 0, 4, cyclic=False, mask=mask)) == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert math.isnan(float(visit_intermediates(q, 3, 4, cyclic=False)))
    q = scripted([[1, 0, 5], [1, 2, 5]], K=6)  # cyclic 1 → 5 goes back through 0
    assert float(visit_intermediates(q, 1, 5, cyclic=True)) == pytest.approx(0.5)


def test_legibility_and_end_metrics():
    q = scripted([[0, 3, 2], [3, 1, 1]], K=3)  # bin 3 is "other"
    assert float(legibility(q)) == pytest.approx(4 / 6)
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    assert float(legibility(q, mask)) == pytest.approx(3 / 4)
    assert float(target_prob_end(q, 2)) == pytest.approx((0.6 + 0.4 / 3) / 2)
    assert float(top1_at_end(q, 2)) == pytest.approx(0.5)
    last = torch.tensor([2, 0])  # carrier 1 ends on "other"
    assert float(target_prob_end(q, 2, last)) == pytest.approx(0.6 / 2 + 0.4 / 3 / 2)
    assert float(top1_at_end(q, 3, last)) == pytest.approx(0.5)
    assert float(top1_at_end(q, 1, last)) == 0


def test_off_target_kl():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(3, 40, generator=g, dtype=torch.float64)
    exclude = [4, 17, 30]
    moved = ref.clone()
    moved[:, exclude] += 5.0
    assert off_target_kl(ref, moved, exclude).abs().max() < 1e-12
    z = torch.randn(3, 40, generator=g, dtype=torch.float64)
    keep = [v for v in range(40) if v not in exclude]
    p, r = ref[:, keep].softmax(-1).numpy(), z[:, keep].softmax(-1).numpy()
    np.testing.assert_allclose(off_target_kl(ref, z, exclude).numpy(), scipy.stats.entropy(p, r, axis=1), rtol=1e-10)


def test_first_reaching():
    qb = torch.tensor([[0.1, 0.1], [0.3, 0.2], [0.6, 0.3], [0.4, 0.2], [0.8, 0.4]], dtype=torch.float64)
    q = torch.stack([qb, 1 - qb], -1)  # (5, 2, 2): K = 1, b = 0
    assert first_reaching(q, 0, 0.5).tolist() == [2, -1]
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[2, 0] = False
    assert first_reaching(q, 0, 0.5, mask).tolist() == [4, -1]


def test_spearman_matches_scipy():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 50, generator=g, dtype=torch.float64), torch.randn(3, 50, generator=g, dtype=torch.float64)
    b = b + a  # correlated
    ties_a = torch.randint(0, 5, (3, 50), generator=g).double()
    ties_b = ties_a + torch.randint(0, 3, (3, 50), generator=g).double()
    for x, y in ((a, b), (ties_a, ties_b), (ties_a, b)):
        ref = [scipy.stats.spearmanr(x[i].numpy(), y[i].numpy()).statistic for i in range(3)]
        np.testing.assert_allclose(spearman(x, y).numpy(), ref, rtol=1e-12)
