"""benchmarks/model_facts.py: the ring facts on known geometry, and the whole measurement on a tiny real run."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.model_facts import adjacent_pairs, between, model_facts, ring_facts
from geosteer.pipeline import extract


def circle(K: int, arc: float = 2 * np.pi, cyclic: bool = True) -> np.ndarray:
    """K points at equal steps along `arc` of a circle of radius 3 in a random 2-plane of R^16, plus tiny noise."""
    rng = np.random.default_rng(0)
    plane, _ = np.linalg.qr(rng.normal(size=(16, 2)))  # (16, 2) orthonormal
    theta = np.arange(K) * arc / (K if cyclic else K - 1)
    return 3 * np.stack([np.cos(theta), np.sin(theta)], 1) @ plane.T + 1 + 1e-4 * rng.normal(size=(K, 16))


def test_ring_facts_find_a_ring_in_label_order_and_only_then():
    points = circle(12)
    f = ring_facts(points, cyclic=True)
    assert f["pc12_share"] == pytest.approx(1, abs=1e-6)
    assert f["monotone"] and f["winding_deg"] == pytest.approx(360, abs=0.1)
    assert f["radius_cv"] == pytest.approx(0, abs=1e-3)
    assert np.allclose(f["angular_steps"], 2 * np.pi / 12, atol=1e-3) and len(f["angular_steps"]) == 12
    shuffled = ring_facts(points[np.random.default_rng(1).permutation(12)], cyclic=True)
    assert not shuffled["monotone"] and shuffled["pc12_share"] == pytest.approx(1, abs=1e-6)
    # An open 270° arc: K − 1 steps, seen from the points' mean (not the circle's centre), so a little over 270°.
    arc = ring_facts(circle(10, arc=np.radians(270), cyclic=False), cyclic=False)
    assert arc["monotone"] and len(arc["angular_steps"]) == 9 and 270 < arc["winding_deg"] < 300


def test_between_goes_forward_on_the_shorter_arc_and_adjacency_wraps_only_on_cycles():
    assert between(5, 1, 7, cyclic=True) == [6, 0] and between(1, 5, 7, cyclic=True) == []  # 1 → 5 is the long way
    assert between(0, 6, 12, cyclic=True) == [1, 2, 3, 4, 5] and between(3, 4, 7, cyclic=True) == []
    assert between(5, 1, 7, cyclic=False) == between(1, 5, 7, cyclic=False) == [2, 3, 4]
    assert adjacent_pairs([0, 1, 3, 6], 7, cyclic=True) == [(0, 1), (6, 0)]
    assert adjacent_pairs([0, 1, 3, 6], 7, cyclic=False) == [(0, 1)]


def test_model_facts_on_a_tiny_run(tiny_cfg, tmp_path):
    with pytest.raises(SystemExit, match="run pipeline stage=extract first"):
        model_facts(tmp_path / "nowhere")
    cfg = tiny_cfg("extract.classes=answer")  # every class present, so every measure has pairs
    extract.run(cfg)
    out = model_facts(cfg.paths.run_dir, n_carriers=3, n_pairs=5, seed=0)
    assert set(out) == {"model", "layer", "tasks"} and out["layer"] == 1
    assert set(out["tasks"]) == {"weekdays", "months"}
    for task, f in out["tasks"].items():
        assert set(f) == {"n_classes", "ring", "midpoint", "mixture"}, task
        assert f["n_classes"] == {"weekdays": 7, "months": 12}[task]
        assert set(f["ring"]) == {"pc12_share", "angular_steps", "monotone", "winding_deg", "radius_cv"}
        assert 0 <= f["ring"]["pc12_share"] <= 1 + 1e-9 and len(f["ring"]["angular_steps"]) == f["n_classes"]
        m, x = f["midpoint"], f["mixture"]
        assert m["pairs"] == 5 and x["nonadjacent_pairs"] == 5 and x["adjacent_pairs"] == f["n_classes"]
        shares = [m["between"], m["endpoints"], m["other"], m["between_chance"], x["adjacent"], x["nonadjacent"]]
        assert all(0 <= s <= 1 for s in shares), shares
        assert m["between"] + m["endpoints"] + m["other"] <= 1 + 1e-6
        assert x["adjacent"] <= 0.5 + 1e-6 and x["nonadjacent"] <= 0.5 + 1e-6
    again = model_facts(cfg.paths.run_dir, ["months"], n_carriers=3, n_pairs=5, seed=0)  # seeded: the same numbers
    assert again["tasks"] == {"months": out["tasks"]["months"]}
