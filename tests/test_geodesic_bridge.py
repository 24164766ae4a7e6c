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
