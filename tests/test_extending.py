"""A steering method and a geometry family added from this file alone run through stage=train and stage=eval.

This is docs/extending.md's recipe, checked: a class registered by name plus its config, and nothing
edited elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from geosteer.data.targets import target_distances
from geosteer.models.geodesics import linear_path
from geosteer.models.hub import CheckpointError, ShippedGeometry, load_geometry
from geosteer.models.metrics import pullback_of
from geosteer.pipeline import eval as evaluate
from geosteer.pipeline import train
from geosteer.pipeline.common import StageError
from geosteer.pipeline.family import Family, GeometrySystem, register_family
from geosteer.pipeline.methods import (
    IterativeMethod,
    PathMethod,
    Paths,
    build_methods,
    described,
    encoder_paths,
    fit_on,
    register_method,
)
from tests.test_eval import SMALL_EVAL


class ToyEncoder(nn.Module, ShippedGeometry, family="toy_linear"):
    """A linear encoder of standardised activations: the smallest network that ships and has a pullback metric."""

    def __init__(self, input_dim: int, latent_dim: int, meta: dict | None = None):
        super().__init__()
        self.input_dim, self.pca_dim, self.meta = input_dim, None, meta or {}
        self.linear = nn.Linear(input_dim, latent_dim)
        self.register_buffer("shift", torch.zeros(input_dim))
        self.register_buffer("scale", torch.ones(input_dim))

    @torch.no_grad()
    def fit_normalisation(self, h: torch.Tensor) -> None:
        self.shift.copy_(h.mean(0))
        self.scale.copy_(h.std(0) + 1e-6)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear((h - self.shift) / self.scale)  # (B, d) → (B, k)


class ToySystem(GeometrySystem):
    def __init__(self, model: ToyEncoder, scale: float, lr: float, weight_decay: float = 0.0, warmup_fraction: float = 0.1):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def training_terms(self, batch):
        z = self.model.encode(batch["x"])
        loss = (torch.pdist(z) - target_distances(batch["coords"], self.hparams.scale)).pow(2).mean()
        return {"loss": loss}, len(z)


@register_family("toy_linear")
class ToyFamily(Family):
    monitor = "val/loss"

    def build(self, g, d, K, meta, seed):
        ctor = {"input_dim": d, "latent_dim": K}
        return ToyEncoder(**ctor, meta=meta), ctor

    def system(self, model, g, train, K):
        return ToySystem(model, train.scale, lr=g["lr"])

    def evaluate(self, cfg, task, g, model, train, val, folder):
        return {"latent_norm": float(model.encode(val[torch.as_tensor(val.rows)]["x"]).norm(dim=1).mean())}

    def headline(self, metrics):
        return {"latent_norm": round(metrics["latent_norm"], 4)}

    def card(self, ctor, meta):
        return {"tags": ["toy"], "title": "a toy linear encoder", "summary": "A linear encoder.", "rows": [],
                "usage": "z = geometry.encode(h)"}  # fmt: skip


@register_method("toy_halfway", label="halfway chord", role="baseline", how="the chord to a fraction of the way")
@dataclass
class Halfway(PathMethod):
    """The chord, stopped at `fraction` of the way: a path method with a setting."""

    fraction: float

    def paths(self, ctx, pairs, geometry):
        x_a, x_b = ctx.data.ends(pairs)
        path = linear_path(x_a, x_a + self.fraction * (x_b - x_a), ctx.e.steps)
        return Paths(path, path)


@register_method("toy_geodesic", label="toy G_E + L-BFGS", role="learned", how="L-BFGS geodesic of the toy pullback",
                 family="toy_linear", metric_label="toy G_E", compared=True)  # fmt: skip
@dataclass
class ToyGeodesic(PathMethod):
    """The L-BFGS geodesic of the toy encoder's pullback metric: a method that steers with a trained geometry."""

    geometry: str

    def paths(self, ctx, pairs, geometry):
        path = encoder_paths(ctx, pullback_of(geometry), *ctx.data.ends(pairs), fit_on(ctx))
        return Paths(path, path)


