"""Distance targets as coordinates (docs/method.md §3): Hellinger and PHATE diffusion potential.

A target distance is the Euclidean distance between two rows of a coordinate
array, so nothing N×N is ever formed: memory is O(N·m). PHATE is Moon et al.
2019, "Visualizing structure and transitions in high-dimensional biological
data" (the `phate` package); its coordinates are the rows of the potential
`U = −log(Pᵗ + 1e-7)`, N×N exact or N×L with L landmarks.

One targets file per task (`<run>/targets/<task>.h5`, layout in docs/methods.md);
`PairwiseTargets` serves mini-batches of points with their target distances.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.linalg
import torch
from scipy.spatial.distance import pdist
from torch.utils.data import Sampler

from geosteer.data.store import ActivationStore, ensure_space, put_in_place, temp_path

log = logging.getLogger("geosteer")

TARGETS_SCHEMA_VERSION = 1
TARGET_NAMES = ("hellinger", "phate")


class TargetError(ValueError):
    """Targets that cannot be computed or read, with the fix in the message."""


def digest(*arrays: np.ndarray) -> str:
    """A short content hash of arrays: the cache key of what is computed from them."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def hellinger_coords(q: np.ndarray) -> np.ndarray:
    """`√q / √2`, so that ‖s_i − s_j‖ is the Hellinger distance, in [0, 1]. (N, K+1) → (N, K+1) float64."""
    return np.sqrt(np.clip(q.astype(np.float64), 0, None)) / np.sqrt(2)


