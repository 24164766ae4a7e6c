"""Distance targets: parity with scipy and phate, landmarks, splits, the pair API, and stage=targets."""

from __future__ import annotations

import logging
import pickle

import h5py
import numpy as np
import phate
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from geosteer.data.store import SCHEMA_VERSION, ActivationStore
from geosteer.data.targets import (
    PairwiseTargets,
    TargetError,
    hellinger_coords,
    l2_normalise,
    pair_distance_std,
    phate_coords,
    stratified_sample,
    stratified_split,
)
from geosteer.pipeline import cli, extract, targets
from geosteer.pipeline.common import StageError
from geosteer.pipeline.products import RunLayout
from tests.conftest import make_cfg


def noisy_circle(n: int, seed: int = 0, d: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Points on a circle in a random 2-plane of R^d, with isotropic noise; returns (points, angles)."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    x = np.stack([np.cos(angle), np.sin(angle)], 1) @ rng.standard_normal((2, d)) / 4
    return x + 0.1 * rng.standard_normal((n, d)), angle


def test_hellinger_coords_match_the_bhattacharyya_definition():
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.full(6, 0.5), 40)
    q[1] = q[0]  # identical rows
    q[2], q[3] = [0.5, 0.5, 0, 0, 0, 0], [0, 0, 0.25, 0.25, 0.25, 0.25]  # disjoint supports

    def hellinger(p, r):
        return np.sqrt(max(1 - np.sum(np.sqrt(p * r)), 0))

    reference = pdist(q, hellinger)  # scipy's pairwise loop over the textbook definition
    ours = torch.pdist(torch.from_numpy(hellinger_coords(q))).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-6, rtol=0)
    s = hellinger_coords(q)
    assert np.linalg.norm(s[0] - s[1]) == 0
    np.testing.assert_allclose(np.linalg.norm(s[2] - s[3]), 1, atol=1e-12)


def test_exact_phate_distances_equal_the_phate_package():
    x, _ = noisy_circle(300)
    ours = phate_coords(x, knn=5, decay=40, n_pca=None, seed=3)
    op = phate.PHATE(knn=5, decay=40, t="auto", n_pca=None, n_landmark=None, random_state=3, verbose=0)
    op.fit(l2_normalise(x))
    reference = op.diff_potential  # phate's own t='auto', full SVD
    assert ours.t == op.optimal_t and ours.t_auto and not ours.landmarks
    assert ours.coords.dtype == np.float32  # the stored dtype: 24-bit mantissa, ~6e-8 relative per coordinate
    np.testing.assert_allclose(ours.coords, reference, rtol=1e-6)
    np.testing.assert_allclose(pdist(ours.coords.astype(np.float64)), pdist(reference), rtol=1e-5)


def test_landmark_phate_equals_the_phate_package_in_float32():
    x, _ = noisy_circle(600)
    ours = phate_coords(x, n_pca=None, exact_max=100, n_landmark=80, seed=1)
    op = phate.PHATE(knn=5, decay=40, t="auto", n_pca=None, n_landmark=80, random_state=1, verbose=0)
    reference = op.fit(l2_normalise(x)).diff_potential  # (N, L) float64
    assert ours.landmarks and ours.t == op.optimal_t and ours.coords.dtype == np.float32
    np.testing.assert_allclose(ours.coords, reference, rtol=1e-5)  # float32 has 24 bits: ~6e-8 relative


def test_phate_with_a_fixed_t_skips_the_entropy_and_uses_it():
    x, _ = noisy_circle(200)
    res = phate_coords(x, t=7, n_pca=None)
    op = phate.PHATE(knn=5, decay=40, t=7, n_pca=None, n_landmark=None, random_state=0, verbose=0).fit(l2_normalise(x))
    assert res.t == 7 and not res.t_auto and res.entropy.size == 0
    np.testing.assert_allclose(res.coords, op.diff_potential, rtol=1e-6)  # stored as float32


def test_landmark_distances_correlate_with_exact_ones():
    x, _ = noisy_circle(1000)
    exact = phate_coords(x, seed=0)
    approx = phate_coords(x, exact_max=0, n_landmark=100, seed=0)
    assert approx.landmarks and approx.coords.shape == (1000, 100)
    assert spearmanr(pdist(exact.coords), pdist(approx.coords)).statistic >= 0.9


def test_n_landmark_at_least_n_falls_back_to_exact_with_a_warning(caplog):
    x, _ = noisy_circle(120)
    with caplog.at_level(logging.WARNING, logger="geosteer"):
        res = phate_coords(x, exact_max=50, n_landmark=500)
    assert not res.landmarks and res.coords.shape == (120, 120)
    assert "n_landmark=500 >= N=120" in caplog.text


