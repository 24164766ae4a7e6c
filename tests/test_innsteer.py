"""INNSteer: invertibility and log-det properties of every supported block, steering algebra, the
pullback metric, the objective, and stage=train geometry=innsteer (export, reload, DDP, the NaN guard)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from geosteer.models.innsteer import BLOCKS, InnSteer
from geosteer.models.metrics import metric_matrix, pullback_of
from geosteer.models.steering import steering_pairs
from geosteer.pipeline import train
from geosteer.pipeline.common import StageError
from geosteer.pipeline.innsteer import classes_of, nll, soft_centres
from tests.conftest import SpoilAt, reloads_alike_in_a_fresh_process, run_model_card, wandb_history, wandb_records


def _flow(block: str, pca_dim: int | None, d: int = 10, seed: int = 0) -> tuple[InnSteer, torch.Tensor]:
    """A flow whose couplings are well away from the identity (its log-det varies by point), fitted to
    anisotropic, shifted data. Much larger random weights make z explode and float32 round trips lose digits."""
    torch.manual_seed(seed)
    h = torch.randn(64, d) * torch.linspace(0.5, 4, d) + 3
    model = InnSteer(d, num_classes=3, pca_dim=pca_dim, block=block, num_blocks=4, hidden=32, seed=seed)
    model.fit_normalisation(h)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # AllInOneBlock's permutation matrices are frozen parameters: leave them
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), h


@pytest.mark.parametrize("pca_dim", [None, 6])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_block_inverts_exactly_and_its_log_det_is_the_autograd_one(block, pca_dim):
    model, h = _flow(block, pca_dim)
    z, log_det = model(h)
    assert log_det.std() > 0.05, "the couplings must be far enough from the identity to test anything"
    x = model.ambient(h)
    back, inv_log_det = model.inverse(z)
    assert ((back - x).norm(dim=1) / x.norm(dim=1)).max() < 1e-5, "float32 round trip"
    torch.testing.assert_close(inv_log_det, -log_det, atol=1e-4, rtol=0)
    # log|det ∂z/∂a| against torch autograd's full Jacobian, in float64.
    m64 = model.double()
    a = m64.ambient(h[:3].double())
    for i in range(3):
        J = torch.autograd.functional.jacobian(lambda v: m64.flow(((v - m64.shift) / m64.scale)[None])[0][0], a[i])
        expected = torch.linalg.slogdet(J).logabsdet
        assert m64.inverse(m64.flow(((a[i] - m64.shift) / m64.scale)[None])[0])[1].item() == pytest.approx(
            -expected.item(), abs=1e-8
        )
        assert m64(h[i : i + 1].double())[1].item() == pytest.approx(expected.item(), abs=1e-8)


@pytest.mark.parametrize("pca_dim", [None, 6])
def test_steer_moves_the_latent_by_the_mean_difference_and_nothing_else(pca_dim):
    model, h = _flow("all_in_one", pca_dim)
    model = model.double()
    h = h.double()
    model.fit_normalisation(h)  # a float64 PCA basis, orthonormal to 1e-16
    with torch.no_grad():
        model.means.copy_(torch.randn_like(model.means))
    delta = model.means[2] - model.means[0]
    alphas = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    steered = model.steer(h, 0, 2, alphas)  # (3, B, d)
    torch.testing.assert_close(steered[0], h, atol=1e-10, rtol=0)
    for a, s in zip(alphas, steered):
        torch.testing.assert_close(model.encode(s), model.encode(h) + a * delta, atol=1e-9, rtol=0)
        torch.testing.assert_close(model.steer(h, 0, 2, float(a)), s)  # one α equals its slice of a batch
    if pca_dim is not None:  # only the PCA subspace moves: the off-subspace part of each carrier stays
        P = model.pca_components
        moved = steered[2] - h
        torch.testing.assert_close(moved - (moved @ P.T) @ P, torch.zeros_like(h), atol=1e-10, rtol=0)
    per_row = model.steer(h[:4], torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2]), 1.0)
    torch.testing.assert_close(per_row[3], model.steer(h[3:4], 0, 2, 1.0)[0])
    own = model.classify(model.encode(h))  # source None: each row from the class the flow gives it
    assert own.unique().numel() > 1, "the rows must fall in several classes to test anything"
    torch.testing.assert_close(model.steer(h, None, 1, 0.5), model.steer(h, own, 1, 0.5), atol=0, rtol=0)


def test_a_class_without_training_points_is_neither_classified_nor_steered_to():
    """A class whose mean the flow never learned (no training point had it) is not any point's class and cannot be
    a source or target; the learned classes steer as before."""
    model, h = _flow("glow", None)
    z = model.encode(h)
    with torch.no_grad():
        model.means.copy_(z[:3])  # each of three points sits on a class mean
    assert model.classify(z[:3]).tolist() == [0, 1, 2]
    model.meta = {"metrics": {"classes_trained": [0, 2]}, "concepts": {"values": ["Heads", "Edge", "Tails"]}}
    assert model.known_classes == [0, 2] and 1 not in model.classify(z).tolist()
    assert model.classify(z[1:2]).item() in (0, 2)
    for kwargs in ({"source": 0, "target": 1}, {"source": 1, "target": 2}, {"source": torch.tensor([0, 1]), "target": 2}):
        with pytest.raises(ValueError, match=r"learned no latent mean for class\(es\) \['Edge'\]"):
            model.steer(h[:2], **kwargs)
    torch.testing.assert_close(
        model.encode(model.steer(h[:2], 0, 2)), z[:2] + model.means[2] - model.means[0], atol=1e-4, rtol=1e-4
    )


def test_the_picklable_activations_equal_freias_and_the_flow_pickles():
    import pickle

    import FrEIA.modules as Fm

    from geosteer.models.innsteer import atan_clamp, softplus_global_scale

    a = torch.linspace(-20, 20, 401)
    reference = Fm.AllInOneBlock([(4,)], subnet_constructor=lambda i, o: torch.nn.Linear(i, o))
    torch.testing.assert_close(softplus_global_scale(a), reference.global_scale_activation(a), atol=0, rtol=0)
    reference = Fm.GLOWCouplingBlock([(4,)], subnet_constructor=lambda i, o: torch.nn.Linear(i, o))
    torch.testing.assert_close(atan_clamp(a), reference.f_clamp(a), atol=0, rtol=0)
    for block in BLOCKS:
        model, h = _flow(block, None)
        copy = pickle.loads(pickle.dumps(model))  # what ddp_spawn does to the system
        assert torch.equal(copy.encode(h), model.encode(h))


def test_permutations_are_seeded_and_leave_numpys_global_state_alone():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = InnSteer(8, 2, block="glow", num_blocks=3, seed=5).state_dict()
    b = InnSteer(8, 2, block="glow", num_blocks=3, seed=5).state_dict()
    assert np.array_equal(np.random.get_state()[1], state)
    perms = [k for k in a if k.endswith(".perm")]
    assert perms and all(torch.equal(a[k], b[k]) for k in perms)
    c = InnSteer(8, 2, block="glow", num_blocks=3, seed=6).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in perms)


def test_pullback_metric_of_the_flow_is_its_jacobian_gram():
    model, h = _flow("rnvp", 6)
    model = model.double()
    x = h[:2].double()
    G = metric_matrix(pullback_of(model), x)  # (2, d, d)
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda v: model.encode(v[None])[0], x[i])  # (D, d)
        torch.testing.assert_close(G[i], J.T @ J)
    # PCA(6) of d = 10: directions off the subspace have zero length under G_φ.
    eig = torch.linalg.eigvalsh(G)
    assert (eig[:, :4].abs() < 1e-9).all() and (eig[:, 4:] > 1e-6).all()


def test_nll_and_label_free_classes_on_hand_computed_values():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    means = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    log_det = torch.tensor([0.5, -1.0])
    classes = torch.tensor([0, 1])
    # ½‖(1,0)‖² − 0.5 = 0, ½‖(0,1)‖² + 1 = 1.5
    assert nll(z, log_det, means[classes]).item() == pytest.approx(0.75)
    s = torch.tensor([[0.1, 0.6, 0.2, 0.65], [0.5, 0.1, 0.1, 0.0]])  # the last column is "other": never a class
    assert classes_of(s, 3).tolist() == [1, 0]
    # Soft centres: q = 2s² over the concepts, renormalised, weights the class means.
    q = torch.tensor([[0.5, 0.3, 0.0, 0.2], [0.0, 0.0, 1.0, 0.0]])
    means3 = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 4.0]])
    expected = torch.tensor([[0.5 / 0.8 * 0 + 0.3 / 0.8 * 8, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(soft_centres((q / 2).sqrt(), means3), expected)


def test_steering_pairs_are_all_pairs_up_to_12_classes_else_a_seeded_sample():
    assert steering_pairs([0, 1, 2], 50, 0, 12) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert len(steering_pairs(list(range(12)), 50, 0, 12)) == 132, "docs/method.md §9: every pair when K ≤ 12"
    sample = steering_pairs(list(range(1, 26)), 50, 0, 12)  # a class the LM never answers has no pairs
    assert len(sample) == len(set(sample)) == 50 and all(a != b and 0 not in (a, b) for a, b in sample)
    assert sample == steering_pairs(list(range(1, 26)), 50, 0, 12) and sample != steering_pairs(list(range(1, 26)), 50, 1, 12)


# ---------------------------------------------------------------- stage=train geometry=innsteer

INN = ["geometry.innsteer.pca_dim=8", "geometry.innsteer.num_blocks=3", "geometry.innsteer.hidden=32",
       "geometry.innsteer.steering.carriers=4", "geometry.innsteer.steering.max_pairs=6"]  # fmt: skip


def test_innsteer_trains_exports_and_reloads_bit_identically(prepared, tmp_path):
    cfg = prepared("inn", *INN, geometries=("innsteer",), epochs=4)
    result = train.run(cfg)["geometries"]["weekdays"]["innsteer"]
    assert result["round_trip_max"] <= 1e-4 and result["log_det_symmetry"] < 1e-3
    assert 0 <= result["steering_success_min"] <= result["steering_success_mean"] <= 1
    assert result["steering_pairs"] > 0 and len(result["steering_success"]) == result["steering_pairs"]
    folder = Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "innsteer"
    config = json.loads((folder / "config.json").read_text())
    assert config["meta"]["metrics"]["steering_success_mean"] == result["steering_success_mean"]
    flow = InnSteer.from_pretrained(folder)
    h = torch.randn(5, flow.input_dim)
    assert reloads_alike_in_a_fresh_process(folder, (h,), flow.encode(h), tmp_path)
    assert (folder / "training.png").is_file()
    a, b = flow.known_classes[0], flow.known_classes[-1]  # classes the flow learned a mean for
    assert a != b and config["meta"]["metrics"]["classes_trained"] == flow.known_classes
    steered = run_model_card(folder, h=h, a=a, b=b)["h_steered"]
    torch.testing.assert_close(steered, flow.steer(h, a, b, torch.linspace(0, 1, 9)), msg="the model card's example runs")


def test_a_crashed_innsteer_training_resumes_to_the_same_weights(prepared):
    """The training noise is drawn per step from the seed, so a resume after a crash draws what an uninterrupted
    run does, and the exports are equal bit for bit."""
    from tests.test_bad_input import CrashAfterSecondEpoch

    exports = []
    for name, crash in (("inn-whole", False), ("inn-crashed", True)):
        cfg = prepared(name, *INN, "geometry.innsteer.patience=100", geometries=("innsteer",), epochs=3)
        assert cfg.geometry.innsteer.noise > 0, "the noise is what a resume must draw again"
        if crash:
            with pytest.raises(RuntimeError, match="simulated crash"):
                train.run(cfg, callbacks=[CrashAfterSecondEpoch()])
        train.run(cfg)
        exports.append(load_file(Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "innsteer" / "model.safetensors"))
    whole, resumed = exports
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_innsteer_wandb_run_holds_the_objective_the_round_trip_and_the_steering_success(prepared):
    cfg = prepared("inn_wandb", *INN, "logger=wandb", geometries=("innsteer",), epochs=2)
    result = train.run(cfg)["geometries"]["weekdays"]["innsteer"]
    (run_dir,) = (Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*")
    history = wandb_history(wandb_records(run_dir))
    keys = set().union(*history)
    assert {"train/nll", "train/log_det_mean", "train/log_det_std", "train/grad_norm", "val/nll", "val/round_trip_max",
            "val/class_accuracy", "final/val_probe_accuracy", "final/steering_success_min"} <= keys  # fmt: skip
    logged = [h["final/steering_success_mean"] for h in history if "final/steering_success_mean" in h]
    assert logged == [pytest.approx(result["steering_success_mean"])]
    assert (run_dir / "files" / "media" / "images").is_dir(), "the latent and steering-matrix figure is logged"


def _poison(model) -> None:  # one weight of the flow, used by every point
    next(p for p in model.flow.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_a_nan_stops_training_with_the_step_and_no_nan_reaches_a_checkpoint(prepared):
    cfg = prepared("nan", *INN, geometries=("innsteer",), epochs=4)
    with pytest.raises(StageError, match=r"INNSteer loss is nan at step 6 .*Lower optim.lr"):
        train.run(cfg, callbacks=[SpoilAt(6, _poison)])
    assert not (Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "innsteer").exists(), "nothing exported"
    ckpts = list(Path(cfg.paths.run_dir).rglob("*.ckpt"))
    assert ckpts, "the epochs before the NaN were checkpointed"
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_innsteer_ddp_smoke_run_on_two_processes(prepared):
    cfg = prepared("inn_ddp", *INN, "trainer=ddp_sim", geometries=("innsteer",), epochs=2)
    result = train.run(cfg)["geometries"]["weekdays"]["innsteer"]
    assert result["trainer"] == "ddp_spawn" and result["epochs"] == 2
    assert result["round_trip_max"] <= 1e-4
