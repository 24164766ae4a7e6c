"""The public Python API refuses arguments it cannot use, naming the call, the argument and what it takes,
before torch fails deep inside or returns garbage; the forms it documents still work."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from geosteer import (
    GAGA,
    PCA,
    CarrierTail,
    EncoderPullback,
    FisherPullback,
    GeodesicBridge,
    GeometryMismatch,
    InnSteer,
    LabelledSpline,
    OutputPullback,
    intervene,
    lbfgs_geodesic,
    linear_path,
    load_geometry,
    path_energy,
    pullback_of,
    steer,
)
from geosteer.models.hub import CheckpointError, PushError, seal
from geosteer.models.metrics import scaled_lam
from geosteer.models.steering import fishback_direction

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
        (lambda: InnSteer(D, 0), r"InnSteer: num_classes=0 must be an integer ≥ 2\."),
        (lambda: InnSteer(D, 1), r"InnSteer: num_classes=1 must be an integer ≥ 2\."),
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
    with pytest.raises(ValueError, match=r"PCA.fit: x holds NaN or Inf"):
        PCA.fit(torch.full_like(h, math.nan), 2)
    with pytest.raises(ValueError, match=r"PCA.project: x must be a floating tensor \(…, 6\); got .* shape \(4, 7\)"):
        PCA.fit(h, 2).project(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"path_energy: path must be paths of two or more waypoints"):
        path_energy(h.unsqueeze(1), metric)
    assert path_energy(h[:0].unsqueeze(1).expand(0, 3, -1), metric).shape == (0,), "no path: no energy"
    assert lbfgs_geodesic(h[:0], h[:0], metric, 4).shape == (0, 5, h.shape[1]), "no pair: no path"
    with pytest.raises(TypeError, match=r"EncoderPullback: encoder=5 must be a module or function"):
        EncoderPullback(5)
    with pytest.raises(ValueError, match=r"λ_reg = lam_rel=1e\+308 × the metric's eigenvalue scale 10 is inf: lower"):
        scaled_lam(1e308, 10.0)


def test_a_saved_geometry_is_readable_as_open_makes_files_and_seals_without_meta(tmp_path):
    """A network built by hand (no meta) saves and seals; model.safetensors gets the umask's mode, as config.json
    does, so a group that shares the run can read it."""
    GAGA(D, 2, hidden=[8]).save_pretrained(tmp_path)
    seal(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_a_save_over_an_export_checks_meta_first_and_replaces_its_files_whole(tmp_path):
    """meta holds plain JSON values: anything else is refused when the network is built, or, added later, before a
    save writes anything (an export already in the folder is left as it was). A NaN fact is saved as null."""
    folder = tmp_path / "g"
    GAGA(D, 2, hidden=[8], meta={"family": "gaga", "note": "kept"}).save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    other = GAGA(D, 2, hidden=[8], meta={"family": "gaga"})
    other.meta["score"] = np.float32(0.5)  # a fact added after construction, of numpy's kind
    with pytest.raises(TypeError, match=r"GAGA.save_pretrained: meta\['score'\]=np.float32\(0.5\) .*float\(x\)"):
        other.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and os.listdir(tmp_path) == ["g"]
    for meta in ({"a": np.int64(1)}, {"a": Path("x")}, {"a": torch.ones(2)}, {(1, 2): 2}, [1]):
        with pytest.raises(TypeError, match=r"GAGA: meta"):
            GAGA(D, 2, hidden=[8], meta=meta)
    other.meta["score"] = float("nan")
    other.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert saved["meta"].pop("digest") and saved["meta"] == {"family": "gaga", "score": None}, "sealed as it is saved"
    reloaded = load_geometry(folder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), other.state_dict().values()))
    with torch.no_grad():  # a loaded export changed and saved again: its old digest goes, the new save is sealed
        next(reloaded.parameters()).add_(1.0)
    reloaded.meta["note"], reloaded.meta[3] = "changed", "a number's key"
    reloaded.save_pretrained(tmp_path / "changed")
    again = load_geometry(tmp_path / "changed")
    assert torch.equal(next(again.parameters()), next(reloaded.parameters())) and again.meta["3"] == "a number's key"
    reloaded.meta["layer"] = "1"
    with pytest.raises(TypeError, match=r"save_pretrained: meta.layer='1': not of the kind an export holds"):
        reloaded.save_pretrained(tmp_path / "layer")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match=r"save_pretrained: .*a_file is a file; give a folder"):
        other.save_pretrained(tmp_path / "a_file")
    with pytest.raises(TypeError, match=r"push_to_hub=True needs repo_id='owner/name'"):
        other.save_pretrained(tmp_path / "push", push_to_hub=True)
    with pytest.raises(TypeError, match=r"private: keywords of a push, given without push_to_hub=True"):
        other.save_pretrained(tmp_path / "push", private=True)
    for pushed in (False, True):  # a keyword no push takes: refused before the folder is written
        with pytest.raises(TypeError, match=r"bogus: not keywords of a push, which takes repo_id, .* endpoint, "):
            other.save_pretrained(tmp_path / "push", push_to_hub=pushed, repo_id="me/geometry", bogus=1)
    for nowhere in ("", " ", None):
        with pytest.raises(TypeError, match=r"save_directory=.* names no folder; give the folder"):
            other.save_pretrained(nowhere)
    saved = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(PushError, match=r"repo_id='not a repo' is not a Hub repo id"):
        other.save_pretrained(folder, push_to_hub=True, repo_id="not a repo")
    with pytest.raises(TypeError, match=r"private='yes' \(True or False\): not of the kind a push takes"):
        other.save_pretrained(folder, push_to_hub=True, repo_id="me/geometry", private="yes")
    with pytest.raises(CheckpointError, match=r"cannot make the folder .*a_file .*is a part of that path a file"):
        other.save_pretrained(tmp_path / "a_file" / "x")
    lm = tmp_path / "lm"  # a model's folder, or a run's products: not an export to save over
    lm.mkdir()
    (lm / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"lm holds a config.json or weights that are not a geometry export's"):
        other.save_pretrained(lm)
    (lm / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lm holds tokenizer.json, which no geometry export holds"):
        other.save_pretrained(lm)
    weights = tmp_path / "weights"  # another model's weights alone, or beside a config.json that does not read
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"another model")
    for config in (None, '{"model_type": "lla', "[1, 2]"):
        if config is not None:
            (weights / "config.json").write_text(config)
        with pytest.raises(CheckpointError, match=r"weights holds a config.json or weights that are not a geometry "):
            other.save_pretrained(weights)
    assert (weights / "model.safetensors").read_bytes() == b"another model"
    shutil.rmtree(weights)
    (tmp_path / "as_folder" / "config.json").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"as_folder holds config.json as a folder, not a file"):
        other.save_pretrained(tmp_path / "as_folder")
    shutil.rmtree(tmp_path / "as_folder")
    with pytest.raises(TypeError, match=r"push_to_hub='false' must be True or False"):
        other.save_pretrained(folder, push_to_hub="false", repo_id="me/geometry")
    assert sorted(os.listdir(lm)) == ["config.json", "tokenizer.json"] and (lm / "config.json").read_text()[1] == '"'
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved, "a refused push leaves the folder as it was"
    with pytest.raises(TypeError, match=r"repo_id: keywords of a push, given without push_to_hub=True"):
        other.save_pretrained(tmp_path / "push", repo_id="me/geometry")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"dangling is a link to nothing"):
        other.save_pretrained(tmp_path / "dangling")
    cycle: dict = {}
    cycle["c"] = cycle
    for meta, message in (({"family": "gaga", "c": cycle}, r"meta\['c'\]\['c'\] holds itself"),
                          ({"family": "gaga", 7: "a", "7": "b"}, r"keys that JSON writes alike \(\['7'\]"),
                          ({"family": "innsteer"}, r"meta.family='innsteer', but this is a gaga geometry")):  # fmt: skip
        other.meta = meta
        with pytest.raises(TypeError, match=message):
            other.save_pretrained(tmp_path / "push")
    other.meta = {"family": "gaga"}
    with torch.no_grad():
        next(other.parameters())[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"the weights hold NaN or Inf \(\['encoder"):
        other.save_pretrained(tmp_path / "push")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "changed", "dangling", "g", "lm"], "a refused save writes nothing"


def test_an_export_saved_again_drops_what_it_no_longer_is(tmp_path):
    """A loaded export, changed and saved over itself, is no longer the training's product: the training config's
    fingerprint and the recorded metric scale go (eval fits λ again), and so do the stage's record, the model card
    and the training figure of the old one. Unchanged, it saves as it was (its digest, card and figure too)."""
    export = tmp_path / "gaga_out"
    meta = {"family": "gaga", "layer": 1, "fingerprint": "abc", "metrics": {"metric_scale": 25.0, "val_spearman": 0.9}}
    GAGA(D, 2, hidden=[8], meta=meta).save_pretrained(export)
    (export / "stage.json").write_text("{}")  # the train stage's record of it, its card and its figure
    (export / "README.md").write_text("# gaga_out: val_spearman 0.9")
    (export / "training.png").write_bytes(b"a figure")
    loaded = load_geometry(export)
    assert loaded.meta["fingerprint"] == "abc" and loaded.meta["metrics"]["metric_scale"] == 25.0, "a first save keeps all"
    loaded.save_pretrained(tmp_path / "copy")  # unchanged: saved as it was
    assert load_geometry(tmp_path / "copy").meta == loaded.meta
    loaded.save_pretrained(export)  # over itself, unchanged
    assert load_geometry(export).meta == loaded.meta and (export / "training.png").exists()
    assert (export / "README.md").read_text() == "# gaga_out: val_spearman 0.9", "the card of the same export is kept"
    with torch.no_grad():
        next(loaded.parameters()).mul_(0.5)
    loaded.save_pretrained(export)
    again = load_geometry(export)
    assert "fingerprint" not in again.meta and again.meta["metrics"] == {"val_spearman": 0.9}
    assert not (export / "stage.json").exists() and not (export / "training.png").exists()
    assert "val_spearman 0.9" not in (export / "README.md").read_text(), "the old export's card went with it"


def test_a_local_export_refuses_hub_arguments_and_a_file_of_it_names_the_folder(tmp_path):
    """A revision or Hub option with a folder here would be ignored; an export's config.json is not the export."""
    GAGA(D, 2, hidden=[8]).save_pretrained(tmp_path)
    for call in (lambda: load_geometry(tmp_path, revision="abc123"), lambda: GAGA.from_pretrained(tmp_path, revision="v1"),
                 lambda: load_geometry(tmp_path, cache_dir=str(tmp_path))):  # fmt: skip
        with pytest.raises(CheckpointError, match=r"is a folder here, which has no revision or Hub options"):
            call()
    with pytest.raises(CheckpointError, match=rf"config.json is a file of an export; give the export's folder, {tmp_path}"):
        load_geometry(tmp_path / "config.json")


