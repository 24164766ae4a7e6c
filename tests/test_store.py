"""The HDF5 activation store: plain-h5py round trip, schema versions, damaged files."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from geosteer.data.store import (
    SCHEMA_VERSION,
    ActivationStore,
    ChunkDir,
    StoreError,
    read_shards,
    virtual_rows,
    write_shard,
    write_store,
    write_task_group,
)
from geosteer.data.tasks import ConceptSchema, load_task
from tests.conftest import TASK_DIR


def _write(path, compression="gzip"):
    task = load_task("weekdays", TASK_DIR)
    prompts = task.prompts()
    rng = np.random.default_rng(0)
    q = rng.dirichlet(np.ones(8), len(prompts)).astype(np.float32)
    rows = {"h": rng.normal(size=(len(prompts), 16)).astype(np.float32), "q": q, "top1": rng.integers(0, 50, len(prompts))}
    schema = ConceptSchema("weekdays", task.concepts, tuple((i,) for i in range(7)))
    write_store(
        path, {"layer": 2, "config": {"a": 1}}, lambda f: write_task_group(f, schema, task.to_dict(), prompts, rows, compression)
    )
    return prompts, rows


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_store_round_trips_with_plain_h5py(tmp_path, compression):
    path = tmp_path / "activations.h5"
    prompts, rows = _write(path, compression)
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f.attrs["layer"] == 2 and json.loads(f.attrs["config"]) == {"a": 1}
        g = f["weekdays"]
        for name, arr in rows.items():
            np.testing.assert_array_equal(g[name][:], arr)
        assert list(g["prompt"].asstr()[:]) == [p.text for p in prompts]
        assert list(g["entity"].asstr()[:]) == [p.entity for p in prompts]
        np.testing.assert_array_equal(g["label"][:], [p.label for p in prompts])
        np.testing.assert_array_equal(g["number"][:], [p.number for p in prompts])
        np.testing.assert_array_equal(g["template_id"][:], [p.template_id for p in prompts])
        assert json.loads(g.attrs["values"])[0] == "Monday" and g.attrs["K"] == 7
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file must be renamed away"
    with ActivationStore(path) as store:
        assert store.tasks == ["weekdays"]
        assert store.schema("weekdays").variant_ids[3] == (3,)
        np.testing.assert_array_equal(store.read("weekdays", ["h"])["h"], rows["h"])


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "activations.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=f"schema_version {SCHEMA_VERSION + 1}.*reads version {SCHEMA_VERSION}.*overwrite=true"):
        ActivationStore(path)


def test_truncated_store_is_refused(tmp_path):
    path = tmp_path / "activations.h5"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="not a readable HDF5 file.*re-run"):
        ActivationStore(path)


def test_missing_store_says_which_stage_makes_it(tmp_path):
    with pytest.raises(StoreError, match="stage=extract"):
        ActivationStore(tmp_path / "activations.h5")


def test_chunks_refuse_rows_of_other_prompts(tmp_path):
    chunks = ChunkDir(tmp_path)
    rows = {"h": np.zeros((2, 3)), "q": np.zeros((2, 4)), "top1": np.zeros(2)}
    chunks.write("t", 0, rows, ["a", "b"])
    chunks.write("t", 1, rows, ["c", "d"])
    assert len(chunks.read_task("t", {0: ["a", "b"], 1: ["c", "d"]})["h"]) == 4
    for wrong in ({0: ["c", "d"]}, {0: ["a", "b", "x"]}):  # another chunk's prompts; more prompts than rows
        with pytest.raises(StoreError, match="chunk_00000.npz does not hold the rows.*delete it"):
            chunks.read_task("t", wrong)
    with pytest.raises(StoreError, match=r"chunks \[2\] of task 't' are missing"):
        chunks.read_task("t", {2: ["e"]})
    other = ChunkDir(tmp_path / ".partial-another-config")  # the same prompts' rows, copied from another extraction
    other.path("t", 0).parent.mkdir(parents=True)
    shutil.copy(chunks.path("t", 0), other.path("t", 0))
    with pytest.raises(StoreError, match="does not hold the rows of chunk 0"):
        other.read_task("t", {0: ["a", "b"]})


def test_chunks_and_shards_refuse_rows_edited_after_they_were_written(tmp_path):
    """Rows reordered in place, the prompt record kept: only a digest of the rows themselves tells."""
    rows = {"h": np.arange(6.0).reshape(2, 3), "q": np.eye(2, 4), "top1": np.arange(2)}
    chunks = ChunkDir(tmp_path / "chunks")
    chunks.write("t", 0, rows, ["a", "b"])
    kept = dict(np.load(chunks.path("t", 0)))
    np.savez(chunks.path("t", 0), **{**kept, "h": kept["h"][::-1]})
    with pytest.raises(StoreError, match="chunk_00000.npz does not hold the rows of chunk 0.*changed or copied"):
        chunks.read_task("t", {0: ["a", "b"]})
    shard = tmp_path / "rank-0-of-1.h5"
    write_shard(shard, {"t": rows}, {"t": ["a", "b"]}, "none")
    with h5py.File(shard, "r+") as f:
        f["t/h"][0, 0] += 1
    with pytest.raises(StoreError, match="rank-0-of-1.h5 holds rows of task 't' other than those written"):
        read_shards({shard: ["a", "b"]}, "t")


def test_shards_refuse_rows_of_other_prompts(tmp_path):
    rows = {"h": np.zeros((2, 3)), "q": np.zeros((2, 4)), "top1": np.zeros(2)}
    shard = tmp_path / "rank-0-of-1.h5"
    write_shard(shard, {"t": rows}, {"t": ["a", "b"]}, "none")
    np.testing.assert_array_equal(read_shards({shard: ["a", "b"]}, "t")["q"], rows["q"])
    with pytest.raises(StoreError, match="rank-0-of-1.h5 does not hold the rows of task 't'"):
        read_shards({shard: ["b", "a"]}, "t")
    with pytest.raises(StoreError, match="rank-0-of-1.h5 does not hold the rows of task 'u'"):
        read_shards({shard: ["a", "b"]}, "u")


def test_virtual_rows_stack_shards_and_move_with_the_store(tmp_path):
    task = load_task("weekdays", TASK_DIR)
    prompts = task.prompts()
    rng = np.random.default_rng(0)
    rows = {"h": rng.normal(size=(len(prompts), 4)).astype(np.float32),
            "q": rng.dirichlet(np.ones(8), len(prompts)).astype(np.float32),
            "top1": rng.integers(0, 50, len(prompts))}  # fmt: skip
    cut = [0, 100, 100, len(prompts)]  # the middle rank holds no rows of this task
    shards = [tmp_path / "run" / "shards" / f"rank-{r}-of-3.h5" for r in range(3)]
    for r, shard in enumerate(shards):
        part = {k: v[cut[r] : cut[r + 1]] for k, v in rows.items()}
        texts = {"weekdays": [p.text for p in prompts[cut[r] : cut[r + 1]]]}
        write_shard(shard, {"weekdays": part} if cut[r + 1] > cut[r] else {}, texts, "gzip")
    store = tmp_path / "run" / "activations.h5"
    schema = ConceptSchema("weekdays", task.concepts, tuple((i,) for i in range(7)))
    layouts = virtual_rows(store, shards, "weekdays")
    write_store(store, {}, lambda f: write_task_group(f, schema, task.to_dict(), prompts, layouts, "gzip"))
    moved = tmp_path / "elsewhere"
    (tmp_path / "run").rename(moved)
    with ActivationStore(moved / "activations.h5") as s:
        for name, arr in s.read("weekdays", ["h", "q", "top1"]).items():
            np.testing.assert_array_equal(arr, rows[name])
    (moved / "shards" / "rank-2-of-3.h5").unlink()
    with pytest.raises(StoreError, match="rank-2-of-3.h5, which is missing.*beside it"):
        ActivationStore(moved / "activations.h5")
