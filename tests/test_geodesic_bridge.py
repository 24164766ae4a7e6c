"""GeodesicBridge, the curve network: exact endpoints, the forward-mode velocity, batching, export."""

from __future__ import annotations

import torch

from models.geodesic_bridge import GeodesicBridge, pullback_speed2


def _bridge(d: int = 6, seed: int = 0, meta: dict | None = None) -> GeodesicBridge:
    torch.manual_seed(seed)
    bridge = GeodesicBridge(d, hidden=[32, 32], meta=meta)
    bridge.fit_normalisation(torch.randn(100, d) * 3 + 1)
    with torch.no_grad():
        bridge.gain.fill_(0.7)  # a trained-looking bridge: the bump is on
    return bridge


def test_an_untrained_bridge_is_the_chord():
    bridge = GeodesicBridge(5, hidden=[16])
    x_a, x_b, t = torch.randn(3, 5), torch.randn(3, 5), torch.linspace(0, 1, 7)
    chord = (1 - t)[None, :, None] * x_a[:, None] + t[None, :, None] * x_b[:, None]
    torch.testing.assert_close(bridge(x_a, x_b, t), chord)


def test_endpoints_are_exact_whatever_the_network():
    bridge = _bridge()
    x_a, x_b = torch.randn(4, 6) * 5, torch.randn(4, 6) * 5
    curve = bridge(x_a, x_b, torch.linspace(0, 1, 9))
    assert torch.equal(curve[:, 0], x_a) and torch.equal(curve[:, -1], x_b)
    assert (curve[:, 4] - (x_a + x_b) / 2).norm() > 1e-3, "the bump is on between the ends"


def test_the_jvp_velocity_equals_a_finite_difference():
    bridge = _bridge().double()
    x_a, x_b = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    curve, velocity = bridge.velocity(x_a, x_b, t)
    torch.testing.assert_close(curve, bridge(x_a, x_b, t))
    eps = 1e-6
    central = (bridge(x_a, x_b, t + eps) - bridge(x_a, x_b, t - eps)) / (2 * eps)
    torch.testing.assert_close(velocity, central, atol=1e-8, rtol=1e-6)


def test_a_batch_of_pairs_equals_one_pair_at_a_time():
    bridge = _bridge()
    x_a, x_b, t = torch.randn(5, 6), torch.randn(5, 6), torch.linspace(0, 1, 4)
    batch = bridge(x_a, x_b, t)
    for p in range(5):
        torch.testing.assert_close(batch[p], bridge(x_a[p : p + 1], x_b[p : p + 1], t)[0])


def test_export_and_import_are_bit_identical(tmp_path):
    meta = {"encoder": "geometry/weekdays/gaga_out"}
    bridge = _bridge(meta=meta)
    bridge.save_pretrained(tmp_path)
    loaded = GeodesicBridge.from_pretrained(tmp_path)
    assert loaded.meta == meta
    x_a, x_b, t = torch.randn(2, 6), torch.randn(2, 6), torch.linspace(0, 1, 5)
    assert torch.equal(loaded(x_a, x_b, t), bridge(x_a, x_b, t))


def test_pullback_speed_of_a_linear_encoder_is_the_quadratic_form_of_ata():
    torch.manual_seed(1)
    A = torch.randn(3, 6, dtype=torch.float64)
    bridge = _bridge().double()
    x_a, x_b, t = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64), torch.linspace(0, 1, 5, dtype=torch.float64)
    curve, velocity = bridge.velocity(x_a, x_b, t)
    expected = torch.einsum("ptd,de,pte->pt", velocity, A.T @ A, velocity)  # γ̇ᵀ(AᵀA)γ̇
    torch.testing.assert_close(pullback_speed2(lambda x: x @ A.T, curve, velocity), expected)


def test_pullback_speed_through_a_gaga_encoder_matches_its_reverse_mode_jacobian():
    from models.gaga import GAGA
    from models.metrics import EncoderPullback

    torch.manual_seed(2)
    gaga = GAGA(6, 3, hidden=[16, 8]).double().eval()
    curve, velocity = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    J = EncoderPullback(gaga.encode).jacobian(curve.reshape(8, 6))  # (8, 3, 6), one reverse pass per row
    expected = (J @ velocity.reshape(8, 6, 1)).squeeze(-1).pow(2).sum(1).view(2, 4)
    torch.testing.assert_close(pullback_speed2(gaga.encode, curve, velocity), expected)


def test_a_bridge_trained_on_the_identity_metric_returns_to_the_chord():
    """Under G = I the energy ∫‖γ̇‖² is minimised by the constant-speed chord: a bent bridge must straighten."""
    import lightning as L
    from torch.utils.data import DataLoader

    from pipeline.bridge import BridgeSystem

    torch.manual_seed(3)
    data = torch.randn(256, 6)
    bridge = _bridge()  # the bump is on: the curves start well off the chord
    x_a, x_b = torch.randn(8, 6), torch.randn(8, 6)
    t = torch.linspace(0, 1, 11)
    span = (x_b - x_a).norm(dim=1, keepdim=True)
    straight = (1 - t)[None, :, None] * x_a[:, None] + t[None, :, None] * x_b[:, None]
    with torch.no_grad():
        assert ((bridge(x_a, x_b, t) - straight).norm(dim=2) / span).max() > 0.05, "the test starts from a bent bridge"
    system = BridgeSystem(bridge, encode=lambda x: x, reconstruct=None, data=data, density=0.0, manifold=0.0, lr=3e-3)
    batches = [{"x": data[torch.randperm(256, generator=torch.Generator().manual_seed(i))[:64]]} for i in range(40)]
    trainer = L.Trainer(max_epochs=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(system, DataLoader(batches, batch_size=None))
    with torch.no_grad():
        deviation = (bridge(x_a, x_b, t) - straight).norm(dim=2) / span  # (P, T)
    assert deviation.max() < 0.01


def test_knn_distance_matches_scipy_and_drift_is_the_worst_gap_over_the_chord():
    from scipy.spatial import cKDTree

    from pipeline.bridge import drift, knn_mean_distance

    torch.manual_seed(4)
    data, points = torch.randn(200, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    expected = cKDTree(data.numpy()).query(points.numpy(), k=5)[0].mean(1)
    torch.testing.assert_close(knn_mean_distance(points, data, 5), torch.from_numpy(expected))
    own = cKDTree(data.numpy()).query(data.numpy(), k=6)[0][:, 1:].mean(1)  # without each point itself
    torch.testing.assert_close(knn_mean_distance(data, data, 5, exclude_self=True), torch.from_numpy(own))
    # Data on the x-axis; a curve from (0,0) to (4,0) through (2,1): worst gap 1, chord 4.
    line = torch.stack([torch.linspace(0, 4, 401), torch.zeros(401)], 1).double()
    curve = torch.tensor([[[0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [3.0, 0.5], [4.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(drift(curve, line), torch.tensor([0.25], dtype=torch.float64))
    assert drift(line[::100].unsqueeze(0), line).item() == 0.0