# ---------------------------------------------------------------- the LM's tail, its metrics and the intervention


@pytest.fixture(scope="module")
def tail():
    """A random 3-block Llama (width 32) with the weekdays word tokenizer, and the tail of four carriers at block 1."""
    from tests.conftest import random_weekdays_lm

    model, tokenizer, prompts = random_weekdays_lm(hidden_size=32, intermediate_size=64)
    texts = [p.text for p in prompts[:4]]
    return model, tokenizer, texts, CarrierTail.of_prompts(model, tokenizer, 1, texts)


def test_the_tail_and_the_intervention_refuse_what_they_cannot_use(tail):
    model, tokenizer, texts, ct = tail
    for layer in (99, 3, -1, 1.0):
        with pytest.raises(ValueError, match=rf"CarrierTail.of_prompts: layer={layer!r} must be an integer in 0 … 2"):
            CarrierTail.of_prompts(model, tokenizer, layer, texts)
    for prompts in (np.array([]), [], texts[0], [1, 2]):
        with pytest.raises(ValueError, match=r"CarrierTail.of_prompts: prompts must be a non-empty list of strings"):
            CarrierTail.of_prompts(model, tokenizer, 1, prompts)
    ids = tokenizer(texts[:2], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"CarrierTail: input_ids holds token id 1000, outside the model's vocabulary"):
        CarrierTail(model, 1, torch.full_like(ids.input_ids, 1000), ids.attention_mask)
    assert len(CarrierTail.of_prompts(model, tokenizer, 2, np.array(texts[:3], dtype=object))) == 3  # arrays work
    for dtype in (torch.bool, torch.uint8, torch.int16):  # the embedding takes int64 and int32 ids alone
        with pytest.raises(ValueError, match=rf"CarrierTail: input_ids must be an int64 \(or int32\) tensor \(C, T\).*{dtype}"):
            CarrierTail(model, 1, ids.input_ids.to(dtype), ids.attention_mask)
    with pytest.raises(ValueError, match=r"CarrierTail.of_prompts: prompt 0 \(''\) has no token"):
        CarrierTail.of_prompts(model, tokenizer, 1, ["", texts[0]])
    shape = r"intervene: h must be a floating tensor \(N, 32\) with carrier \(N,\), or \(W, C, 32\) with C ≤ 4"
    for h in (torch.randn(3, 2, 64), torch.randn(3, 5, 128), torch.randn(3, 5, 32), torch.randn(3, 32), [0.0]):
        with pytest.raises(ValueError, match=shape):
            intervene(ct, h)
    with pytest.raises(ValueError, match=shape + r".* got a torch.float32 tensor of shape \(3, 64\) and a carrier"):
        intervene(ct, torch.randn(3, 64), torch.arange(3))
    with pytest.raises(ValueError, match=r"intervene: carrier holds 7; it must be an integer in 0 … 3"):
        intervene(ct, torch.randn(3, 32), torch.tensor([0, 1, 7]))
    with pytest.raises(ValueError, match=r"intervene: carrier must be a 1-D integer tensor \(N,\) = \(3,\)"):
        intervene(ct, torch.randn(3, 32), torch.arange(2))
    h = ct.h.expand(2, -1, -1)  # the carriers' own h: the unsteered logits, in either form
    torch.testing.assert_close(intervene(ct, h), ct.logits0.expand(2, -1, -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(intervene(ct, ct.h[[2, 0]], torch.tensor([2, 0])), ct.logits0[[2, 0]], rtol=1e-4, atol=1e-4)
    assert intervene(ct, h[:, :3]).shape == (2, 3, ct.logits0.shape[1])  # the first C ≤ 4 carriers
    with pytest.raises(ValueError, match=r"steer: carrier holds 4; it must be an integer in 0 … 3"):
        steer(ct, torch.arange(5), [[5], [6]], 1, lambda h, c: h, 0.1)
    with pytest.raises(ValueError, match=r"fishback_direction: top_k=0 must be an integer ≥ 1 \(or None\)"):
        fishback_direction(ct, [[5], [6]], 1, top_k=0)
    assert steer(ct, torch.arange(4), [[5], [6]], 1, lambda h, c: h, 0.1, max_steps=0).h.shape == (1, 4, 32)
    unit = lambda h, c: torch.nn.functional.normalize(h, dim=1)  # noqa: E731
    for args, message in (
        ((torch.arange(4), [[5], [6]], 2, unit, 0.1), r"steer: target=2 must be an integer in 0 … 1"),
        ((torch.arange(4), [[5], [6]], 1.5, unit, 0.1), r"steer: target=1.5 must be an integer in 0 … 1"),
        ((torch.arange(4), [[5], [6]], torch.tensor([0, 1]), unit, 0.1), r"steer: target must be one value or a 1-D"),
        ((torch.arange(4), [[5], [6]], 1, unit, "x"), r"steer: step='x' must be a finite number ≥ 0"),
        ((torch.arange(4), [[5], [6]], 1, unit, float("nan")), r"steer: step=nan must be a finite number ≥ 0"),
        ((torch.arange(4), [[5], [6]], 1, unit, torch.ones(3)), r"steer: step must be one value or a 1-D tensor"),
        ((torch.arange(4), [], 1, unit, 0.1), r"steer: variant_ids=\[\] must be a non-empty list of concepts"),
        ((torch.arange(4), [[10**9]], 0, unit, 0.1), r"steer: variant_ids holds token id 1000000000"),
        ((torch.arange(0), [[5], [6]], 1, unit, 0.1), r"steer: carrier holds no carrier"),
        ((torch.arange(4), [[5], [6]], 1, lambda h, c: h[:, :3], 0.1), r"steer: direction must map h \(4, 32\)"),
        ((torch.arange(4), [[5], [6]], 1, lambda h, c: None, 0.1), r"steer: direction must map h .* it gave NoneType"),
    ):
        with pytest.raises(ValueError, match=message):
            steer(ct, *args, threshold=0.99)
    for step in (torch.tensor(-0.1), torch.tensor(math.nan)):  # one step for all, as a 0-d tensor
        with pytest.raises(ValueError, match=r"steer: step must hold finite floats ≥ 0 \(one per carrier\); got \["):
            steer(ct, torch.arange(2), [[5], [6]], 1, unit, step, max_steps=2)
    for dtype in (torch.uint8, torch.int16, torch.int8, torch.bool):  # torch reads uint8 and bool as masks
        with pytest.raises(TypeError, match=rf"carrier must be an integer .* got a {dtype} tensor"):
            intervene(ct, ct.h[:2], torch.tensor([0, 1], dtype=dtype))
        with pytest.raises(TypeError, match=rf"carrier must be an integer .* got a {dtype} tensor"):
            steer(ct, torch.tensor([1, 0], dtype=dtype), [[5], [6]], 1, unit, 0.1, max_steps=2)
    for threshold in (math.nan, -1.0, 0.0):  # at or below 0 every carrier counts as reached before a step
        with pytest.raises(ValueError, match=rf"steer: threshold={threshold} must be a finite number > 0"):
            steer(ct, torch.arange(4), [[5], [6]], 1, unit, 0.1, threshold=threshold)
    with pytest.raises(ValueError, match=r"steer: step must be a float tensor .*got torch.int64: pass step.float\(\)"):
        steer(ct, torch.arange(2), [[5], [6]], 1, unit, torch.tensor([1, 1]), max_steps=2)
    assert intervene(ct, torch.randn(0, 32), torch.zeros(0, dtype=torch.long)).shape == (0, ct.logits0.shape[1])
    with pytest.raises(ValueError, match=r"CarrierTail.select: index holds 5; it must be an integer in 0 … 3"):
        ct.select(torch.tensor([5]))


def test_the_output_and_fisher_metrics_and_the_spline_refuse_what_they_cannot_use(tail):
    _, _, _, ct = tail
    V = ct.logits0.shape[1]
    with pytest.raises(ValueError, match=rf"OutputPullback: variant_ids holds token id 1000000000, outside the vocabulary; "
                                         rf"token ids are integers in 0 … {V - 1}"):  # fmt: skip
        OutputPullback(ct, [[10**9]], carrier=0)
    with pytest.raises(ValueError, match=r"OutputPullback.sqrt_q: h must be \(N, 32\), the LM's width at block 1; got "
                                         r"shape \(2, 33\)"):  # fmt: skip
        OutputPullback(ct, [[5], [6]], carrier=0).sqrt_q(torch.randn(2, 33))
    for variants in ([], [[5], []], "ab"):
        with pytest.raises(ValueError, match=r"OutputPullback: variant_ids=.* must be a non-empty list of concepts"):
            OutputPullback(ct, variants, carrier=0)
    with pytest.raises(ValueError, match=r"OutputPullback: carrier=9 must be an integer in 0 … 3, .*the tail's 4 carriers"):
        OutputPullback(ct, [[5]], carrier=9)
    with pytest.raises(ValueError, match=r"FisherPullback: carrier holds -1; it must be an integer in 0 … 3"):
        FisherPullback(ct, carrier=torch.tensor([0, -1]))
    with pytest.raises(TypeError, match=r"OutputPullback: carrier must be .* got a torch.float32 tensor"):
        OutputPullback(ct, [[5]], carrier=torch.zeros(2))
    with pytest.raises(ValueError, match=r"FisherPullback: top_k=0 must be an integer ≥ 1 \(or None\)"):
        FisherPullback(ct, carrier=0, top_k=0).jacobian(ct.h)
    with pytest.raises(ValueError, match=r"OutputPullback: lam=-1 must be a finite number ≥ 0"):
        OutputPullback(ct, [[5]], lam=-1)
    with pytest.raises(TypeError, match=r"FisherPullback: tail must be a models.tail.CarrierTail"):
        FisherPullback("tail")
    assert OutputPullback(ct, [[5], [6, 7]], carrier=torch.arange(4)).jacobian(ct.h).shape == (4, 3, 32)
    for variants in ([[5], [5], [6]], [[5, 5], [6]]):  # a token in two concepts would count twice: Σq > 1
        with pytest.raises(ValueError, match=r"OutputPullback: variant_ids holds token id 5 more than once"):
            OutputPullback(ct, variants, carrier=0)
    for call, message in (
        (lambda: OutputPullback(ct, [[5]], carrier=0).jacobian(torch.randn(2, 31)), r"OutputPullback.jacobian: x must"),
        (lambda: OutputPullback(ct, [[5]], carrier=0).jacobian(torch.randn(32)), r"OutputPullback.jacobian: x must"),
        (lambda: FisherPullback(ct, carrier=0).jacobian(torch.randn(2, 31)), r"FisherPullback.jacobian: x must"),
        (lambda: OutputPullback(ct, [[5]], carrier=0).jvp_vjp(ct.h[:2], torch.randn(2, 33)), r"jvp_vjp: v must be"),
        (lambda: OutputPullback(ct, [[5]], carrier=0).jvp_vjp(ct.h[:2], torch.randn(3, 32)), r"jvp_vjp: v must be one"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert FisherPullback(ct, carrier=3, top_k=3).jacobian(ct.h[:2]).shape == (2, 3, 32)

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(4)
    h = torch.randn(20, D, generator=g, dtype=torch.float64)
    spline = LabelledSpline(h, labels, cyclic=True, n_components=3)
    with pytest.raises(ValueError, match=r"LabelledSpline.path: b=7 is not one of the spline's classes \[0, 1, 2, 3, 4\]"):
        spline.path(0, 7, 4)
    with pytest.raises(ValueError, match=r"LabelledSpline.path: n_steps=0 must be an integer ≥ 1"):
        spline.path(0, 3, 0)
    assert spline.path(0, 3, 4).shape == (5, 3) and spline.path(torch.tensor(4), np.int64(1), 2).shape == (3, 3)
    broken = h.clone()
    broken[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"LabelledSpline: h holds NaN or Inf"):
        LabelledSpline(broken, labels, cyclic=True)
    with pytest.raises(ValueError, match=r"LabelledSpline: n_components=0 must be an integer ≥ 1"):
        LabelledSpline(h, labels, cyclic=False, n_components=0)
    with pytest.raises(ValueError, match=r"LabelledSpline: labels must be an integer tensor \(20,\)"):
        LabelledSpline(h, labels[:3], cyclic=False)
    with pytest.raises(ValueError, match=r"LabelledSpline: cyclic='no' must be True"):
        LabelledSpline(h, labels, cyclic="no")
    with pytest.raises(ValueError, match=r"LabelledSpline: labels must be an integer tensor"):
        LabelledSpline(h, labels > 2, cyclic=False)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \(20,\), one class per row of h; got "
                                         r"torch.float32 of shape \(20,\)"):  # fmt: skip
        LabelledSpline(h, labels.float(), cyclic=False)
    with pytest.raises(ValueError, match=r"LabelledSpline.path: a=0.0 is not one of the spline's classes"):
        spline.path(0.0, 2, 4)
    with pytest.raises(ValueError, match=r"LabelledSpline: labels hold 1 class\(es\) \[0\]"):
        LabelledSpline(h, torch.zeros(20, dtype=torch.long), cyclic=False)
    # A k above min(N, d) keeps every direction (the pipeline's PCA(64) on a narrower model), as documented.
    assert LabelledSpline(h, labels, cyclic=False, n_components=64).centroids.shape == (5, D)