def test_too_few_points_for_knn_is_refused():
    with pytest.raises(TargetError, match=r"5 points, but PHATE with knn=5 needs at least 6.*targets.phate.knn"):
        phate_coords(np.random.default_rng(0).normal(size=(5, 8)), knn=5)


def test_stratified_split_is_seeded_disjoint_and_covers_every_class():
    labels = np.repeat(np.arange(7), [40, 41, 42, 43, 44, 45, 5])
    train, val = stratified_split(labels, 0.2, seed=1)
    assert np.intersect1d(train, val).size == 0 and np.union1d(train, val).tolist() == list(range(len(labels)))
    for k in range(7):
        n_k = (labels == k).sum()
        assert (labels[val] == k).sum() == round(0.2 * n_k) and (labels[train] == k).sum() > 0
    again = stratified_split(labels, 0.2, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))
    assert not np.array_equal(val, stratified_split(labels, 0.2, seed=2)[1])


def test_pair_std_is_exact_on_all_pairs_and_close_on_a_sample():
    coords = np.random.default_rng(0).normal(size=(400, 5))
    rows = np.arange(0, 400, 2)
    every = pdist(coords[rows])
    assert pair_distance_std(coords, rows, n_pairs=len(every), seed=0) == pytest.approx(every.std(ddof=1), rel=1e-12)
    sampled = pair_distance_std(coords, rows, n_pairs=5000, seed=0)
    assert sampled == pytest.approx(every.std(ddof=1), rel=0.05)  # std of a std estimate from 5000 pairs is ~1 %


@pytest.fixture(scope="module")
def targets_run(tmp_path_factory, tiny_lm_dir):
    """stage=extract then stage=targets on the tiny LM (weekdays + months)."""
    tmp = tmp_path_factory.mktemp("targets")

    def cfg(*o):
        return make_cfg(
            tmp, "tasks=[weekdays,months]", f"model.pretrained={tiny_lm_dir}", "model.embedded=false",
            "model.layer=1", "extract.batch_size=64", "targets.figures=false", *o,
        )  # fmt: skip

    extract.run(cfg())
    return cfg, targets.run(cfg())


def test_stage_writes_a_file_per_task_with_both_targets_and_a_split(targets_run):
    cfg, result = targets_run
    for task, summary in result["tasks"].items():
        with h5py.File(RunLayout.of(cfg()).targets_file(task), "r") as f:
            n = summary["n"]
            assert f["hellinger/coords"].shape == (n, f["hellinger"].attrs["dim"])
            assert f["phate/coords"].shape == (n, n) and not f["phate"].attrs["landmarks"]
            assert (
                f["phate"].attrs["knn"] == cfg().targets.phate.knn
                and f["phate"].attrs["t"] >= 1
                and f["phate"].attrs["n_pca"] == 64
            )
            train, val = f["split/train"][:], f["split/val"][:]
            assert len(train) + len(val) == n and np.intersect1d(train, val).size == 0
            assert f.attrs["activations_fingerprint"]


def test_batches_come_in_pdist_order_and_normalised_by_the_train_pair_std(targets_run):
    cfg, result = targets_run
    path = RunLayout.of(cfg()).targets_file("weekdays")
    pairs = PairwiseTargets(path, "hellinger", split="train")
    index = pairs.rows[[5, 0, 17, 3, 9]]  # any order
    batch = pairs.batch(index)
    with h5py.File(path, "r") as f:
        coords = f["hellinger/coords"][:].astype(np.float64)
    i, j = np.triu_indices(len(index), 1)  # torch.pdist order: (0,1), (0,2), ..., (1,2), ...
    expected = np.linalg.norm(coords[index[i]] - coords[index[j]], axis=1) / pairs.scale
    np.testing.assert_allclose(batch.dist.numpy(), expected, rtol=1e-5)
    train_pairs = pdist(coords[pairs.rows])
    assert pairs.scale == pytest.approx(train_pairs.std(ddof=1), rel=1e-5)  # weekdays: all training pairs
    with ActivationStore(RunLayout.of(cfg()).store) as store:
        np.testing.assert_array_equal(batch.x.numpy(), store.read("weekdays", ["h"])["h"][index])
    clone = pickle.loads(pickle.dumps(pairs))
    assert clone._data is None and torch.equal(clone.batch(index).dist, batch.dist)
    val = PairwiseTargets(path, "phate", split="val")
    assert len(val) + len(pairs) == result["tasks"]["weekdays"]["n"] and val.scale == pytest.approx(
        PairwiseTargets(path, "phate").scale
    ), "every split is normalised by the same training-pair std"