def test_a_toy_family_and_toy_methods_registered_here_train_and_evaluate(prepared):
    cfg = prepared("extending", *SMALL_EVAL, "method=[linear,g_out]")
    with open_dict(cfg):
        cfg.geometry = {"toy": {"family": "toy_linear", "target": "hellinger", "lr": 1e-2, "batch_size": 64,
                                "min_steps_per_epoch": 4, "max_epochs": 2, "patience": 2, "num_workers": 0}}  # fmt: skip
        cfg.method.toy_halfway = {"fraction": 0.5}
        cfg.method.toy_geodesic = {"geometry": "toy"}
    trained = train.run(cfg)["geometries"]["weekdays"]["toy"]
    folder = Path(trained["path"])
    assert json.loads((folder / "config.json").read_text())["meta"]["family"] == "toy_linear"
    assert isinstance(load_geometry(folder, d=32, layer=1), ToyEncoder) and trained["epochs"] == 2

    result = evaluate.run(cfg)
    task = json.loads((Path(result["dir"]) / "results.json").read_text())["tasks"]["weekdays"]
    assert list(task["methods"]) == ["linear", "g_out", "toy_halfway", "toy_geodesic"]
    for name in ("toy_halfway", "toy_geodesic"):
        assert len(task["methods"][name]["per_pair"]["E_B"]) == len(task["pairs"]) == 42
    assert task["methods"]["toy_geodesic"]["geometry"] == "<run>/geometry/weekdays/toy"  # as any copy of the run reads
    assert set(task["agreement"]) == {"linear", "toy_geodesic"} and len(task["alignment"]["toy_geodesic"]["spearman"]) == 6
    md = (Path(result["dir"]) / "report.md").read_text()
    assert "| halfway chord |" in md and "| toy G_E | " in md


def test_a_method_is_refused_for_a_wrong_setting_a_missing_geometry_or_an_unknown_role():
    with pytest.raises(StageError, match=r"method\.spline: .*unexpected keyword argument 'pcs'.*configs/method/spline.yaml"):
        build_methods({"spline": {"pcs": 8}})
    with pytest.raises(StageError, match=r"method\.gaga_out steers with a gaga geometry but names none"):
        build_methods({"gaga_out": {"geometry": None}})
    with pytest.raises(ValueError, match=r"role='teacher'; use one of \('baseline', 'learned', 'target'\)"):
        register_method("teacher_forced", label="x", role="teacher", how="x")


def test_registration_refuses_a_taken_name_a_class_of_no_kind_and_a_geometry_for_an_iterative_method():
    with pytest.raises(ValueError, match=r"a method named 'linear' is registered already"):
        register_method("linear", label="x", role="baseline", how="x")
    with pytest.raises(TypeError, match=r"must subclass PathMethod or IterativeMethod"):
        register_method("toy_kindless", label="x", role="baseline", how="x")(object)
    with pytest.raises(TypeError, match=r"only a path method steers with a trained geometry"):
        register_method("toy_iterative_geometry", label="x", role="learned", how="x", family="gaga")(IterativeMethod)
    with pytest.raises(StageError, match=r"no steering method selected; .*method=\["):
        build_methods({})


def test_how_a_method_builds_its_path_reads_with_its_own_settings():
    """The report's method table says the k the spline was asked for (it said PCA(64) whatever the setting)."""
    assert described(build_methods({"spline": {"pca": 8}})["spline"]).startswith("PCA(8) spline")
    assert described(build_methods({"g_out": {"starts": [], "spline_pca": 8, "max_batch": 4}})["g_out"]).endswith(
        ": none (the spline in PCA(8))"
    )

    @dataclass
    class Halfway(PathMethod):
        fraction: float

    with pytest.raises(ValueError, match=r"how='to \{fractoin\} of the way' names \['fractoin'\], not settings of"):
        register_method("toy_misnamed_setting", label="x", role="baseline", how="to {fractoin} of the way")(Halfway)


def test_an_export_that_records_no_family_is_refused_naming_the_way_to_load_it(tmp_path):
    ToyEncoder(4, 2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"records no meta.family.*from_pretrained"):
        load_geometry(tmp_path)
    assert isinstance(ToyEncoder.from_pretrained(tmp_path), ToyEncoder)


def test_a_geometry_without_a_setting_its_family_reads_is_refused_by_name(tmp_path):
    """A geometry YAML of a shipped family that leaves out a setting every shipped one sets (it read KeyError: 'loss')."""
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, "geometry=[gaga_out]")
    with open_dict(cfg):
        del cfg.geometry.gaga_out.loss
    with pytest.raises(StageError, match=r"geometry 'gaga_out' lacks \['loss'\], which every shipped geometry of family "
                                         r"'gaga' sets; start its YAML from one of them, e.g. configs/geometry/gaga_jac.yaml"):  # fmt: skip
        train.selected_geometries(cfg)
