"""The GAGA module: architecture, normalisation, the raw-space pullback, export and import."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from geosteer.models.gaga import GAGA
from geosteer.models.hub import CheckpointError, GeometryMismatch
from geosteer.models.metrics import EncoderPullback
from tests.conftest import reloads_alike_in_a_fresh_process


def _fitted(pca_dim=None, readout_dim=None, seed=0):
    torch.manual_seed(seed)
    h = 3 + 2 * torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    model = GAGA(12, 3, hidden=[16, 8], pca_dim=pca_dim, readout_dim=readout_dim, meta={"layer": 1}).double()
    model.fit_normalisation(h)
    return model.eval(), h


def test_hidden_layers_are_linear_batchnorm_relu_and_the_ends_linear():
    model = GAGA(12, 3, hidden=[16, 8])
    kinds = [type(m) for m in model.encoder]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [m.out_features for m in model.encoder if isinstance(m, nn.Linear)] == [16, 8, 3]
    assert [m.out_features for m in model.decoder if isinstance(m, nn.Linear)] == [8, 16, 12]


@pytest.mark.parametrize("pca_dim", [None, 5])
def test_standardisation_round_trips_and_whitens_the_training_inputs(pca_dim):
    model, h = _fitted(pca_dim)
    a = model.ambient(h)
    torch.testing.assert_close(model.unstandardise(model.standardise(a)), a)
    s = model.inputs(h)
    torch.testing.assert_close(s.mean(0), torch.zeros(s.shape[1], dtype=s.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.pow(2).mean(), torch.tensor(1.0, dtype=s.dtype))
    z, rec = model(h)
    assert z.shape == (200, 3) and rec.shape == (200, pca_dim or 12)
    torch.testing.assert_close(model.decode(z), model.unstandardise(rec))


def test_pca_ambient_space_is_an_orthonormal_projection_of_the_top_variance():
    model, h = _fitted(pca_dim=5)
    P = model.pca_components
    torch.testing.assert_close(P @ P.T, torch.eye(5, dtype=P.dtype), atol=1e-12, rtol=0)
    centred = h - h.mean(0)
    top = torch.linalg.eigvalsh(centred.T @ centred).flip(0)[:5]
    torch.testing.assert_close((centred @ P.T).pow(2).sum(0), top)


def test_the_encoder_pullback_lives_on_raw_activations_and_ignores_the_discarded_directions():
    model, h = _fitted(pca_dim=5)
    J = EncoderPullback(model.encode).jacobian(h[:4])  # (4, k, d)
    assert J.shape == (4, 3, 12)
    off = torch.eye(12, dtype=h.dtype) - model.pca_components.T @ model.pca_components
    torch.testing.assert_close(J @ off, torch.zeros_like(J), atol=1e-12, rtol=0)


def test_export_reloads_in_a_fresh_process_with_bit_identical_encodings(tmp_path):
    model, h = _fitted(pca_dim=5, readout_dim=4)
    model, h = model.float(), h.float()  # the dtype the pipeline trains and ships in
    model.meta.update(lm="embedded task LM", family="gaga")  # as pipeline.train exports it; load_geometry reads the family
    model.save_pretrained(tmp_path / "gaga")
    assert sorted(p.name for p in (tmp_path / "gaga").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "gaga" / "config.json").read_text())
    assert (
        config["input_dim"] == 12
        and config["pca_dim"] == 5
        and config["meta"].pop("digest")  # sealed as saved
        and config["meta"] == {"layer": 1, "lm": "embedded task LM", "family": "gaga"}
    )
    assert reloads_alike_in_a_fresh_process(tmp_path / "gaga", (h,), model.encode(h).detach(), tmp_path)


def test_loading_refuses_a_checkpoint_with_a_missing_tensor(tmp_path):
    model, _ = _fitted()
    model.save_pretrained(tmp_path / "gaga")
    weights = load_file(tmp_path / "gaga" / "model.safetensors")
    del weights["encoder.0.weight"]
    save_file(weights, tmp_path / "gaga" / "model.safetensors")
    with pytest.raises(CheckpointError, match="Missing key.*encoder.0.weight.*Re-export it"):
        GAGA.from_pretrained(tmp_path / "gaga")


def test_a_checkpoint_names_both_shapes_when_used_with_the_wrong_store():
    model, _ = _fitted()
    model.check_compatible(12, 1)
    with pytest.raises(
        GeometryMismatch, match=r"trained on d=12 activations of layer 1, but its activations here are d=64 at layer 1"
    ):
        model.check_compatible(64, 1)
    with pytest.raises(GeometryMismatch, match=r"layer 1, but its activations here are d=12 at layer 3"):
        model.check_compatible(12, 3)
