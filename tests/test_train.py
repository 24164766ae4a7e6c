"""GAGA training: the losses on hand-computed cases, point-cloud sampling, and stage=train end to end
(export and fresh-process reload, W&B offline files, resume, 2-process DDP)."""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from geosteer.data.targets import PointClouds, target_distances
from geosteer.models.gaga import GAGA
from geosteer.models.hub import load_geometry
from geosteer.pipeline import train
from geosteer.pipeline.common import StageError, warmup_cosine
from geosteer.pipeline.gaga import GAGASystem, cycle_loss, distance_loss, pointwise_loss, reconstruction_loss
from tests.conftest import SpoilAt, reloads_alike_in_a_fresh_process, run_model_card, wandb_history, wandb_records

# ---------------------------------------------------------------- losses


def test_distance_loss_on_a_hand_computed_triangle():
    z = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])  # latent distances (0,1)=5, (0,2)=1, (1,2)=√18
    d = torch.tensor([4.0, 1.0, 4.0])  # targets for the same pairs, in pdist order
    mse = ((5 - 4) ** 2 + 0 + (math.sqrt(18) - 4) ** 2) / 3
    assert distance_loss(z, d, decay=0.0).item() == pytest.approx(mse, rel=1e-6)
    local = (math.exp(-2) * (5 - 4) ** 2 + 0 + math.exp(-2) * (math.sqrt(18) - 4) ** 2) / 3
    assert distance_loss(z, d, decay=0.5).item() == pytest.approx(local, rel=1e-6)


def test_target_distances_follow_the_torch_pdist_pairing_order():
    coords = torch.randn(6, 4, dtype=torch.float64)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]  # (0,1), (0,2), …, (4,5)
    manual = torch.stack([(coords[i] - coords[j]).norm() for i, j in pairs]) / 2.5
    torch.testing.assert_close(target_distances(coords, 2.5), manual)
    # A latent that is the target up to the scale has zero loss only if both use the same order.
    assert distance_loss(coords / 2.5, target_distances(coords, 2.5), 0.0) < 1e-24
    assert distance_loss(coords.flip(0) / 2.5, target_distances(coords, 2.5), 0.0) > 1e-3


def _linear_gaga(D=3, k=2, readout=None):
    model = GAGA(D, k, hidden=[], readout_dim=readout).double()
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # E(x) = x[:2]
        model.decoder[0].weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))  # G(z) = (2z, 0)
        for layer in (model.encoder[0], model.decoder[0]):
            layer.bias.zero_()
    return model


def test_reconstruction_cycle_and_pointwise_losses_on_a_linear_autoencoder():
    model = _linear_gaga(readout=3)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    z = model.encoder(x)  # [[1, 2], [0, -1]]
    recon = model.decoder(z)  # [[2, 4, 0], [0, -2, 0]]
    assert reconstruction_loss(recon, x).item() == pytest.approx(((1 + 4 + 9) + (0 + 1 + 1)) / 2)
    # E(G(z)) = 2z, so the cycle loss is mean ‖z‖².
    assert cycle_loss(model, z).item() == pytest.approx(((1 + 4) + (0 + 1)) / 2)
    with torch.no_grad():
        model.readout.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.readout.bias.fill_(0.5)
    sqrt_q = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # A·z + b = [[1.5, 2.5, 3.5], [0.5, -0.5, -0.5]]
    expected = ((0.5**2 + 1.5**2 + 2.5**2) + (0.25 + 0.25 + 0.25)) / 2
    assert pointwise_loss(model, z, sqrt_q).item() == pytest.approx(expected)


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert all(warmup_cosine(s, 10, 110) >= warmup_cosine(s + 1, 10, 110) for s in range(10, 110))


# ---------------------------------------------------------------- point clouds


def test_point_clouds_are_seeded_and_disjoint_across_ranks():
    rows = torch.arange(100, 200).numpy()
    ranks = [PointClouds(rows, 30, steps=4, seed=7, rank=r, world_size=3) for r in range(3)]
    for step in zip(*(list(s) for s in ranks)):
        assert all(len(b) == 30 for b in step)
        union = torch.cat(step)
        assert len(set(union.tolist())) == 90 and set(union.tolist()) <= set(rows.tolist())
    again = PointClouds(rows, 30, steps=4, seed=7, rank=1, world_size=3)
    assert all(torch.equal(a, b) for a, b in zip(again, ranks[1]))
    again.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(again, ranks[1])), "each epoch draws new clouds"
    assert PointClouds(rows, 256, steps=1, seed=0, rank=0, world_size=2).batch_size == 50


# ---------------------------------------------------------------- stage=train