def l2_normalise(h: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (docs/method.md §3: PHATE sees directions, not magnitudes). (N, d) float64."""
    h = h.astype(np.float64)
    return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)


def von_neumann_entropy(diff_op: np.ndarray, t_max: int = 100) -> np.ndarray:
    """Von Neumann entropy of `diff_opᵗ` for t = 0..t_max−1, as `phate.vne` defines it.

    Only the singular values are needed; `svdvals` skips the singular vectors
    that phate's full `scipy.linalg.svd` computes, for the same numbers in a
    fraction of the time. Not torch's SVD: after one of its (MKL) SVDs, the LM's
    float32 numbers later in the same process differ from run to run in the last
    bits, and a resumed targets stage would not give an uninterrupted one's pullback.
    """
    sv = scipy.linalg.svdvals(np.asarray(diff_op, dtype=np.float64), check_finite=False)
    entropy = np.empty(t_max)
    sv_t = sv.copy()
    for t in range(t_max):
        p = sv_t / sv_t.sum() + np.finfo(float).eps
        entropy[t] = -np.sum(p * np.log(p))
        sv_t = sv_t * sv
    return entropy


@dataclass(frozen=True)
class PhateTargets:
    coords: np.ndarray  # (N, N) exact or (N, L) with landmarks, float32
    t: int
    t_auto: bool
    landmarks: bool
    components: int  # connected components of the kNN graph; potentials saturate between components
    entropy: np.ndarray  # (t_max,) von Neumann entropy by t; empty when t was given


def phate_coords(
    h: np.ndarray,
    knn: int = 5,
    decay: float = 40,
    t: int | str = "auto",
    t_max: int = 100,
    n_pca: int | None = None,
    exact_max: int = 5000,
    n_landmark: int = 2000,
    seed: int = 0,
    n_jobs: int = 1,
) -> PhateTargets:
    """PHATE diffusion-potential coordinates of L2-normalised activations `h` (N, d).

    Exact (N×N) up to `exact_max` points, landmarks (N×`n_landmark`) above.
    `t='auto'` picks the knee of the von Neumann entropy, as phate does.
    """
    import phate  # heavy import (graphtools, sklearn): only where PHATE runs

    n = len(h)
    if n < knn + 1:
        raise TargetError(
            f"{n} points, but PHATE with knn={knn} needs at least {knn + 1}; "
            f"add prompts (templates or values) or lower targets.phate.knn."
        )
    if t != "auto" and not (isinstance(t, int) and t >= 1):
        raise TargetError(f"targets.phate.t={t!r}; use 'auto' or a positive integer.")
    landmarks = n > exact_max
    if landmarks and n_landmark >= n:
        log.warning("n_landmark=%d >= N=%d points: computing the exact potential instead", n_landmark, n)
        landmarks = False
    op = phate.PHATE(
        knn=knn,
        decay=decay,
        t=t,
        n_pca=n_pca,
        n_landmark=n_landmark if landmarks else None,
        random_state=seed,
        n_jobs=n_jobs,
        verbose=0,
    )
    with warnings.catch_warnings():  # reported through `components` instead
        warnings.filterwarnings("ignore", message="Graph is disconnected")
        op.fit(l2_normalise(h))
    entropy = np.empty(0)
    if t == "auto":
        entropy = von_neumann_entropy(op.diff_op, t_max)
        t = int(phate.vne.find_knee_point(entropy, np.arange(t_max)))
        op.set_params(t=t)
    components = int(op.graph.n_connected_components)
    if landmarks:  # phate's diff_potential interpolates L×L → N×L in float64; in float32 the peak memory halves
        potential = op._calculate_potential().astype(np.float32)  # (L, L)
        coords = op.graph.interpolate(potential, transitions=op.graph.transitions.astype(np.float32))
    else:
        coords = op.diff_potential.astype(np.float32)  # (N, N), the dtype it is stored in
    return PhateTargets(coords, t, entropy.size > 0, landmarks, components, entropy)


def pullback_factors(J: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` rows σ_j v_jᵀ of each point's factor J (its SVD), and the share of ‖J‖²_F they keep.

    FᵀF is JᵀJ's best rank-`rank` approximation, so a pullback metric stored as F loses only the trace
    share left out. J (N, R, D) → F (N, min(rank, R, D), D), kept (N,)
    """
    _, sv, Vh = np.linalg.svd(J.double().numpy(), full_matrices=False)  # (N, m), (N, m, D): numpy's, see von_neumann_entropy
    r = min(rank, sv.shape[1])
    kept = (sv[:, :r] ** 2).sum(1) / np.maximum((sv**2).sum(1), np.finfo(np.float64).tiny)
    return torch.from_numpy(sv[:, :r, None] * Vh[:, :r]).to(J.dtype), torch.from_numpy(kept)


MIN_SPLIT_ROWS = 3  # rows of each split: 3 pairs, the fewest a rank correlation of distances is defined on


def _split_sizes(counts: np.ndarray, val_fraction: float) -> tuple[int, int]:
    """(train, val) row counts of a stratified split of classes of `counts` rows each; every class keeps a train row."""
    val = int(sum(min(round(val_fraction * n), n - 1) for n in counts))
    return int(counts.sum()) - val, val


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val row indices, the same fraction of every class in val. Both sorted."""
    if not 0 < val_fraction < 1:
        raise TargetError(f"targets.val_fraction={val_fraction}; use a fraction strictly between 0 and 1.")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        val.append(rows[: min(round(val_fraction * len(rows)), len(rows) - 1)])
    val = np.sort(np.concatenate(val))
    train = np.setdiff1d(np.arange(len(labels)), val)
    if min(len(train), len(val)) < MIN_SPLIT_ROWS:
        counts = np.unique(labels, return_counts=True)[1]
        fits = [f for f in np.arange(0.05, 1, 0.05).round(2) if min(_split_sizes(counts, f)) >= MIN_SPLIT_ROWS]
        fix = (f"Use a fraction near {min(fits, key=lambda f: abs(f - 0.2))} (the default is 0.2)." if fits else
               f"No fraction gives both: the task has {len(labels)} rows (prompts x values); add prompts to its task "
               f"file.")  # fmt: skip
        raise TargetError(
            f"targets.val_fraction={val_fraction} leaves {len(train)} training and {len(val)} validation rows of "
            f"{len(labels)}; each split needs at least {MIN_SPLIT_ROWS}. {fix}"
        )
    return train, val


def stratified_sample(labels: np.ndarray, rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n of `rows`, each class (by `labels[rows]`) in proportion to its share of them, seeded and sorted.

    Classes are allotted by largest remainder, so the counts differ from exact proportion by less than one row.
    """
    rows = np.asarray(rows)
    if len(rows) <= n:
        return np.sort(rows)
    classes, counts = np.unique(labels[rows], return_counts=True)
    share = counts * n / len(rows)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share, kind="stable")[: n - take.sum()]] += 1  # largest remainders first
    rng = np.random.default_rng([seed, n])
    picked = [rng.choice(rows[labels[rows] == c], k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def pair_distance_std(coords: np.ndarray, rows: np.ndarray, n_pairs: int, seed: int, chunk: int = 2048) -> float:
    """Std of target distances over pairs of `rows`: all pairs when there are at most `n_pairs`, else a seeded sample."""
    n = len(rows)
    if n * (n - 1) // 2 <= n_pairs:
        return float(pdist(coords[rows].astype(np.float64)).std(ddof=1))
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # uniform over ordered pairs with i != j
    i, j = rows[i], rows[j]
    d = [
        np.linalg.norm(coords[i[s : s + chunk]].astype(np.float64) - coords[j[s : s + chunk]], axis=1)
        for s in range(0, n_pairs, chunk)
    ]  # numpy, not torch: converting numpy chunks to float64 tensors kept ~1 GiB resident at N = 50k
    return float(np.concatenate(d).std(ddof=1))


def _as_stored(name: str, value: Any) -> np.ndarray:
    """A group's array as the targets file stores it (coordinates as float32)."""
    return np.asarray(value, dtype=np.float32 if name == "coords" else None)


def group_digest(group: dict[str, Any]) -> str:
    """The SHA-256 of a group's arrays and attributes (but its own `content`): a group changed after it was written,
    or left half-made by a killed run, does not match it."""
    plain = lambda v: v.tolist() if isinstance(v, np.ndarray) else v.item() if isinstance(v, np.generic) else v  # noqa: E731
    attrs = {k: plain(v) for k, v in group.get("attrs", {}).items() if k != "content"}
    digest = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode())
    for name in sorted(k for k in group if k != "attrs"):
        a = np.ascontiguousarray(_as_stored(name, group[name]))
        digest.update(f"{name} {a.dtype.str} {a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def read_groups(path: Path, keys: dict[str, str], file_attrs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], bool]:
    """The groups of an existing targets file that can be reused: cache key as `keys` asks, content as written.

    Returns {name: {arrays..., "attrs": ...}} and whether the file is already exactly what
    `keys` and `file_attrs` ask for (nothing to write).
    """
    if not Path(path).is_file():
        return {}, False
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema_version") != TARGETS_SCHEMA_VERSION:
                return {}, False
            groups = {}
            for name, key in keys.items():
                if name in f and f[name].attrs.get("key") == key:
                    group = {**{k: v[:] for k, v in f[name].items()}, "attrs": dict(f[name].attrs)}
                    if group["attrs"].get("content") == group_digest(group):
                        groups[name] = group
                    else:
                        log.warning("%s: group %s is not as it was written; computing it again", path, name)
            same_attrs = {k: str(f.attrs.get(k)) for k in file_attrs} == {k: str(v) for k, v in file_attrs.items()}
            return groups, same_attrs and set(groups) == set(keys) == set(f)
    except OSError:
        log.warning("%s is unreadable; recomputing it", path)
        return {}, False


def replaced_groups(path: Path, keys: dict[str, str]) -> list[str]:
    """The groups an existing targets file holds under another cache key than `keys` asks: made from other inputs
    or settings, a rewrite would replace them. [] when the file is missing or unreadable."""
    try:
        with h5py.File(path, "r") as f:
            return [name for name in keys if name in f and f[name].attrs.get("key") != keys[name]]
    except OSError:
        return []


def write_targets(path: Path, file_attrs: dict[str, Any], groups: dict[str, dict[str, Any]]) -> None:
    """Write a targets file atomically: `groups` maps a group name to its arrays plus an "attrs" dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(path.parent, sum(np.asarray(v).nbytes for c in groups.values() for k, v in c.items() if k != "attrs"))
    tmp = temp_path(path)
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"schema_version": TARGETS_SCHEMA_VERSION, **file_attrs})
        for name, content in groups.items():
            g = f.create_group(name)
            g.attrs.update({**content["attrs"], "content": group_digest(content)})
            for k, v in content.items():
                if k == "coords":  # float32 halves the largest array; distances keep ~1e-7 relative precision
                    g.create_dataset(k, data=_as_stored(k, v), chunks=(min(len(v), 256), v.shape[1]))
                elif k != "attrs":
                    g.create_dataset(k, data=v)
    put_in_place(tmp, path)


def target_distances(coords: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised target distances d̂ of a batch, in `torch.pdist` order. (B, m) → (B(B−1)/2,)"""
    return torch.pdist(coords) / scale


class PointClouds(Sampler[torch.Tensor]):
    """Seeded random point clouds: each step draws B distinct rows, and ranks draw disjoint ones.

    Step s of epoch e permutes `rows` with a generator seeded by (seed, e, s); rank r
    takes the r-th slice of B. So every rank sees the same permutation without any
    communication, no two ranks share a row within a step, and the batches of a run
    are a function of the seed alone. B shrinks to len(rows) // world_size when the
    split is smaller than world_size · B.

    Args:
        rows: the store rows of the split.
        batch_size: B per rank.
        steps: steps per epoch.
        seed: base seed.
        rank, world_size: this process's DDP rank and the number of ranks.
    """

    def __init__(self, rows: np.ndarray, batch_size: int, steps: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size or len(rows) < world_size:
            raise TargetError(f"cannot split {len(rows)} rows over rank {rank} of {world_size}.")
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.batch_size = min(batch_size, len(rows) // world_size)
        self.steps, self.seed, self.rank, self.world_size, self.epoch = steps, seed, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, step]).generate_state(1)[0]))
            start = self.rank * self.batch_size
            yield self.rows[torch.randperm(len(self.rows), generator=g)[start : start + self.batch_size]]


