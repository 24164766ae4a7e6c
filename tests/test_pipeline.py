"""The stages end to end through `run(cfg)`: extraction, resume, refusal, caching, the task LM, stage=all."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from geosteer.data.store import ActivationStore
from geosteer.pipeline import cli, extract, products
from geosteer.pipeline import lm as lm_stage
from geosteer.pipeline.common import StageError, _shared_lm, lm_of_store, store_lm
from geosteer.pipeline.products import RunLayout
from tests.conftest import make_cfg


def _store(cfg):
    return ActivationStore(RunLayout.of(cfg).store)


def _assert_same_store(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert list(fa) == list(fb)
        for task in fa:
            assert set(fa[task]) == set(fb[task])
            for name in fa[task]:
                np.testing.assert_array_equal(fa[task][name][:], fb[task][name][:])
            assert dict(fa[task].attrs) == dict(fb[task].attrs)


def test_extract_writes_one_group_per_task(tiny_cfg):
    cfg = tiny_cfg()
    result = extract.run(cfg)
    with _store(cfg) as store:
        assert store.tasks == ["months", "weekdays"]
        assert store.attrs["layer"] == 1 and store.attrs["model_pretrained"] == cfg.model.pretrained
        for task, summary in result["tasks"].items():
            rows = store.read(task, ["h", "q", "top1", "label"])
            assert rows["h"].shape == (summary["n"], 32) and rows["q"].shape == (summary["n"], summary["K"] + 1)
            np.testing.assert_allclose(rows["q"].sum(1), 1, atol=1e-5)
            assert np.isfinite(rows["h"]).all()
    leftovers = [p.name for p in (Path(cfg.paths.run_dir) / "extract").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "chunks and temporary files are removed once the store is complete"


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_cfg):
    cfg = tiny_cfg("run_name=crashed")

    def crash(task, chunk):
        if (task, chunk) == ("months", 1):
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg, on_chunk=crash)
    store_path = RunLayout.of(cfg).store
    with pytest.raises(Exception, match="no activation store"):
        ActivationStore(store_path)  # nothing half-written is readable as complete
    extract.run(cfg)
    clean = tiny_cfg("run_name=clean")
    extract.run(clean)
    _assert_same_store(store_path, RunLayout.of(clean).store)


def test_rerun_is_a_no_op_and_another_config_is_refused(tiny_cfg):
    cfg = tiny_cfg()
    first = extract.run(cfg)
    path = RunLayout.of(cfg).store
    before = open(path, "rb").read()
    assert extract.run(cfg) == first
    with pytest.raises(StageError, match="different config.*overwrite=true"):
        extract.run(tiny_cfg("model.layer=0"))
    assert open(path, "rb").read() == before, "a refused run must not touch the existing store"
    extract.run(tiny_cfg("model.layer=0", "overwrite=true"))
    with _store(cfg) as store:
        assert store.attrs["layer"] == 0


@pytest.mark.parametrize("small_file", [products.SMALL_FILE, 0])  # the tiny LM's weights hashed whole, or sampled
def test_an_outside_lm_changed_in_place_is_refused_and_a_touched_one_is_not(tmp_path, tiny_lm_dir, monkeypatch, small_file):
    """The store records an outside LM's files (by their SHA-256, of the whole file or of blocks spread over a large
    one) and a sketch of its weights: extract (when its store is current) and every stage that loads the LM for the
    store refuse weights or a config changed in place; a touch that leaves the content alone passes."""
    monkeypatch.setattr(products, "SMALL_FILE", small_file)
    folder, weights = tmp_path / "my_lm", tmp_path / "my_lm" / "model.safetensors"
    shutil.copytree(tiny_lm_dir, folder)
    with safe_open(weights, "pt") as f:  # the same file of other weights: same names, shapes, size and metadata
        metadata, generator = f.metadata(), torch.Generator().manual_seed(1)
        twin = {k: torch.randn(f.get_tensor(k).shape, generator=generator) * f.get_tensor(k).std() for k in f.keys()}
    cfg = make_cfg(tmp_path, "tasks=[weekdays]", f"model.pretrained={folder}", "model.embedded=false", "model.layer=1")
    extract.run(cfg)
    store_path = RunLayout.of(cfg).store
    before = store_path.read_bytes()
    with ActivationStore(store_path) as store:
        attrs = store.attrs
    assert json.loads(attrs["lm_files"])["model.safetensors"][0] == weights.stat().st_size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched, not changed
    extract.run(cfg)
    lm_of_store(cfg, attrs, "a test")

    save_file(twin, weights, metadata=metadata)
    for refused in (lambda: extract.run(cfg), lambda: lm_of_store(cfg, attrs, "a test")):
        with pytest.raises(StageError, match=r"its files differ \(changed: \['model.safetensors'\]\).*overwrite=true"):
            refused()
    _shared_lm.cache_clear()  # an LM of the Hub (no files recorded) is checked by the sketch of its weights alone
    with pytest.raises(StageError, match=r"weights differ from the ones the store was extracted with \(weight sketch"):
        lm_of_store(cfg, {k: v for k, v in attrs.items() if k != "lm_files"}, "a test")
    shutil.copy(tiny_lm_dir / "model.safetensors", weights)  # put back
    _shared_lm.cache_clear()
    extract.run(cfg)
    lm_of_store(cfg, attrs, "a test")
    original = (folder / "config.json").read_bytes()
    (folder / "config.json").write_text(json.dumps({**json.loads(original), "rms_norm_eps": 0.1}))
    with pytest.raises(StageError, match=r"its files differ \(changed: \['config.json'\]\)\. Extract again .*overwrite=true"):
        extract.run(cfg)
    (folder / "config.json").write_bytes(original)  # put back, and a file added beside the LM
    (folder / "notes.txt").write_text("tried a new learning rate")
    with pytest.raises(StageError, match=r"its files differ \(added since: \['notes.txt'\]; a file added beside an "
                                         r"unchanged LM counts too: move it out\)"):  # fmt: skip
        extract.run(cfg)
    assert store_path.read_bytes() == before, "a refused run must not touch the existing store"


def test_an_outside_lm_moved_after_extraction_is_read_where_model_pretrained_points(tmp_path, tiny_lm_dir):
    """After extraction the store names its LM; one moved since is read at the new model.pretrained when its files
    are the ones the store recorded, and refused there when they are not."""
    folder, moved = tmp_path / "my_lm", tmp_path / "elsewhere" / "my_lm"
    shutil.copytree(tiny_lm_dir, folder)
    cfg = make_cfg(tmp_path, "tasks=[weekdays]", f"model.pretrained={folder}", "model.embedded=false", "model.layer=1")
    extract.run(cfg)
    with ActivationStore(RunLayout.of(cfg).store) as store:
        attrs = store.attrs
    lm, _ = lm_of_store(cfg, attrs, "a test")
    moved.parent.mkdir()
    folder.rename(moved)
    _shared_lm.cache_clear()
    with pytest.raises(StageError, match=rf"{folder}, is missing.*If it was moved, point model.pretrained at its new"):
        lm_of_store(cfg, attrs, "a test")
    there = make_cfg(tmp_path, "tasks=[weekdays]", f"model.pretrained={moved}", "model.embedded=false", "model.layer=1")
    assert store_lm(there, attrs)["pretrained"] == str(moved)
    found, _ = lm_of_store(there, attrs, "a test")
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), found.state_dict().values()))
    (moved / "notes.txt").write_text("another file")  # not the files the store recorded: the recorded path stays
    assert store_lm(there, attrs)["pretrained"] == str(folder)


def test_wandb_keeps_its_debug_logs_in_the_run_folder(tmp_path, tiny_lm_dir):
    """W&B's service writes its debug logs under the run's wandb folder, not under the user's ~/.cache, and each
    job of a sweep under its own run's."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "XDG_CACHE_HOME"}  # WANDB_SERVICE:
    env["HOME"] = str(home)  # a service this test process started would take the run's logs
    done = subprocess.run([sys.executable, "-m", "geosteer.pipeline", "-m", f"paths.outputs={tmp_path}", "stage=extract",
                           f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1", "tasks=[weekdays]",
                           "run_name=one,two"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for run in ("one", "two"):
        assert list((tmp_path / run / "wandb" / "cache").rglob("core-debug-*.log")), run
    assert not list(home.rglob("*.log")), sorted(map(str, home.rglob("*")))


def test_layer_out_of_range_is_refused_before_any_work(tiny_cfg):
    with pytest.raises(Exception, match="layer 7 is out of range"):
        extract.run(tiny_cfg("model.layer=7"))


SMALL_LM = ["tasks=[weekdays]", "lm.hidden_size=32", "lm.intermediate_size=64", "lm.num_heads=2", "lm.batch_size=32"]


def test_lm_stops_at_the_first_check_that_clears_the_bar_and_reports_it(tmp_path):
    cfg = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=60", "lm.check_every=20", "lm.min_accuracy=0",
                   "lm.min_swap_rate=0")  # fmt: skip
    result = lm_stage.run(cfg)
    assert result["steps"] == 20, "a bar of 0 is cleared at the first check"
    umask = os.umask(0)
    os.umask(umask)
    assert Path(result["path"], "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask, "as open() makes files"
    weights = Path(result["path"], "model.safetensors").read_bytes()
    again = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=60", "lm.check_every=20", "lm.min_accuracy=0",
                     "lm.min_swap_rate=0", "lm.checkpoint_every=7")  # fmt: skip
    assert lm_stage.run(again) == result, "how often it checkpoints changes no weight: the LM is current"
    assert Path(result["path"], "model.safetensors").read_bytes() == weights
    assert 0 <= result["accuracy"]["weekdays"] <= 1 and 0 <= result["swap_rate"]["weekdays"] <= 1


def test_lm_with_gradient_accumulation_trains_all_its_optimiser_steps(tmp_path):
    """lm.max_steps counts optimiser steps: accumulating batches must not cut the training short."""
    cfg = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=24", "lm.check_every=0", "lm.min_accuracy=0",
                   "lm.min_swap_rate=0", "+trainer.accumulate_grad_batches=3")  # fmt: skip
    assert lm_stage.run(cfg)["steps"] == 24
    checked = make_cfg(tmp_path, "stage=lm", "run_name=checked", *SMALL_LM, "lm.max_steps=24", "lm.check_every=4",
                       "lm.min_accuracy=0", "lm.min_swap_rate=0", "+trainer.accumulate_grad_batches=3")  # fmt: skip
    assert lm_stage.run(checked)["steps"] == 4, "the first check after 4 steps, not on the batches before step 1"
    more = make_cfg(tmp_path, "stage=lm", "run_name=more", *SMALL_LM, "lm.max_steps=24", "lm.check_every=0",
                    "+trainer.accumulate_grad_batches=11")  # fmt: skip
    with pytest.raises(StageError, match=r"accumulate_grad_batches=11 is more than the task LM's 10 batches per epoch"):
        lm_stage.run(more)  # Lightning would step at each epoch's end, after 10