def test_train_exports_a_geometry_that_reloads_bit_identically_in_a_fresh_process(prepared, tmp_path):
    cfg = prepared("export", geometries=("gaga_out", "gaga_phate"))
    result = train.run(cfg)
    assert set(result["summary"]["weekdays"]) == {"gaga_out", "gaga_phate"}
    for name, latent in (("gaga_out", 7), ("gaga_phate", 3)):
        out = Path(result["geometries"]["weekdays"][name]["path"])
        assert sorted(p.name for p in out.iterdir()) == [
            "README.md", "config.json", "model.safetensors", "stage.json", "training.png"
        ]  # fmt: skip
        config = json.loads((out / "config.json").read_text())
        meta = config["meta"]
        assert config["latent_dim"] == latent and config["input_dim"] == 32
        assert meta["layer"] == 1 and meta["lm"] == cfg.model.name and meta["task"]["name"] == "weekdays"
        assert meta["metrics"]["epochs"] == 3 and "val_spearman" in meta["metrics"]
        assert name in (out / "README.md").read_text()
        assert run_model_card(out, h=torch.randn(5, 32))["z"].shape == (5, latent), "the model card's example runs"
    # Reload in a fresh process: the same encodings, bit for bit.
    out = Path(result["geometries"]["weekdays"]["gaga_out"]["path"])
    h = torch.randn(50, 32)
    assert reloads_alike_in_a_fresh_process(out, (h,), GAGA.from_pretrained(out).eval().encode(h).detach(), tmp_path)
    # A current export is not retrained.
    assert train.run(cfg)["geometries"] == result["geometries"]


