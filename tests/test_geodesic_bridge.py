"""GeodesicBridge: exact endpoints, the forward-mode velocity, batching, export, the energy estimators, the
training system's properties, and stage=train geometry=bridge (export, reload, W&B, resume, DDP, refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from geosteer.models.gaga import GAGA
from geosteer.models.geodesic_bridge import (
    GeodesicBridge,
    chord,
    drift,
    knn_mean_distance,
    pullback_speed2,
    secant_energy,
    speed_energy,
    stratified_times,
)
from geosteer.models.hub import GeometryMismatch, load_geometry
from geosteer.pipeline import train
from geosteer.pipeline.bridge import BridgeSystem
from geosteer.pipeline.common import StageError
from tests.conftest import reloads_alike_in_a_fresh_process, run_model_card, wandb_history, wandb_records


def _bridge(d: int = 6, seed: int = 0, meta: dict | None = None) -> GeodesicBridge:
    torch.manual_seed(seed)
    bridge = GeodesicBridge(d, hidden=[32, 32], meta=meta)
    bridge.fit_normalisation(torch.randn(100, d) * 3 + 1)
    with torch.no_grad():  # a trained-looking bridge: the bump is on
        bridge.gain.fill_(0.7)
        bridge.mlp[-1].weight.normal_(0, 0.05)
        bridge.mlp[-1].bias.normal_(0, 0.05)
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
    assert loaded.meta.pop("digest") and loaded.meta == meta, "as given, sealed"
    x_a, x_b, t = torch.randn(2, 6), torch.randn(2, 6), torch.linspace(0, 1, 5)
    assert torch.equal(loaded(x_a, x_b, t), bridge(x_a, x_b, t))


def test_pullback_speed_of_a_linear_encoder_is_the_quadratic_form_of_ata():
    torch.manual_seed(1)
    A = torch.randn(3, 6, dtype=torch.float64)
    bridge = _bridge().double()
    x_a, x_b, t = (
        torch.randn(4, 6, dtype=torch.float64),
        torch.randn(4, 6, dtype=torch.float64),
        torch.linspace(0, 1, 5, dtype=torch.float64),
    )
    curve, velocity = bridge.velocity(x_a, x_b, t)
    expected = torch.einsum("ptd,de,pte->pt", velocity, A.T @ A, velocity)  # γ̇ᵀ(AᵀA)γ̇
    torch.testing.assert_close(pullback_speed2(lambda x: x @ A.T, curve, velocity), expected)


def test_pullback_speed_through_a_gaga_encoder_matches_its_reverse_mode_jacobian():
    from geosteer.models.metrics import EncoderPullback

    torch.manual_seed(2)
    gaga = GAGA(6, 3, hidden=[16, 8]).double().eval()
    curve, velocity = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    J = EncoderPullback(gaga.encode).jacobian(curve.reshape(8, 6))  # (8, 3, 6), one reverse pass per row
    expected = (J @ velocity.reshape(8, 6, 1)).squeeze(-1).pow(2).sum(1).view(2, 4)
    torch.testing.assert_close(pullback_speed2(gaga.encode, curve, velocity), expected)


def _identity_gaga(d: int) -> GAGA:
    """A GAGA whose encoder and decoder are the identity: G_E = I and every point reconstructs exactly."""
    gaga = GAGA(d, d, hidden=[])
    with torch.no_grad():
        for layer in (gaga.encoder[0], gaga.decoder[0]):
            layer.weight.copy_(torch.eye(d))
            layer.bias.zero_()
    return gaga.eval()


def _fit(system, batches, epochs: int, **trainer_args) -> None:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **trainer_args)  # fmt: skip
    trainer.fit(system, DataLoader(batches, batch_size=None))


def test_a_bridge_trained_on_the_identity_metric_returns_to_the_chord():
    """Under G = I the energy ∫‖γ̇‖² is minimised by the constant-speed chord: a bent bridge must straighten."""
    torch.manual_seed(3)
    data = torch.randn(256, 6)
    bridge = _bridge()  # the bump is on: the curves start well off the chord
    x_a, x_b = torch.randn(8, 6), torch.randn(8, 6)
    t = torch.linspace(0, 1, 11)
    span = (x_b - x_a).norm(dim=1, keepdim=True)
    straight = chord(x_a, x_b, t)
    with torch.no_grad():
        assert ((bridge(x_a, x_b, t) - straight).norm(dim=2) / span).max() > 0.05, "the test starts from a bent bridge"
    system = BridgeSystem(bridge, _identity_gaga(6), data, times=16, density=0.0, manifold=0.0, lr=3e-3, seed=0)
    _fit(system, [{"x": data[torch.randperm(256, generator=torch.Generator().manual_seed(i))[:64]]} for i in range(40)], 20)
    with torch.no_grad():
        deviation = (bridge(x_a, x_b, t) - straight).norm(dim=2) / span  # (P, T)
    assert deviation.max() < 0.01


def test_the_encoder_stays_frozen_and_in_eval_mode_through_training():
    torch.manual_seed(5)
    data = torch.randn(128, 6)
    gaga = GAGA(6, 3, hidden=[16])
    gaga.fit_normalisation(data)
    gaga.train()(data)  # running statistics that differ from a fresh BatchNorm's
    before = {k: v.clone() for k, v in gaga.state_dict().items()}
    system = BridgeSystem(_bridge(), gaga, data, times=8, seed=0)
    _fit(system, [{"x": data[i * 32 : (i + 1) * 32]} for i in range(4)], 2)
    assert not gaga.training and all(torch.equal(v, gaga.state_dict()[k]) for k, v in before.items())
    assert system.hparams.seed == 0 and BridgeSystem(_bridge(), gaga, data).hparams.seed == torch.initial_seed()


def test_the_hinges_are_dimensionless_and_the_on_manifold_one_is_zero_on_the_chord():
    torch.manual_seed(6)
    data = torch.randn(200, 6)
    gaga = GAGA(6, 2, hidden=[16]).eval()
    gaga.fit_normalisation(data)
    system = BridgeSystem(GeodesicBridge(6, hidden=[16]), gaga, data, times=8, seed=0)  # untrained: the chord
    x_a, x_b = data[:10], data[10:20]
    u = torch.linspace(0, 1, 9)
    with torch.no_grad():
        terms = system.terms(x_a, x_b, u)
        inner = chord(x_a, x_b, u)[:, 1:-1].reshape(-1, 6)
        n = knn_mean_distance(inner, data, 5)
    assert terms["manifold"] == 0, "the chord is never further off the manifold than itself"
    torch.testing.assert_close(terms["density"], torch.relu(n / system.n0 - 1).mean())
    torch.testing.assert_close(terms["energy"], torch.tensor(1.0), msg="the chord's energy relative to the chord")
    system.bridge = _bridge()  # bent: the curve leaves the chord and the hinge wakes up
    with torch.no_grad():
        assert system.terms(x_a, x_b, u)["manifold"] > 0


def test_both_energy_estimators_converge_to_the_same_integral_on_a_smooth_encoder():
    torch.manual_seed(7)
    encode = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    bridge = _bridge().double()
    x_a, x_b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    u = torch.linspace(0, 1, 4001, dtype=torch.float64)
    with torch.no_grad():
        secant = secant_energy(encode, bridge(x_a, x_b, u), u, lam=0.1)
    curve, velocity = bridge.velocity(x_a, x_b, 0.5 * (u[1:] + u[:-1]))
    torch.testing.assert_close(speed_energy(encode, curve, velocity, lam=0.1).detach(), secant, rtol=1e-5, atol=0)
    # A linear encoder on the chord: both are ‖A(x_b − x_a)‖² + λ‖x_b − x_a‖² exactly, on any grid.
    A = torch.randn(3, 6, dtype=torch.float64)
    straight, coarse = chord(x_a, x_b, u[::800]), u[::800]
    exact = ((x_b - x_a) @ A.T).pow(2).sum(1) + 0.1 * (x_b - x_a).pow(2).sum(1)
    torch.testing.assert_close(secant_energy(lambda x: x @ A.T, straight, coarse, lam=0.1), exact)


def test_on_random_grids_only_the_secant_gradient_sees_the_cost_of_crossing_into_another_relu_region():
    """E(x) = relu(x₂); γ_θ(t) = chord + 4t(1−t)·θ·e₂ from (0, −1) to (1, 1), so the energy is
    ∫_{t*}^1 γ̇₂² dt with γ₂(t*) = 0, and dE/dθ = ∫_{t*}^1 ∂(γ̇₂²)/∂θ dt − γ̇₂(t*)² dt*/dθ (scipy quadrature).
    The second part is what crossing into the region where E is non-zero costs. Autograd of the secant on a
    stratified random grid has the whole derivative as its mean; autograd of the jvp speed only the first part."""
    from scipy.integrate import quad
    from scipy.optimize import brentq

    theta = 0.3
    position = lambda t: -1 + 2 * t + 4 * t * (1 - t) * theta  # noqa: E731  γ₂
    speed = lambda t: 2 + 4 * theta * (1 - 2 * t)  # noqa: E731  γ̇₂
    t_star = brentq(position, 0, 1)
    inside = quad(lambda t: 2 * speed(t) * 4 * (1 - 2 * t), t_star, 1)[0]
    crossing = -(speed(t_star) ** 2) * (-4 * t_star * (1 - t_star) / speed(t_star))  # dt*/dθ = −(∂γ₂/∂θ)/γ̇₂
    encode = lambda x: torch.relu(x[:, 1:2])  # noqa: E731
    x_a, x_b = torch.tensor([[0.0, -1.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    e2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    secant, jvp = [], []
    for _ in range(1000):
        u = stratified_times(32, generator, th)
        curve = chord(x_a, x_b, u) + (4 * u * (1 - u)).view(1, -1, 1) * th * e2
        velocity = (x_b - x_a).view(1, 1, 2) + (4 - 8 * u).view(1, -1, 1) * th * e2
        secant.append(torch.autograd.grad(secant_energy(encode, curve, u, 0).sum(), th, retain_graph=True)[0])
        jvp.append(torch.autograd.grad(speed_energy(encode, curve[:, 1:-1], velocity[:, 1:-1], 0).sum(), th)[0])
    for grads, expected in ((torch.stack(secant), inside + crossing), (torch.stack(jvp), inside)):
        error = 4 * grads.std() / len(grads) ** 0.5 + 0.01  # four standard errors, plus the grid's O(1/T²) bias
        assert abs(grads.mean().item() - expected) < error
    assert abs(crossing) > 2, "the missed part is large: the jvp gradient points the other way"


def test_knn_distance_matches_scipy_and_drift_is_the_worst_gap_over_the_chord():
    from scipy.spatial import cKDTree

    torch.manual_seed(4)
    data, points = torch.randn(200, 5, dtype=torch.float64), torch.randn(30, 5, dtype=torch.float64)
    expected = cKDTree(data.numpy()).query(points.numpy(), k=5)[0].mean(1)
    torch.testing.assert_close(knn_mean_distance(points, data, 5), torch.from_numpy(expected))
    own = cKDTree(data.numpy()).query(data.numpy(), k=6)[0][:, 1:].mean(1)  # without each point itself
    torch.testing.assert_close(knn_mean_distance(data, data, 5, exclude_self=True), torch.from_numpy(own))
    # Its gradient equals the one through the whole distance matrix (exact mode), though that matrix never has one.
    x = points.clone().requires_grad_()
    whole = torch.cdist(x, data, compute_mode="donot_use_mm_for_euclid_dist").topk(5, dim=1, largest=False).values
    (reference,) = torch.autograd.grad(whole.mean(1).sum(), x)
    (grad,) = torch.autograd.grad(knn_mean_distance(x, data, 5).sum(), x)
    torch.testing.assert_close(grad, reference)
    # Data on the x-axis; a curve from (0,0) to (4,0) through (2,1): worst gap 1, chord 4.
    line = torch.stack([torch.linspace(0, 4, 401), torch.zeros(401)], 1).double()
    curve = torch.tensor([[[0.0, 0.0], [1.0, 0.5], [2.0, 1.0], [3.0, 0.5], [4.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(drift(curve, line), torch.tensor([0.25], dtype=torch.float64))
    torch.testing.assert_close(drift(line[::100].unsqueeze(0), line), torch.zeros(1, dtype=torch.float64))


# ---------------------------------------------------------------- stage=train geometry=bridge


def test_bridge_trains_after_its_encoder_exports_reloads_and_logs(prepared, tmp_path):
    cfg = prepared("bridge", "logger=wandb", geometries=("bridge", "gaga_out"))  # listed first, trained second
    result = train.run(cfg)
    assert list(result["geometries"]["weekdays"]) == ["gaga_out", "bridge"]
    r = result["geometries"]["weekdays"]["bridge"]
    assert r["energy_vs_lbfgs_median"] > 0 and r["drift_median_lbfgs"] > 0 and r["eval_pairs"] == 8
    assert r["bridge_ms_per_pair"] < r["lbfgs_ms_per_pair"]
    folder = Path(r["path"])
    meta = json.loads((folder / "config.json").read_text())["meta"]
    encoder_fp = json.loads((folder.parent / "gaga_out" / "config.json").read_text())["meta"]["fingerprint"]
    assert meta["needs"]["encoder"] == {"geometry": "gaga_out", "fingerprint": encoder_fp, "path": "geometry/weekdays/gaga_out"}
    bridge = GeodesicBridge.from_pretrained(folder)
    x_a, x_b, t = torch.randn(3, 32), torch.randn(3, 32), torch.linspace(0, 1, 5)
    assert reloads_alike_in_a_fresh_process(folder, (x_a, x_b, t), bridge(x_a, x_b, t).detach(), tmp_path, "__call__")
    assert (folder / "training.png").is_file()
    assert run_model_card(folder, x_a=x_a, x_b=x_b)["path"].shape == (3, 17, 32), "the model card's example runs"
    runs = [wandb_history(wandb_records(d)) for d in (Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*")]
    (history,) = [h for h in runs if any("train/energy" in row for row in h)]
    keys = set().union(*history)
    assert {"train/energy", "train/density", "train/manifold", "train/gain", "val/energy", "val/energy_jvp",
            "val/manifold", "val/drift_median", "final/energy_vs_lbfgs_median", "final/drift_vs_lbfgs"} <= keys  # fmt: skip
    # Current: nothing is redone. A retrained encoder makes the bridge stale.
    assert train.run(cfg)["geometries"] == result["geometries"]
    train.run(prepared("bridge", "geometry.gaga_out.optim.lr=2e-3", "overwrite=true", geometries=("gaga_out",)))
    with pytest.raises(StageError, match="weekdays/bridge .*made by a different config"):
        train.run(prepared("bridge", "geometry.gaga_out.optim.lr=2e-3", geometries=("gaga_out", "bridge")))


def test_a_bridge_without_its_trained_encoder_is_refused_naming_the_fix(prepared):
    cfg = prepared("bridge_alone", geometries=("bridge",))
    with pytest.raises(StageError, match=r"trains against the encoder 'gaga_out', which is neither selected nor "
                                         r"exported in this run. Select both \(geometry=\[gaga_out,bridge\]\)"):  # fmt: skip
        train.run(cfg)
    assert not (Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "bridge").exists()


def test_an_encoder_of_another_layer_or_width_is_refused_naming_both(tmp_path):
    GAGA(32, 7, hidden=[16], meta={"layer": 2, "family": "gaga"}).save_pretrained(tmp_path)
    encoder = load_geometry(tmp_path, d=32, layer=2)
    assert isinstance(encoder, GAGA) and encoder.meta["layer"] == 2 and not encoder.training
    with pytest.raises(
        GeometryMismatch, match=r"trained on d=32 activations of layer 2, but its activations here are d=32 at layer 1"
    ):
        load_geometry(tmp_path, d=32, layer=1)
    with pytest.raises(GeometryMismatch, match=r"its activations here are d=64"):
        load_geometry(tmp_path, d=64, layer=2)


class _CrashBridgeAt(L.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        if isinstance(module, BridgeSystem) and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_crashed_bridge_resumes_from_last_ckpt_and_matches_an_uninterrupted_one(prepared):
    crashed = prepared("bridge_crashed", geometries=("gaga_out", "bridge"), epochs=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(crashed, callbacks=[_CrashBridgeAt(1)])
    resumed = train.run(crashed)["geometries"]["weekdays"]["bridge"]
    clean = train.run(prepared("bridge_clean", geometries=("gaga_out", "bridge"), epochs=4))["geometries"]["weekdays"]["bridge"]
    assert resumed["epochs"] == clean["epochs"] == 4
    a, b = (load_file(Path(r["path"]) / "model.safetensors") for r in (resumed, clean))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bridge_ddp_smoke_run_on_two_processes(prepared):
    cfg = prepared("bridge_ddp", "trainer=ddp_sim", geometries=("gaga_out", "bridge"), epochs=2)
    result = train.run(cfg)["geometries"]["weekdays"]["bridge"]
    assert result["trainer"] == "ddp_spawn" and result["epochs"] == 2 and result["energy_vs_lbfgs_median"] > 0