def test_lm_under_spawned_ddp_trains_and_records_all_its_steps(tmp_path):
    """Two spawned processes split each epoch's rows: lm.max_steps, not an epoch count, still ends the training, and
    the launching process (whose trainer stayed at step 0) records and logs the workers' last step."""
    cfg = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=24", "lm.check_every=0", "lm.min_accuracy=0",
                   "lm.min_swap_rate=0", "trainer=ddp_sim", "logger=csv", "trainer.log_every_n_steps=5")  # fmt: skip
    assert lm_stage.run(cfg)["steps"] == 24
    (log,) = (Path(cfg.paths.run_dir) / "csv" / "lm").glob("*/metrics.csv")
    with log.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [4, 9, 14, 19], "the worker's training rows"
    assert rows[-1]["lm/accuracy_weekdays"] and int(rows[-1]["step"]) == 24, "the final measure at the last step"


def test_an_lm_whose_loss_is_no_longer_finite_stops_and_replaces_nothing(tmp_path):
    """A learning rate far too large: the stage stops at the first non-finite loss; no NaN LM is saved or used."""
    cfg = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=30", "lm.check_every=0", "lm.lr=1e30")
    with pytest.raises(StageError, match=r"training the task LM failed: the task LM's loss is (nan|inf) at step \d+.*"
                                         r"Lower lm.lr"):  # fmt: skip
        lm_stage.run(cfg)
    assert not (Path(cfg.paths.run_dir) / "lm").exists()