def test_wandb_offline_run_holds_the_logged_metrics_config_and_figure(prepared):
    cfg = prepared("wandb", "logger=wandb")
    result = train.run(cfg)["geometries"]["weekdays"]["gaga_out"]
    (run_dir,) = (Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    history = wandb_history(records)
    keys = set().union(*history)
    assert {"train/loss", "train/dist", "train/rec", "train/pointwise", "train/lr"} <= keys
    assert {"val/dist", "val/spearman", "val/pearson", "final/val_spearman"} <= keys
    assert [h["final/val_spearman"] for h in history if "final/val_spearman" in h] == [result["val_spearman"]]
    assert sum("val/spearman" in h for h in history) == 3, "one validation per epoch"
    config = {i.key or "/".join(i.nested_key): i.value_json for r in records if r.HasField("config") for i in r.config.update}
    assert "git_sha" in config and json.loads(config["config"])["geometry"]["gaga_out"]["target"] == "hellinger"
    assert (run_dir / "files" / "media" / "images").is_dir(), "the training figure is logged"


class _CrashAt(L.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, _module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_a_crashed_run_resumes_from_last_ckpt_and_matches_an_uninterrupted_one(prepared):
    crashed = prepared("crashed", "logger=csv", epochs=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(crashed, callbacks=[_CrashAt(2)])
    (work,) = (Path(crashed.paths.run_dir) / "geometry" / "weekdays").glob(".gaga_out.partial-*")
    assert (work / "checkpoints" / "last.ckpt").is_file()
    run_id = (work / "run_id").read_text()
    resumed = train.run(crashed)["geometries"]["weekdays"]["gaga_out"]
    assert resumed["epochs"] == 6
    logs = Path(crashed.paths.run_dir) / "csv" / "train-weekdays-gaga_out" / run_id
    with (logs / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    epochs = {int(float(r["epoch"])) for r in rows if r.get("epoch")}
    assert epochs == set(range(6)), "the same run continues: the epochs before the crash are kept, and the rest added"
    assert any(r.get("final/val_spearman") for r in rows), "with the final metrics"
    clean = train.run(prepared("clean", "logger=csv", epochs=6))["geometries"]["weekdays"]["gaga_out"]
    a, b = (load_file(Path(r["path"]) / "model.safetensors") for r in (resumed, clean))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _diverge(model) -> None:  # every weight of the encoder × 1e30: a learning rate far too large
    for p in model.parameters():
        p.mul_(1e30)


def test_a_gaga_whose_loss_is_no_longer_finite_stops_with_the_step_and_keeps_no_such_checkpoint(prepared):
    cfg = prepared("diverged", epochs=4)
    with pytest.raises(StageError, match=r"training weekdays/gaga_out failed: GAGA loss is (nan|inf) at step 5 .*"
                                         r"Lower optim.lr"):  # fmt: skip
        train.run(cfg, callbacks=[SpoilAt(5, _diverge)])
    assert not (Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "gaga_out").exists(), "nothing exported"
    ckpts = list(Path(cfg.paths.run_dir).rglob("*.ckpt"))
    assert ckpts, "the epochs before were checkpointed"
    for ckpt in ckpts:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() and v.abs().max() < 1e20 for v in state.values() if v.is_floating_point())


def test_two_process_ddp_trains_like_a_single_process(prepared, tmp_path, monkeypatch):
    system_tmp = tmp_path / "system-tmp"  # the system's temporary folder, as the workers find it
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    single = train.run(prepared("single", "geometry.gaga_out.patience=40", epochs=40))
    ddp_cfg = prepared("ddp", "trainer=ddp_sim", "logger=csv", "geometry.gaga_out.patience=40", epochs=40)
    ddp = train.run(ddp_cfg)
    single, ddp = (r["geometries"]["weekdays"]["gaga_out"] for r in (single, ddp))
    assert ddp["trainer"] == "ddp_spawn" and ddp["epochs"] == 40
    assert Path(ddp["path"], "model.safetensors").is_file()
    assert single["val_spearman"] > 0.8
    assert abs(ddp["val_spearman"] - single["val_spearman"]) < 0.05
    assert not list(system_tmp.iterdir()), "the spawned fit left its temporary folder outside the run"
    assert not list(Path(ddp["path"]).rglob("tmp*")), "nor in the export"
    (logged,) = Path(ddp_cfg.paths.run_dir, "csv", "train-weekdays-gaga_out").glob("*/metrics.csv")
    with logged.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert {int(float(r["epoch"])) for r in rows if r.get("epoch")} == set(range(40)), "the worker's log is kept"
    (last,) = [r for r in rows if r.get("final/val_spearman")]
    assert int(last["step"]) == ddp["steps"] > 0, "and the launching process adds the final metrics, at the last step"


def test_an_export_whose_metric_scale_changed_is_another_to_eval_and_one_trained_longer_is_not(prepared, tmp_path):
    """eval's record of the exports it steered with leaves out their timings but not a GAGA's metric_scale, which
    λ_reg of its geodesics is taken from: a changed scale evaluates again, a changed training time does not."""
    import shutil

    from geosteer.models.hub import seal
    from geosteer.pipeline import eval as evaluate
    from geosteer.pipeline.methods import build_methods

    cfg = prepared("scaled")
    train.run(cfg)
    copies = tmp_path / "geometry"
    shutil.copytree(Path(cfg.paths.run_dir, "geometry"), copies, ignore=shutil.ignore_patterns("stage.json"))
    folder, used = copies / "weekdays" / "gaga_out", prepared("scaled", f"eval.geometry_dir={copies}", "method=[gaga_out]")
    digest = evaluate.exports_used(used, evaluate.load_tasks(used), build_methods(used.method))

    def changed(key: str, factor: float) -> dict[str, str]:
        config = json.loads((folder / "config.json").read_text())
        config["meta"]["metrics"][key] *= factor
        (folder / "config.json").write_text(json.dumps(config))
        seal(folder)
        return evaluate.exports_used(used, evaluate.load_tasks(used), build_methods(used.method))

    assert changed("seconds", 2.0) == digest, "a slower training of the same export is the same export"
    assert changed("metric_scale", 1e4) != digest


def test_settings_of_earlier_stages_that_a_later_stage_cannot_apply_are_named(prepared, caplog):
    """A later stage run alone uses the store and the exports as they were made: an `extract.*` or `geometry.*`
    override there is not applied, and the warning names it (and nothing else)."""
    from geosteer.pipeline import eval as evaluate
    from geosteer.pipeline import targets
    from geosteer.pipeline.methods import build_methods

    base = prepared("unapplied")
    train.run(base)
    caplog.set_level("WARNING", logger="geosteer")
    train.run(prepared("unapplied"))
    targets.run(prepared("base"))  # the run whose targets these are (the others link to them)
    same = prepared("unapplied", "method=[gaga_out]")
    evaluate.exports_used(same, evaluate.load_tasks(same), build_methods(same.method))
    assert "are not applied" not in caplog.text, "the config that made them is named as another"

    train.run(prepared("unapplied", "extract.classes=argmax", "extract.min_class_rows=3"))
    assert "stage=train uses" in caplog.text and "config's extract.classes, extract.min_class_rows (not" in caplog.text
    caplog.clear()
    targets.run(prepared("base", "extract.h_dtype=float16"))
    assert "stage=targets uses" in caplog.text and "config's extract.h_dtype (not" in caplog.text
    caplog.clear()
    cfg = prepared("unapplied", "geometry.gaga_out.optim.lr=0.5", "method=[gaga_out]")
    evaluate.exports_used(cfg, evaluate.load_tasks(cfg), build_methods(cfg.method))
    assert "stage=eval uses" in caplog.text and "config's geometry.optim.lr (not" in caplog.text, caplog.text


def test_a_pca_wider_than_the_training_rows_is_refused_as_that_geometry_trains(tmp_path, tiny_lm_dir):
    """`stage=all` refuses what no task's rows can hold before any stage; `stage=train` alone meets the exact
    training count: a PCA of 16 on a task of 15 training rows is refused with a width that fits."""
    import yaml

    from geosteer.pipeline import extract, targets
    from geosteer.pipeline.common import StageError
    from tests.conftest import TASK_DIR, make_cfg

    week = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    small = {**week, "name": "small", "values": ["Monday", "Tuesday", "Wednesday"], "numbers": [1, 2, 3],
             "number_words": None, "templates": week["templates"][:2]}  # fmt: skip
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    cfg = make_cfg(tmp_path, f"tasks=[{tmp_path / 'small.yaml'}]", f"model.pretrained={tiny_lm_dir}", "model.embedded=false",
                   "model.layer=1", "geometry=[gaga_phate]", "geometry.gaga_phate.pca_dim=16", "targets.pullback.rank=0")  # fmt: skip
    extract.run(cfg)
    targets.run(cfg)
    with pytest.raises(StageError, match=r"pca_dim=16 needs at least as many training rows, but task small has 15; lower"):
        train.run(cfg)


def test_parts_no_loss_reaches_are_frozen_so_spawned_ddp_trains_every_gaga(prepared):
    """GAGA-Jac's losses leave the decoder and GAGA-Out's (rec = cyc = 0 here) too: DDP refuses parameters with no
    gradient, so they are frozen, and frozen they stay as initialised, as they did untouched by AdamW before."""
    result = train.run(prepared("jac_ddp", "trainer=ddp_sim", "geometry.gaga_out.loss.rec=0",
                                "geometry.gaga_out.loss.cyc=0", geometries=("gaga_jac", "gaga_out"), epochs=2))  # fmt: skip
    for name in ("gaga_jac", "gaga_out"):
        trained = result["geometries"]["weekdays"][name]
        assert trained["epochs"] == 2 and Path(trained["path"], "model.safetensors").is_file(), name
    system = GAGASystem(GAGA(8, 2, hidden=[4], readout_dim=3), scale=1.0, dist=1.0, rec=0.0, cyc=0.0, pointwise=0.0,
                        decay=0.0, lr=1e-3, weight_decay=0.0, warmup_fraction=0.0, coords_are_hellinger=True)  # fmt: skip
    frozen = {n for n, p in system.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in system.model.named_parameters() if n.startswith(("decoder.", "readout."))}


def test_the_recorded_metric_scale_is_the_one_eval_fits_lambda_on(prepared):
    """A GAGA export records its pullback's eigenvalue scale on the training rows; eval and steering take λ_reg from
    it. It is the scale of the sample eval's own fit draws (the same split, rows and seed): parity, not a constant."""
    from geosteer.data.store import ActivationStore
    from geosteer.models.metrics import pullback_of, regularisation
    from geosteer.pipeline import eval as evaluate
    from geosteer.pipeline.methods import Context, fit_on

    cfg = prepared("scale")
    out = Path(train.run(cfg)["geometries"]["weekdays"]["gaga_out"]["path"])
    geometry = load_geometry(out)
    with ActivationStore(Path(cfg.paths.run_dir) / "extract" / "activations.h5") as store:
        data = evaluate.read_task(store, evaluate.load_tasks(cfg)[0], cfg.targets.val_fraction, cfg.seed)
    ctx = Context(data, cfg.eval, lm=None, tokenizer=None, layer=1, seed=cfg.seed)  # fit_on reads the rows and seed
    fitted = regularisation(pullback_of(geometry), fit_on(ctx), rel=1.0)
    assert geometry.meta["metrics"]["metric_scale"] == pytest.approx(fitted, rel=1e-5)


def test_the_csv_log_adds_rows_by_column_name_to_a_file_with_other_columns(tmp_path):
    """A resumed stage's rows join the file its crashed run wrote, by column name, whatever the file's column order
    (a hand edit) and whichever keys are new."""
    from geosteer.pipeline.common import ResumableCSVLogger

    version = tmp_path / "train" / "v1"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("step,train/loss,epoch\n0,9.0,0\n")
    logger = ResumableCSVLogger(tmp_path, name="train", version="v1")
    logger.log_metrics({"epoch": 1, "train/loss": 0.5}, step=10)
    logger.save()
    logger.log_metrics({"epoch": 2, "val/loss": 0.25}, step=20)
    logger.save()
    with (version / "metrics.csv").open(newline="") as file:
        rows = [{k: v for k, v in row.items() if v} for row in csv.DictReader(file)]
    assert rows == [{"step": "0", "train/loss": "9.0", "epoch": "0"}, {"step": "10", "train/loss": "0.5", "epoch": "1"},
                    {"step": "20", "val/loss": "0.25", "epoch": "2"}]  # fmt: skip