def test_rerun_is_a_no_op_and_a_changed_parameter_recomputes_only_its_group(targets_run):
    cfg, result = targets_run
    path = RunLayout.of(cfg()).targets_file("months")
    before = path.read_bytes()
    again = targets.run(cfg())
    assert path.read_bytes() == before
    assert again["seconds"] == result["seconds"], "the recorded result of the same config, nothing computed"
    with pytest.raises(StageError, match="made by a different config"):
        targets.run(cfg("targets.phate.knn=6"))
    assert path.read_bytes() == before
    changed = targets.run(cfg("targets.phate.knn=6", "overwrite=true"))
    s = changed["tasks"]["months"]
    assert s["hellinger"]["cached"] and not s["phate"]["cached"]
    with h5py.File(path, "r") as f:
        assert f["phate"].attrs["knn"] == 6
    targets.run(cfg("overwrite=true"))  # back to the defaults for the other tests


def test_identical_config_gives_identical_coordinates(targets_run, tmp_path):
    cfg, result = targets_run
    path = RunLayout.of(cfg()).targets_file("weekdays")
    copy = tmp_path / "weekdays.h5"
    copy.write_bytes(path.read_bytes())
    path.unlink()
    targets.run(cfg())
    with h5py.File(path, "r") as a, h5py.File(copy, "r") as b:
        for name in ("hellinger/coords", "phate/coords", "split/train", "split/val"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert a["phate"].attrs["t"] == b["phate"].attrs["t"]


def test_nan_activations_name_the_task_and_the_row_count(tiny_cfg):
    cfg = tiny_cfg("tasks=[weekdays]")
    extract.run(cfg)
    store = RunLayout.of(cfg).store
    with h5py.File(store, "r+") as f:
        h = f["weekdays/h"][:]
        h[[3, 10, 11]] = np.nan
        f["weekdays/h"][...] = h
    (store.parent / "stage.json").unlink()  # no record to compare with: the targets stage's own check must see it
    with pytest.raises(TargetError, match=r"task 'weekdays': 3 of 294 rows .* NaN or Inf \(first at row 3\)"):
        targets.run(cfg)
    assert not RunLayout.of(cfg).targets_file("weekdays").exists()


def test_missing_or_foreign_store_is_refused_with_the_fix(tiny_cfg):
    cfg = tiny_cfg("tasks=[weekdays]")
    with pytest.raises(Exception, match="no activation store.*stage=extract"):
        cli.run(tiny_cfg("tasks=[weekdays]", "stage=targets"))
    extract.run(cfg)
    with h5py.File(RunLayout.of(cfg).store, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    (RunLayout.of(cfg).store.parent / "stage.json").unlink()  # no record: the store's own version check must see it
    with pytest.raises(Exception, match=f"schema_version {SCHEMA_VERSION + 1}.*overwrite=true"):
        targets.run(cfg)


def test_bad_target_settings_are_refused():
    with pytest.raises(TargetError, match="val_fraction=1.5"):
        stratified_split(np.zeros(10), 1.5, 0)
    with pytest.raises(TargetError, match="the task has 7 rows .*add prompts to its task file"):
        stratified_split(np.arange(7), 0.2, 0)  # one row per class: no fraction leaves 2 rows in each split
    with pytest.raises(TargetError, match="leaves 294 training and 0 validation rows.*Use a fraction near 0.2"):
        stratified_split(np.repeat(np.arange(7), 42), 0.001, 0)
    with pytest.raises(TargetError, match="t='soon'"):
        phate_coords(noisy_circle(20)[0], t="soon")
    with pytest.raises(TargetError, match="target 'cosine' is unknown"):
        PairwiseTargets("x.h5", "cosine")


def test_a_stratified_sample_keeps_every_class_share_to_within_one_row():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [400, 40, 7, 300, 1])  # store order over-represents the first class
    rows = np.sort(rng.choice(len(labels), 600, replace=False))
    sample = stratified_sample(labels, rows, 100, seed=1)
    assert len(sample) == 100 and len(np.unique(sample)) == 100 and set(sample) <= set(rows)
    classes, counts = np.unique(labels[rows], return_counts=True)
    taken = dict(zip(*np.unique(labels[sample], return_counts=True)))
    for c, n in zip(classes, counts):
        assert abs(taken.get(c, 0) - 100 * n / len(rows)) < 1, f"class {c}"
    assert np.array_equal(sample, stratified_sample(labels, rows, 100, seed=1))
    assert not np.array_equal(sample, stratified_sample(labels, rows, 100, seed=2))
    assert np.array_equal(stratified_sample(labels, rows[:50], 100, seed=1), rows[:50]), "fewer rows than n: all of them"
