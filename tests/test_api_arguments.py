"""The public Python API refuses arguments it cannot use, naming the call, the argument and what it takes,
before torch fails deep inside or returns garbage; the forms it documents still work."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from geosteer import GAGA, PCA, GeodesicBridge, GeometryMismatch, InnSteer, lbfgs_geodesic, linear_path, path_energy, pullback_of
from geosteer.models.hub import seal

D = 6


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    gaga = GAGA(D, 2, hidden=[8]).eval()
    flow = InnSteer(D, 3, num_blocks=2, hidden=8).eval()
    bridge = GeodesicBridge(D, hidden=[8]).eval()
    return gaga, flow, bridge, torch.randn(4, D)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GAGA(input_dim="a", latent_dim=2), r"GAGA: input_dim='a' must be an integer ≥ 1\."),
        (lambda: GAGA(D, 0), r"GAGA: latent_dim=0 must be an integer ≥ 1\."),
        (lambda: GAGA(D, 2, pca_dim=0), r"GAGA: pca_dim=0 must be an integer ≥ 1 \(or None\)\."),
        (lambda: GAGA(D, 2, pca_dim=D + 1), rf"GAGA: pca_dim={D + 1} exceeds input_dim={D}.*pass None"),
        (lambda: GAGA(D, 2, hidden=[4, 0]), r"GAGA: hidden=\[4, 0\] must be a list of layer widths"),
        (lambda: GAGA(D, True), r"GAGA: latent_dim=True must be an integer"),
        (lambda: InnSteer(D, 0), r"InnSteer: num_classes=0 must be an integer ≥ 1\."),
        (lambda: InnSteer(D, 3, num_blocks=0, hidden=-2), r"InnSteer: num_blocks=0, hidden=-2 must be an integer ≥ 1\."),
        (lambda: InnSteer(D, 3, depth=-1), r"InnSteer: depth=-1 must be an integer ≥ 0\."),
        (lambda: InnSteer(D, 3, clamp=float("nan")), r"InnSteer: clamp=nan must be a finite number > 0\."),
        (lambda: GeodesicBridge(0), r"GeodesicBridge: input_dim=0 must be an integer ≥ 1\."),
        (lambda: GeodesicBridge(D, hidden=8), r"GeodesicBridge: hidden=8 must be a list of layer widths"),
    ],
)
def test_constructors_refuse_sizes_they_cannot_build(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_integers_build_as_python_ones():
    a, b = GAGA(np.int64(D), np.int32(2), hidden=[np.int64(8)]), GAGA(D, 2, hidden=[8])
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_geometry_methods_refuse_what_they_cannot_use(nets):
    gaga, flow, bridge, h = nets
    with pytest.raises(GeometryMismatch, match=r"GAGA.decode takes latents \(B, 2\); got \(3, 5\)"):
        gaga.decode(torch.randn(3, 5))
    assert gaga.decode(torch.randn(3, 2)).shape == (3, D)
    with pytest.raises(GeometryMismatch, match=rf"InnSteer.inverse takes latents \(B, {D}\); got \(3, 5\)"):
        flow.inverse(torch.randn(3, 5))
    for steps in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"InnSteer.geodesic: steps={steps!r} must be an integer ≥ 1"):
            flow.geodesic(h, h.flip(0), steps)
    with pytest.raises(ValueError, match=r"InnSteer.geodesic: x_a and x_b must be of one shape"):
        flow.geodesic(h, h[:2], 3)
    for alpha in (float("nan"), float("inf"), torch.tensor([0.0, float("nan")])):
        with pytest.raises(TypeError, match=r"alpha=.* must be a finite number, or a 1-D tensor of them"):
            flow.steer(h, 0, 1, alpha)
    for t in ([0.0, 1.5], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match=r"the bridge's times t must lie in \[0, 1\]"):
            bridge(h, h.flip(0), t)
    _, velocity = bridge.velocity(h, h.flip(0), torch.linspace(0, 1, 3))  # the check passes under forward-mode AD
    torch.testing.assert_close(velocity, h.flip(0).unsqueeze(1).expand(-1, 3, -1) - h.unsqueeze(1))  # untrained: chord


def test_the_exported_helpers_refuse_bad_arguments(nets):
    gaga, _, _, h = nets
    metric = pullback_of(gaga)
    with pytest.raises(ValueError, match=r"linear_path: n_steps=0 must be an integer ≥ 1"):
        linear_path(h, h, 0)
    with pytest.raises(ValueError, match=r"linear_path: x_a must be a floating tensor \(…, D\); got list"):
        linear_path([0.0], [1.0], 3)
    with pytest.raises(ValueError, match=r"linear_path: x_a and x_b must be of one shape and dtype"):
        linear_path(h, h[:, :3], 3)
    with pytest.raises(TypeError, match=r"lbfgs_geodesic: metric must be a models.metrics.Metric"):
        lbfgs_geodesic(h, h.flip(0), "flat", 4)
    with pytest.raises(ValueError, match=r"lbfgs_geodesic: max_iter=0 must be an integer ≥ 1"):
        lbfgs_geodesic(h, h.flip(0), metric, 4, max_iter=0)
    with pytest.raises(ValueError, match=r"lbfgs_geodesic: tolerance=-1 must be a finite number ≥ 0"):
        lbfgs_geodesic(h, h.flip(0), metric, 4, tolerance=-1)
    with pytest.raises(ValueError, match=r"lbfgs_geodesic: init must be one path per pair, of shape \(4, 5, 6\)"):
        lbfgs_geodesic(h, h.flip(0), metric, 4, init=torch.zeros(4, 3, D))
    torch.testing.assert_close(lbfgs_geodesic(h, h.flip(0), metric, 1), linear_path(h, h.flip(0), 1))  # no inner point
    with pytest.raises(TypeError, match=r"pullback_of takes a geometry with an encoder .* got str"):
        pullback_of("gaga")
    with pytest.raises(ValueError, match=r"lam=nan must be a finite number ≥ 0"):
        pullback_of(gaga, lam=float("nan"))
    with pytest.raises(ValueError, match=r"path_energy: path must be a floating tensor \(P, T, D\)"):
        path_energy(h, metric)
    with pytest.raises(ValueError, match=r"PCA.fit: k=0 must be an integer ≥ 1"):
        PCA.fit(h, 0)
    with pytest.raises(ValueError, match=r"PCA.fit: x holds 1 row\(s\)"):
        PCA.fit(h[:1], 2)


def test_a_saved_geometry_is_readable_as_open_makes_files_and_seals_without_meta(tmp_path):
    """A network built by hand (no meta) saves and seals; model.safetensors gets the umask's mode, as config.json
    does, so a group that shares the run can read it."""
    GAGA(D, 2, hidden=[8]).save_pretrained(tmp_path)
    seal(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