@dataclass
class PairBatch:
    index: torch.Tensor  # (B,) store rows
    x: torch.Tensor  # (B, d) activations
    coords: torch.Tensor  # (B, m) target coordinates
    dist: torch.Tensor  # (B(B-1)/2,) target distances / pair std, in torch.pdist order


class PairwiseTargets:
    """Mini-batches of one task's activations with their normalised target distances.

    Files are opened lazily and read once on first use, so the object pickles
    cheaply into DataLoader workers and DDP ranks.

    Args:
        targets: a task's targets file, `<run>/targets/<task>.h5`.
        target: "hellinger" or "phate".
        split: "train", "val", or None for every row.
        activations: the activation store; by default the one the targets were made from.
        pullback: also serve each point's output-pullback factor F (G_out ≈ FᵀF, docs/method.md §6)
            as "pullback" (B, r, d), from the file's `pullback` group.
    """

    def __init__(self, targets: Path, target: str, split: str | None = "train", activations: Path | None = None,
                 pullback: bool = False, task: dict[str, Any] | None = None):  # fmt: skip
        if target not in TARGET_NAMES:
            raise TargetError(f"target '{target}' is unknown; use one of {TARGET_NAMES}.")
        if split not in ("train", "val", None):
            raise TargetError(f"split '{split}' is unknown; use train, val or None.")
        self.path, self.target, self.split, self.activations = Path(targets), target, split, activations
        self.pullback, self.task = pullback, task
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is not None:
            return self._data
        if not self.path.is_file():
            raise TargetError(f"no targets file at {self.path}; run `pipeline stage=targets` first.")
        try:
            return self._read()
        except (OSError, KeyError) as e:  # h5py: a truncated or foreign file, a missing group or attribute
            raise TargetError(
                f"{self.path} is not a readable targets file ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                f"it may be truncated or not written by geosteer. Delete it and re-run `pipeline stage=targets`."
            ) from e

    def _read(self) -> dict[str, Any]:
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("schema_version") != TARGETS_SCHEMA_VERSION:
                raise TargetError(
                    f"{self.path} has schema_version {f.attrs.get('schema_version')}, but this geosteer reads "
                    f"{TARGETS_SCHEMA_VERSION}; re-run `pipeline stage=targets`."
                )
            task, store_fp = f.attrs["task"], f.attrs["activations_fingerprint"]
            if self.task is not None:
                self._check_task(task, f.attrs.get("task_definition"))
            store_path = self.activations or self.path.parent / f.attrs["activations"]
            g = f[self.target]
            rows = np.arange(len(g["coords"])) if self.split is None else f["split"][self.split][:]
            coords, scale = torch.from_numpy(g["coords"][:]), float(g.attrs["pair_std"])
            attrs = {**f.attrs, "key": g.attrs["key"], "split_key": f["split"].attrs["key"]}
            factor = None
            if self.pullback:
                if "pullback" not in f:
                    raise TargetError(f"{self.path} has no output-pullback targets (group `pullback`); run "
                                      f"`pipeline stage=targets` with targets.pullback.rank ≥ 1.")  # fmt: skip
                factor = torch.from_numpy(f["pullback"]["factor"][:])
                attrs["pullback_key"] = f["pullback"].attrs["key"]
        with ActivationStore(store_path) as store:
            if store.attrs.get("fingerprint") != store_fp:
                raise TargetError(
                    f"{self.path} was computed from another activation store than {store_path} "
                    f"(fingerprint {store_fp}, now {store.attrs.get('fingerprint')}); re-run `pipeline stage=targets`."
                )
            arrays = store.read(task, ["h", "label"])
        x = torch.from_numpy(arrays["h"]).float()
        self._data = {"rows": rows, "x": x, "label": arrays["label"], "coords": coords, "scale": scale, "attrs": attrs,
                      "store": Path(store_path), "pullback": factor}  # fmt: skip
        return self._data

    def _check_task(self, name: str, definition: str | None) -> None:
        """Refuse targets of another task, or of another definition of it, than `self.task`."""
        asked = json.loads(json.dumps(self.task))
        if name != asked["name"] or definition is None or json.loads(definition) != asked:
            what = (f"the targets of task '{name}'" if name != asked["name"] else
                    f"targets of another definition of task '{name}'" if definition else "targets of an older geosteer")  # fmt: skip
            raise TargetError(
                f"{self.path} holds {what}, but task '{asked['name']}' as configured was asked for. Re-run "
                f"`pipeline stage=targets` to make its own (and `pipeline stage=extract overwrite=true` first if the "
                f"task's definition changed)."
            )

    @property
    def attrs(self) -> dict[str, Any]:
        """The targets file's attributes (task, layer, model_name, …) and the cache keys of this target and split."""
        return self._load()["attrs"]

    @property
    def store_path(self) -> Path:
        """The activation store these targets were computed from."""
        return self._load()["store"]

    @property
    def labels(self) -> np.ndarray:
        """Answer class of every store row (for figures and evaluation; training never reads it)."""
        return self._load()["label"]

    @property
    def rows(self) -> np.ndarray:
        """Store rows in this split, sorted."""
        return self._load()["rows"]

    @property
    def scale(self) -> float:
        """Std of target distances over training pairs; `dist` is divided by it."""
        return self._load()["scale"]

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: torch.Tensor | np.ndarray) -> PairBatch:
        """Points `index` (store rows) with their B(B−1)/2 target distances in `torch.pdist` order."""
        data = self._load()
        index = torch.as_tensor(index, dtype=torch.long)
        coords = data["coords"][index]  # (B, m)
        return PairBatch(index, data["x"][index], coords, target_distances(coords, data["scale"]))

    def __getitem__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """One whole mini-batch (a `PointClouds` draw): store rows, activations and target coordinates.

        The B(B−1)/2 distances are left to the training step (`target_distances`), on its device.
        """
        data = self._load()
        batch = {"index": index, "x": data["x"][index], "coords": data["coords"][index]}
        if data["pullback"] is not None:
            batch["pullback"] = data["pullback"][index]  # (B, r, d)
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # workers re-read the files rather than copy arrays through pickle