def test_lm_below_the_bar_after_max_steps_fails_and_replaces_nothing(tmp_path):
    cfg = make_cfg(tmp_path, "stage=lm", *SMALL_LM, "lm.max_steps=20", "lm.check_every=10", "lm.min_swap_rate=0")
    with pytest.raises(StageError, match=r"after 20 steps .*lm.min_accuracy=0.98"):
        lm_stage.run(cfg)
    assert not (Path(cfg.paths.run_dir) / "lm").exists()


def test_lm_extract_targets_end_to_end(tmp_path):
    overrides = [
        "tasks=[months,letters]",  # both learned in 400 steps (weekdays needs ~1,500)
        "lm.max_steps=400",
        "lm.min_accuracy=0",
        "lm.min_swap_rate=0",
        "lm.check_every=0",
        "lm.hidden_size=64",
        "lm.intermediate_size=128",
        "lm.num_layers=3",
        "model.layer=1",
        *(f"geometry.{g}.{k}={v}" for g in ("gaga_out", "gaga_phate") for k, v in (("max_epochs", 2), ("hidden", "[16]"))),
        "geometry.innsteer.max_epochs=2",
        "geometry.innsteer.num_blocks=2",
        "geometry.innsteer.hidden=16",
        "geometry.innsteer.pca_dim=8",
        "geometry.bridge.max_epochs=2",
        "geometry.bridge.hidden=[16]",
        "geometry.bridge.eval.pairs=8",
        *(
            f"eval.{k}={v}"
            for k, v in (
                ("carriers", 2),
                ("steps", 4),
                ("max_steps", 4),
                ("max_iter_cap", 5),
                ("lbfgs.max_iter", 10),
                ("alignment.points", 4),
                ("alignment.neighbours", 4),
            )
        ),
    ]
    cfg = make_cfg(tmp_path, "stage=all", *overrides)
    result = cli.run(cfg)
    assert list(result) == ["lm", "extract", "targets", "train", "eval"]
    assert Path(result["eval"]["report"]).is_file(), "stage=all ends with the evaluation report"
    assert set(result["train"]["summary"]) == {"months", "letters"}
    assert all(
        set(s) == {"gaga_out", "gaga_jac", "gaga_phate", "innsteer", "bridge"} for s in result["train"]["summary"].values()
    )
    assert all(0 <= s["innsteer"]["steering_success_mean"] <= 1 for s in result["train"]["summary"].values())
    assert set(result["lm"]["accuracy"]) == {"months", "letters"}
    assert result["lm"]["accuracy"]["months"] > 1 / 12, "400 steps must beat chance"
    with _store(cfg) as store:
        assert store.attrs["model_pretrained"].endswith("/lm")
        assert store.read("letters", ["h"])["h"].shape[1] == 64
    # Same config and seed: same weights, bit for bit.
    again = make_cfg(tmp_path, "stage=lm", "run_name=again", *overrides)
    cli.run(again)
    a = load_file(f"{cfg.paths.run_dir}/lm/model.safetensors")
    b = load_file(f"{again.paths.run_dir}/lm/model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # stage=all again: every product is current and nothing is redone.
    rerun = cli.run(cfg)
    assert rerun["lm"] == result["lm"] and rerun["extract"] == result["extract"]
    assert rerun["train"]["geometries"] == result["train"]["geometries"] and rerun["eval"] == result["eval"]
    assert rerun["targets"]["seconds"] == result["targets"]["seconds"], "the targets' recorded result: nothing redone"
    # The run copied under another name and moved away from: every product is current, and every record it reports
    # and every text it holds names the copy's files (or none), never the first run's folder.
    first = Path(cfg.paths.run_dir)
    shutil.copytree(first, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(first)
    copy = make_cfg(tmp_path / "elsewhere", "stage=all", "run_name=copy", *overrides)
    copied = cli.run(copy)
    assert copied["train"]["summary"] == result["train"]["summary"] and copied["lm"]["accuracy"] == result["lm"]["accuracy"]
    named = [v for stage in copied.values() for v in _paths(stage)]
    assert len(named) > 10 and all(Path(v).resolve().is_relative_to(Path(copy.paths.run_dir).resolve()) for v in named), named
    # (An export's sealed config.json names the LM's folder as it was when it trained: its provenance, kept.)
    texts = [f for f in Path(copy.paths.run_dir).rglob("*") if f.suffix in (".md", ".json", ".csv") and f.is_file()
             and not (f.name == "config.json" and f.parent.parent.parent.name == "geometry")]  # fmt: skip
    assert len(texts) > 10
    assert not [f for f in texts if str(first) in f.read_text() or f"{cfg.run_name}/" in f.read_text()]


def _paths(result, under: bool = False) -> list[str]:
    """Every file or folder a stage's result names."""
    if isinstance(result, dict):
        return [p for k, v in result.items() for p in _paths(v, under or k in products.PATH_KEYS)]
    if isinstance(result, list):
        return [p for v in result for p in _paths(v, under)]
    return [result] if under and isinstance(result, str) else []


def test_sharded_extraction_equals_one_process(tiny_cfg):
    """Two gloo ranks on the CPU write one shard each; the store reads as the single-process one, bit for bit."""
    one = tiny_cfg("run_name=one")
    two = tiny_cfg("run_name=two", "trainer=ddp_sim")
    assert extract.run(one)["ranks"] == 1
    result = extract.run(two)
    assert result["ranks"] == 2 and set(result["tasks"]) == {"weekdays", "months"}
    path = RunLayout.of(two).store
    _assert_same_store(RunLayout.of(one).store, path)
    with h5py.File(path, "r") as f:
        shards = [f"shards-{f.attrs['fingerprint']}/rank-{r}-of-2.h5" for r in range(2)]
        used = {t: [s.file_name for s in f[t]["h"].virtual_sources()] for t in f}
        for task in f:
            assert all([s.file_name for s in f[task][n].virtual_sources()] == used[task] for n in ("q", "top1"))
    # 714 prompts in chunks of 100: rank 0 takes weekdays and months' first chunk, rank 1 the rest of months
    assert used == {"weekdays": shards[:1], "months": shards}
    assert extract.run(two) == result, "a finished sharded store is current"


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_chunk_plan_covers_every_chunk_once_in_rank_order_with_balanced_prompts(world):
    sizes, size = {"a": 294, "b": 420, "c": 5, "d": 4725}, 100
    plans = [extract.chunk_plan(sizes, size, r, world) for r in range(world)]
    for task, n in sizes.items():
        stacked = [c for plan in plans for c in plan[task]]  # rank 0's chunks, then rank 1's, ...
        assert stacked == list(range(-(-n // size))), task
    prompts = [sum(min(size, sizes[t] - c * size) for t in sizes for c in plan[t]) for plan in plans]
    assert max(prompts) - min(prompts) <= 2 * size, prompts


def test_row_classes_take_the_lm_arg_max_and_leave_out_small_classes():
    q = np.zeros((23, 4))  # K = 3 concepts plus "other"
    own = np.array([0] * 12 + [1] * 3 + [2] * 8)
    q[np.arange(23), own] = 0.9
    q[:, 3] = 0.1
    answers = np.repeat([0, 1, 2], [8, 8, 7])
    labels, left_out = extract.row_classes(q, answers, "argmax", min_rows=5)
    assert left_out == {1: 3} and (labels == np.where(own == 1, -1, own)).all()
    labels, left_out = extract.row_classes(q, answers, "answer", min_rows=50)
    assert left_out == {} and (labels == answers).all(), "a task's answer classes are all kept"
    with pytest.raises(StageError, match="extract.classes='own'.*argmax"):
        extract.row_classes(q, answers, "own", 5)
