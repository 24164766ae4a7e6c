"""Steering generation with a shipped geometry: the context manager, its checks, and stage=steer."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from geosteer.models.hub import (
    SHIPPED,
    CheckpointError,
    GeometryMismatch,
    PushError,
    load_geometry,
    push_geometry,
    seal,
)
from geosteer.models.lm import decoder_layers, load_causal_lm, read_last_token, replace_last_token
from geosteer.models.steer import (
    Concepts,
    Steering,
    SteeringError,
    control_vector,
    steering_point,
    write_control_vector,
)
from geosteer.models.task_lm import build_task_lm
from geosteer.pipeline import train
from geosteer.pipeline.products import write_stamp
from tests.hub_server import local_hub

GEOMETRIES = ("gaga_out", "innsteer", "bridge")
PROMPTS = ["Q: What day is two days after Monday?\nA:", "Q: What day is five days after Friday?\nA:"]


@pytest.fixture(scope="module")
def shipped(prepared, tiny_lm_dir):
    """GAGA-Out, INNSteer and a bridge trained on weekdays of the tiny LM; the LM and its tokenizer."""
    cfg = prepared("steered", "geometry.innsteer.num_blocks=2", "geometry.innsteer.hidden=16", geometries=GEOMETRIES,
                   epochs=2)  # fmt: skip
    train.run(cfg)
    lm, tokenizer = load_causal_lm(str(tiny_lm_dir), "float32")
    folders = {g: train.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / g for g in GEOMETRIES}
    # The tiny LM's arg-max q never gives some days, so the flow learns no mean for them and refuses them as targets
    # (tested on its own). These tests check steering's mechanics on every class: the export is made one whose
    # learned classes are not recorded (as before the record), sealed and recorded again.
    config = json.loads((folders["innsteer"] / "config.json").read_text())
    config["meta"]["metrics"].pop("classes_trained")
    (folders["innsteer"] / "config.json").write_text(json.dumps(config))
    seal(folders["innsteer"])
    stamp = json.loads((folders["innsteer"] / "stage.json").read_text())
    write_stamp(folders["innsteer"], stamp["stage"], stamp["fingerprint"], stamp["result"])
    return {g: load_geometry(f) for g, f in folders.items()}, lm, tokenizer, cfg


def logits(lm, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm(**enc).logits[:, -1]


def test_logits_after_the_block_equal_the_unsteered_ones_bit_for_bit(shipped):
    geometries, lm, tokenizer, _ = shipped
    before = logits(lm, tokenizer)
    with Steering(lm, geometries["gaga_out"], "Thursday", alpha=1.0):
        during = logits(lm, tokenizer)
    assert not torch.equal(during, before)
    assert torch.equal(logits(lm, tokenizer), before)


def test_the_hook_is_removed_when_the_block_raises(shipped):
    geometries, lm, tokenizer, _ = shipped
    block = decoder_layers(lm)[int(geometries["gaga_out"].meta["layer"])]
    with pytest.raises(KeyboardInterrupt), Steering(lm, geometries["gaga_out"], "Thursday"):
        assert len(block._forward_hooks) == 1
        raise KeyboardInterrupt
    assert len(block._forward_hooks) == 0


@pytest.mark.parametrize("name, method", [("gaga_out", "geometry"), ("bridge", "geometry"), ("gaga_out", "linear")])
def test_paths_that_end_on_the_target_centroid_inject_it_at_alpha_one(shipped, name, method):
    """At α = 1 the geodesic, the bridge and the chord all end on c_b: the LM sees exactly what eval injects there."""
    geometries, lm, tokenizer, _ = shipped
    with Steering(lm, geometries[name], "Thursday", alpha=1.0, method=method) as s:
        steered = logits(lm, tokenizer)
    c_b = s.concepts.centroids[s.target].expand(len(PROMPTS), -1)
    assert torch.equal(s.last[1], c_b)
    with replace_last_token(lm, s.layer, c_b):
        assert torch.equal(steered, logits(lm, tokenizer))


@pytest.mark.parametrize("name", ["gaga_out", "bridge"])
def test_alpha_zero_leaves_the_model_as_it_was(shipped, name):
    geometries, lm, tokenizer, _ = shipped
    with Steering(lm, geometries[name], "Thursday", alpha=0.0) as s:
        steered = logits(lm, tokenizer)
    torch.testing.assert_close(s.last[1], s.last[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(steered, logits(lm, tokenizer), rtol=0, atol=1e-4)


def test_innsteer_moves_h_by_its_closed_form(shipped):
    geometries, lm, tokenizer, _ = shipped
    flow = geometries["innsteer"]
    with Steering(lm, flow, "Thursday", alpha=0.5) as s:
        logits(lm, tokenizer)
    h = s.last[0]
    target = s.concepts.values.index("Thursday")
    expected = flow.steer(h, flow.classify(flow.encode(h)), target, 0.5)
    torch.testing.assert_close(s.last[1], expected)


def test_generation_is_steered_at_the_prompt_and_with_every_token_at_each_new_token(shipped):
    geometries, lm, tokenizer, _ = shipped
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    new = 3
    for every_token, steered_forwards in ((False, 1), (True, new)):
        with Steering(lm, geometries["gaga_out"], "Thursday", method="linear", every_token=every_token) as s:
            out = lm.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert s.calls == steered_forwards and out.shape[1] == enc.input_ids.shape[1] + new
    first = tokenizer.decode(out[0, enc.input_ids.shape[1]]).strip()
    c = s.concepts
    with replace_last_token(lm, s.layer, c.centroids[s.target][None]):
        q = read_last_token(lm, enc.input_ids, enc.attention_mask, s.layer, c.variant_ids).q[0]
    assert (first == "Thursday") == (int(q.argmax()) == s.target), "greedy generation follows the injected point"


def test_a_prompt_that_extends_the_last_one_and_a_prompt_after_a_cached_prefix_are_steered(shipped):
    """A second prompt that starts with the first is a new prompt (a generation step adds one token), and so is a
    prompt whose prefix is already in the cache: each is steered at its own last token, as when given alone."""
    from transformers import DynamicCache

    geometries, lm, tokenizer, _ = shipped
    first, second = PROMPTS[0], PROMPTS[0] + " Wednesday\n" + PROMPTS[1]
    enc = tokenizer(second, return_tensors="pt")
    with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as alone:
        lm.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as s:
        lm.generate(**tokenizer(first, return_tensors="pt"), max_new_tokens=2, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        lm.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert s.calls == 2, "each prompt steered once"
    torch.testing.assert_close(s.last[0], alone.last[0])  # the same h: the second prompt's own last token
    prefix = tokenizer(first, return_tensors="pt").input_ids
    with torch.no_grad():
        cache = lm(prefix, past_key_values=DynamicCache(), use_cache=True).past_key_values
    with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as cached:
        lm.generate(**enc, past_key_values=cache, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert cached.calls == 1
    torch.testing.assert_close(cached.last[0], alone.last[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call", ["generate", "forward"])
def test_a_prompt_one_token_longer_than_the_last_is_a_new_prompt(shipped, call):
    """The last prompt plus one token, in a new generate() (its cache starts empty) or a plain forward pass, is
    steered at its own last token, not read as the last prompt's next step."""
    geometries, lm, tokenizer, _ = shipped
    first = tokenizer(PROMPTS[0], return_tensors="pt")
    longer = tokenizer(PROMPTS[0] + " Thursday", return_tensors="pt")
    assert longer.input_ids.shape[1] == first.input_ids.shape[1] + 1 and torch.equal(longer.input_ids[:, :-1], first.input_ids), (
        "the second prompt must be the first plus one token"
    )

    def run(enc):
        if call == "generate":
            lm.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        else:
            lm(**enc)

    with torch.no_grad():
        with Steering(lm, geometries["gaga_out"], "Saturday", method="linear") as alone:
            run(longer)
        with Steering(lm, geometries["gaga_out"], "Saturday", method="linear") as s:
            run(first)
            run(longer)
    assert s.calls == 2, "each prompt steered once"
    torch.testing.assert_close(s.last[0], alone.last[0])


def test_a_right_padded_batch_is_refused_not_steered_at_its_padding(shipped):
    """Steering moves the last position: a right-padded row's last position is padding, so such a batch is refused;
    the same prompts left-padded are steered."""
    geometries, lm, tokenizer, _ = shipped
    side = tokenizer.padding_side
    try:
        tokenizer.padding_side = "right"
        enc = tokenizer([PROMPTS[0], PROMPTS[0] + " Monday Monday"], return_tensors="pt", padding=True)
        with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as s, torch.no_grad():
            with pytest.raises(SteeringError, match=r"prompts must be left-padded.*padding_side = 'left'"):
                lm(**enc)
        assert s.calls == 0
        tokenizer.padding_side = "left"
        enc = tokenizer([PROMPTS[0], PROMPTS[0] + " Monday Monday"], return_tensors="pt", padding=True)
        with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as s, torch.no_grad():
            lm(**enc)
        assert s.calls == 1
    finally:
        tokenizer.padding_side = side


@pytest.mark.parametrize("every_token", [False, True])
def test_generation_without_the_cache_is_steered_as_with_it(shipped, every_token):
    """Without a KV cache each pass recomputes the prompt: its last token is steered in every pass (and, with
    every_token, each generated one), so the tokens equal those of a cached generation."""
    geometries, lm, tokenizer, _ = shipped
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    outs = []
    for cache in (True, False):
        with Steering(lm, geometries["bridge"], "Thursday", alpha=0.7, every_token=every_token):
            outs.append(lm.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=cache,
                                    pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    assert torch.equal(*outs)


def test_drafting_generation_is_refused_inside_the_block_and_generate_is_the_models_own_after_it(shipped):
    """Prompt lookup and assistant models pass drafted tokens through the model in passes of several tokens, which
    the hooks would take for prompts: refused, whether asked in the call or by the generation config."""
    geometries, lm, tokenizer, _ = shipped
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    plain = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    config = copy.deepcopy(lm.generation_config)
    config.prompt_lookup_num_tokens = 2
    asks = [("prompt_lookup_num_tokens", {"prompt_lookup_num_tokens": 2}), ("assistant_model", {"assistant_model": lm}),
            ("prompt_lookup_num_tokens", {"generation_config": config})]  # fmt: skip
    for named, ask in asks:
        with Steering(lm, geometries["gaga_out"], "Thursday", method="linear") as s:
            with pytest.raises(SteeringError, match=rf"generate\(\) with {named} drafts tokens"):
                lm.generate(**enc, **ask, **plain)
            lm.generate(**enc, **plain)  # the same block still steers plain generation
        assert s.calls == 1, ask
        assert "generate" not in vars(lm), "the model's own generate is back after the block"
    lm.generate(**enc, prompt_lookup_num_tokens=2, **plain)  # outside a Steering block, drafting is the model's business


def test_steering_works_inside_inference_mode_and_cannot_be_entered_twice(shipped):
    geometries, lm, tokenizer, _ = shipped
    steering = Steering(lm, geometries["gaga_out"], "Thursday", alpha=0.5)  # the L-BFGS geodesic needs gradients
    with torch.inference_mode(), steering:
        logits(lm, tokenizer)
    assert steering.calls == 1 and not torch.equal(steering.last[0], steering.last[1])
    block = decoder_layers(lm)[steering.layer]
    with pytest.raises(SteeringError, match="already in use"), steering, steering:
        pass
    assert len(block._forward_hooks) == 0 and len(lm._forward_pre_hooks) == 0
    other = Steering(lm, geometries["gaga_out"], "Monday", method="linear")
    with pytest.raises(SteeringError, match=r"another Steering \(toward 'Thursday'\) is active on this model"), steering, other:
        pass
    assert len(block._forward_hooks) == 0 and len(lm._forward_pre_hooks) == 0 and "generate" not in vars(lm)
    with other:  # once the first has exited, the second may enter
        assert other.calls == 0


def test_an_export_whose_concepts_are_not_whole_is_refused(shipped):
    geometries, lm, _, _ = shipped
    geometry = geometries["gaga_out"]
    concepts = geometry.meta["concepts"]
    for broken in ({"centroids": [row[:-1] if row else row for row in concepts["centroids"]]},
                   {"centroids": [[math.nan] * 32] + concepts["centroids"][1:]},
                   {"variant_ids": concepts["variant_ids"][:-1]}, {"values": ["Monday"] * 7}):  # fmt: skip
        geometry.meta["concepts"] = {**concepts, **broken}
        try:
            with pytest.raises(GeometryMismatch, match="meta.concepts .* is not whole"):
                Steering(lm, geometry, "Thursday")
        finally:
            geometry.meta["concepts"] = concepts


def test_a_geometry_is_refused_on_a_model_it_was_not_trained_on(shipped):
    geometries, lm, tokenizer, _ = shipped
    other = build_task_lm(tokenizer, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32)
    with pytest.raises(GeometryMismatch, match=r"hidden_size 16 \(geometry's: 32\)"):
        Steering(other, geometries["gaga_out"], "Thursday")
    torch.manual_seed(1)
    twin = build_task_lm(tokenizer, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64)  # the shape alone
    with pytest.raises(GeometryMismatch, match=r"this model's weights differ from that LM's \(weight sketch .* apart"):
        Steering(twin, geometries["gaga_out"], "Thursday")
    Steering(copy.deepcopy(lm).to(torch.bfloat16), geometries["gaga_out"], "Thursday")  # its own weights, rounded
    with pytest.raises(ValueError, match=r"target 'Caturday' is not a concept.*'Monday'"):
        Steering(lm, geometries["gaga_out"], "Caturday")
    for alpha in (1.5, -0.1, "0.5", None, [0.5], math.nan, True):
        with pytest.raises(SteeringError, match=r"alpha=.* must be a number in \[0, 1\]"):
            Steering(lm, geometries["gaga_out"], "Thursday", alpha=alpha)
    with pytest.raises(SteeringError, match=r"alpha=tensor\(0.5000\) must be a number in \[0, 1\].*pass alpha.item\(\)"):
        Steering(lm, geometries["gaga_out"], "Thursday", alpha=torch.tensor(0.5))


def test_the_python_api_refuses_bad_arguments_before_any_pass(shipped):
    """Each wrong argument is named with what it takes, when the object is made, not inside the model's hook."""
    geometries, lm, _, cfg = shipped
    for source in (None, 5, ""):
        with pytest.raises(TypeError, match=r"an export folder's path or a Hub repo id \('owner/name'\)"):
            load_geometry(source)
    with pytest.raises(TypeError, match=r"revision=5 must be a branch, tag or commit id"):
        load_geometry("lab/geo", revision=5)
    for bad in ({"d": 32, "layer": "1"}, {"d": 32.0}, {"d": -1}):
        with pytest.raises(TypeError, match=r"must be a whole number ≥ 0"):
            load_geometry(export_folder(cfg, "gaga_out"), **bad)
    with pytest.raises(SteeringError, match=r"stepz: not settings of the steering; the geodesic solver takes"):
        Steering(lm, geometries["gaga_out"], "Thursday", stepz=4)
    for solver in ({"steps": 1}, {"max_iter": 2.5}, {"lam_rel": -1.0}, {"lam_rel": 1e300}, {"history_size": "20"}):
        with pytest.raises(SteeringError, match=rf"{next(iter(solver))}=.*: steps is a whole number ≥ 2, max_iter"):
            Steering(lm, geometries["gaga_out"], "Thursday", **solver)
    with pytest.raises(SteeringError, match=r"geometry=object is not a geosteer geometry"):
        Steering(lm, object(), "Thursday")
    with pytest.raises(SteeringError, match=r"model=Linear is not a Hugging Face causal LM"):
        Steering(torch.nn.Linear(2, 2), geometries["gaga_out"], "Thursday")
    with pytest.raises(SteeringError, match=r"source 'March' is not a concept of this geometry"):
        Steering(lm, geometries["gaga_out"], "Thursday", source="March")
    with pytest.raises(PushError, match=r"folder=3 is not an export folder here"):
        push_geometry(3, "lab/geo")
    with pytest.raises(PushError, match=r"pushing \S*gaga_out to the Hub repo a/b--c failed \(HFValidationError"):
        push_geometry(export_folder(cfg, "gaga_out"), "a/b--c")
    with pytest.raises(SteeringError, match=r"every_token='no' must be True or False"):
        Steering(lm, geometries["gaga_out"], "Thursday", every_token="no")
    assert Steering(lm, geometries["gaga_out"], "Thursday", alpha=np.float32(0.5), steps=np.int64(4)).alpha == 0.5
    for geometry, method in (("gaga_out", "geometry"), ("gaga_out", "linear"), ("bridge", "geometry")):
        with pytest.raises(SteeringError, match=rf"source='Monday' is used by method='caa' and by INNSteer geometries.*"
                                                rf"method='{method}' with a \w+ geometry steers toward the target"):  # fmt: skip
            Steering(lm, geometries[geometry], "Thursday", method=method, source="Monday")
    for geometry, method in (("gaga_out", "caa"), ("innsteer", "geometry"), ("bridge", "geometry")):
        with pytest.raises(SteeringError, match=r"lam_rel: settings of the L-BFGS geodesic, which only a GAGA geometry"):
            Steering(lm, geometries[geometry], "Thursday", method=method, lam_rel=5.0)
    Steering(lm, geometries["gaga_out"], "Thursday", method="caa", source="Monday")
    Steering(lm, geometries["innsteer"], "Thursday", source="Monday")


def test_a_class_the_flow_learned_no_mean_for_is_refused_as_a_target(shipped):
    """INNSteer steers to a class's learned latent mean: a class without training points has none (its mean is the
    untrained start), so the flow's own path to it is refused; the centroid methods still steer to it."""
    import copy

    geometries, lm, _, _ = shipped
    flow = copy.deepcopy(geometries["innsteer"])
    flow.meta["metrics"] = {**flow.meta["metrics"], "classes_trained": [0, 1, 2, 4, 5, 6]}  # no Thursday (3)
    with pytest.raises(SteeringError, match=r"\['Thursday'\]: this flow learned no latent mean for it.*method='linear'"):
        Steering(lm, flow, "Thursday")
    with pytest.raises(SteeringError, match=r"\['Thursday'\]: this flow learned no latent mean"):
        Steering(lm, flow, "Friday", source="Thursday")
    Steering(lm, flow, "Thursday", method="linear")
    Steering(lm, flow, "Friday")


def test_a_geometry_given_by_its_folder_steers_as_the_loaded_one(shipped):
    geometries, lm, tokenizer, cfg = shipped
    steered = []
    for geometry in (geometries["innsteer"], export_folder(cfg, "innsteer"), str(export_folder(cfg, "innsteer"))):
        with Steering(lm, geometry, "Thursday", alpha=0.6):
            steered.append(logits(lm, tokenizer))
    assert torch.equal(steered[0], steered[1]) and torch.equal(steered[0], steered[2])


def steer_command(cfg, *overrides) -> list[str]:
    run_dir = train.Path(cfg.paths.run_dir)
    return [f"paths.outputs={run_dir.parent}", f"run_name={run_dir.name}", "logger=none",
            f"model.pretrained={cfg.model.pretrained}", "model.embedded=false", "model.layer=1", "tasks=[weekdays]",
            "stage=steer", "steer.target=Thursday", f"steer.prompt={json.dumps(PROMPTS[0])}", *overrides]  # fmt: skip


def test_stage_steer_names_model_embedded_when_the_embedded_lm_is_read_as_an_outside_one(shipped, capsys, monkeypatch,
                                                                                         tmp_path, tiny_lm_dir):  # fmt: skip
    from geosteer.pipeline.products import lm_fingerprint, write_stamp
    from tests.test_bad_input import pipeline_command

    _, _, _, cfg = shipped
    lm = tmp_path / "run" / "lm"  # an embedded LM, with the record stage=lm leaves
    shutil.copytree(tiny_lm_dir, lm)
    write_stamp(lm, "lm", "trained", {})
    other = tmp_path / "weekdays" / "gaga_out"  # a geometry trained on it
    shutil.copytree(train.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "gaga_out", other)
    (other / "stage.json").unlink()
    config = json.loads((other / "config.json").read_text())
    config["meta"]["lm_fingerprint"] = lm_fingerprint({"pretrained": str(lm), "embedded": True})
    (other / "config.json").write_text(json.dumps(config))
    seal(other)
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(steer_command(cfg, f"steer.geometry={other}", f"model.pretrained={lm}"), capsys)
    assert code == 1 and "Traceback" not in printed, printed
    assert re.search(r"trained on the embedded LM at \S+, which model.embedded=false reads as an outside LM.*Pass "
                     r"model.embedded=true", printed), printed  # fmt: skip
    copy = tmp_path / "copy"  # the same weights without the record: the weight sketch tells they are the ones
    shutil.copytree(lm, copy, ignore=shutil.ignore_patterns("stage.json"))
    code, printed = pipeline_command(steer_command(cfg, f"steer.geometry={other}", f"model.pretrained={copy}"), capsys)
    assert code == 0 and "has its weights (weight sketch 0.0000 apart): steering it" in printed, printed


def test_stage_steer_prints_both_generations_and_draws_q_along_alpha(shipped, capsys, monkeypatch):
    from tests.test_bad_input import pipeline_command

    geometries, lm, tokenizer, cfg = shipped
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=gaga_out", "steer.alpha=0.45"), capsys)
    assert code == 0 and "unsteered:" in printed and "steered:" in printed, printed
    (result,) = (train.Path(cfg.paths.run_dir) / "steer").glob("weekdays-gaga_out-geometry-Thursday-a0.45-*.json")
    saved = json.loads(result.read_text())
    assert saved["figure"] == f"<run>/steer/{result.stem}.png", "named in the run, as any copy of it reads"
    assert result.with_suffix(".png").stat().st_size > 0
    enc = tokenizer(PROMPTS[:1], return_tensors="pt")
    with Steering(lm, geometries["gaga_out"], "Thursday", alpha=0.45) as s:
        q = read_last_token(lm, enc.input_ids, enc.attention_mask, s.layer, s.concepts.variant_ids).q[0]
    assert saved["prompt"] == PROMPTS[0], "a typed \\n is a newline"
    assert (saved["every_token"], saved["max_new_tokens"]) == (cfg.steer.every_token, cfg.steer.max_new_tokens)
    assert saved["q_after"]["Thursday"] == pytest.approx(float(q[s.target]), abs=1e-4), "q after is read at α itself"
    by_task = pipeline_command(steer_command(cfg, "steer.geometry=weekdays/gaga_out", "steer.alpha=0.45"), capsys)
    steered = [line for line in printed.splitlines() if "steered:" in line]
    assert by_task[0] == 0 and steered == [line for line in by_task[1].splitlines() if "steered:" in line], by_task
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=gaga_out", "steer.alpha=0.45",
                                                   f"steer.prompt={json.dumps(PROMPTS[1])}"), capsys)  # fmt: skip
    assert code == 0 and result.read_text() == json.dumps(saved, indent=1), "another prompt's result is written beside"
    before = set(result.parent.glob("weekdays-gaga_out-geometry-Thursday-a0.45-*.json"))
    assert len(before) == 2
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=gaga_out", "steer.alpha=0.45", "eval.steps=3",
                                                   "eval.lbfgs.max_iter=5"), capsys)  # fmt: skip
    (coarse,) = set(result.parent.glob("weekdays-gaga_out-geometry-Thursday-a0.45-*.json")) - before
    with Steering(lm, geometries["gaga_out"], "Thursday", alpha=0.45, steps=3, max_iter=5) as s:
        q3 = read_last_token(lm, enc.input_ids, enc.attention_mask, s.layer, s.concepts.variant_ids).q[0]
    saved = json.loads(coarse.read_text())
    assert code == 0 and saved["solver"]["steps"] == 3, "the geodesic is eval's: solved with its settings"
    assert saved["solver"] == {"steps": 3, "lam_rel": 1e-3, "max_iter": 5, "history_size": 20}
    assert saved["q_after"]["Thursday"] == pytest.approx(float(q3[s.target]), abs=1e-4)
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=gaga_out", "model.layer=0"), capsys)
    assert code == 0 and "was trained at block 1 and steers there; model.layer=0 is not applied" in printed, printed


def test_targets_one_file_name_part_stands_for_are_written_apart(shipped, capsys, monkeypatch):
    """A file name's parts are lossy (`safe` writes Grün and Grön alike): the hash beside them covers every setting."""
    from geosteer.pipeline import steer as steer_stage
    from tests.test_bad_input import pipeline_command

    _, _, _, cfg = shipped
    plain = steer_stage.safe
    monkeypatch.setattr(steer_stage, "safe", lambda part, most=40: "T" if part in ("Thursday", "Tuesday") else plain(part, most))
    monkeypatch.setattr(sys, "argv", sys.argv)
    for target in ("Thursday", "Tuesday"):
        code, printed = pipeline_command(steer_command(cfg, "steer.geometry=gaga_out", f"steer.target={target}",
                                                       "steer.alpha=0.35"), capsys)  # fmt: skip
        assert code == 0, printed
    written = sorted((train.Path(cfg.paths.run_dir) / "steer").glob("weekdays-gaga_out-geometry-T-a0.35-*"))
    assert sorted(json.loads(f.read_text())["target"] for f in written if f.suffix == ".json") == ["Thursday", "Tuesday"]
    for f in written:  # the module's other tests find the results of their own α alone
        f.unlink()


def test_steer_geometry_as_task_and_name_is_the_runs_and_a_path_written_as_one_is_that_path(shipped, capsys,
                                                                                            monkeypatch, tmp_path):  # fmt: skip
    """`weekdays/gaga_out` is the run's export even when the working directory holds a folder of that name; `./…`
    is a path alone; the result records the folder it steered with, whole."""
    from tests.test_bad_input import pipeline_command

    _, _, _, cfg = shipped
    run = train.Path(cfg.paths.run_dir)
    decoy = tmp_path / "weekdays" / "gaga_out"  # another family's export under the name
    shutil.copytree(run / "geometry" / "weekdays" / "innsteer", decoy)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    for given, used in (("weekdays/gaga_out", run / "geometry" / "weekdays" / "gaga_out"), ("./weekdays/gaga_out", decoy)):
        code, printed = pipeline_command(steer_command(cfg, f"steer.geometry={given}", "steer.alpha=0.3"), capsys)
        assert code == 0, printed
        (result,) = (run / "steer").glob("*-a0.3-*.json")  # removed after each: the one this command wrote
        inside = "<run>/geometry/weekdays/gaga_out" if used.is_relative_to(run) else str(used.resolve())
        assert json.loads(result.read_text())["geometry"] == inside, given
        result.unlink()


def test_a_bridge_whose_encoder_was_trained_again_is_steered_with_a_warning(shipped, capsys, monkeypatch, tmp_path):
    """The bridge approximates its encoder's geodesics: once that encoder is trained again, the bridge follows the
    old geometry, and stage=steer says so with the fix (stage=eval shares the check)."""
    from tests.test_bad_input import pipeline_command

    _, _, _, cfg = shipped
    run = tmp_path / "run"
    shutil.copytree(train.Path(cfg.paths.run_dir) / "geometry", run / "geometry")
    bridge = run / "geometry" / "weekdays" / "bridge"
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(steer_command(cfg, f"steer.geometry={bridge}"), capsys)
    assert code == 0 and "trained again since" not in printed, printed
    encoder = run / "geometry" / "weekdays" / "gaga_out"
    config = json.loads((encoder / "config.json").read_text())
    config["meta"]["fingerprint"] = "0123456789abcdef"  # as another config's training exports it
    (encoder / "config.json").write_text(json.dumps(config))
    seal(encoder)
    code, printed = pipeline_command(steer_command(cfg, f"steer.geometry={bridge}"), capsys)
    assert code == 0 and re.search(r"trained against the encoder \S+gaga_out of fingerprint [0-9a-f]{16}; that export is "
                                   r"now 0123456789abcdef \(trained again since\).*geometry=\[gaga_out,bridge\]",
                                   " ".join(printed.split())), printed  # fmt: skip


def test_a_metric_with_no_value_is_null_in_the_export_and_loads(shipped, tmp_path):
    """JSON has no NaN: an export's metric without a value (no pair could be steered) is written as null."""
    _, _, _, cfg = shipped
    folder = tmp_path / "innsteer"
    shutil.copytree(train.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "innsteer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["meta"]["metrics"]["steering_success_mean"] = math.nan
    (folder / "config.json").write_text(json.dumps(config))
    seal(folder)
    text = (folder / "config.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert saved["meta"]["metrics"]["steering_success_mean"] is None
    assert load_geometry(folder).meta["metrics"]["steering_success_mean"] is None, "and its digest holds"
    from geosteer.pipeline.innsteer import InnSteerFamily

    assert InnSteerFamily().headline(saved["meta"]["metrics"])["steering_success_mean"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steer.geometry=/nowhere/weekdays/gaga_out"], r"steer.geometry=/nowhere/weekdays/gaga_out holds no exported"),
        (
            ["steer.geometry=gaga_out", "steer.target=Caturday"],
            r"names 0 of .* with the concept 'Caturday' \(their tasks' values: \['Monday', 'Tuesday'",
        ),
        (["steer.geometry=gaga_out", "steer.prompt=' '"], r"steer.prompt is empty"),
        (
            ["steer.geometry=gaga_out", "steer.prompt='Bonjour, quel jour?'"],
            r"has words the LM .* has no token for \(\['Bonjour,",
        ),
        (
            ["steer.geometry={other}"],
            r"was trained on another training of the LM \(its fingerprint elsewhere.*weight sketches \d\.\d\d apart\)",
        ),
        (
            ["steer.geometry={other}", "model.name=gpt2"],
            r"was trained on the LM 'task_lm' \(from \S+\), and this config steers 'gpt2'.*it was trained on \(model=task_lm\)",
        ),
        (["steer.geometry={lm}"], r"\S+ holds a language model \(llama\), not an exported geometry; give a geometry"),
        (
            ["steer.geometry=weekday/gaga_out"],
            r"steer.geometry=weekday/gaga_out is not one of this run's exports \(\['weekdays/bridge', 'weekdays/gaga_out', "
            r"'weekdays/innsteer'\]: give one as <task>/<name>\), and as a Hub repo",
        ),
        (
            ["steer.geometry=weekdays/nothing"],
            r"this run has no export 'nothing' of task 'weekdays'.*exports of that task are \['bridge', 'gaga_out', 'innsteer'\]",
        ),
    ],
)
def test_stage_steer_refuses_with_the_fix(shipped, capsys, monkeypatch, tmp_path, overrides, message):
    import huggingface_hub

    from tests.test_bad_input import pipeline_command

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a name read as a Hub repo: the cache alone
    geometries, _, _, cfg = shipped
    other = tmp_path / "weekdays" / "gaga_out"  # an export of another training of the LM, without its record
    shutil.copytree(train.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "gaga_out", other)
    (other / "stage.json").unlink()
    config = json.loads((other / "config.json").read_text())
    config["meta"]["lm_fingerprint"] = "elsewhere"
    config["meta"]["lm_sketch"] = [-x for x in config["meta"]["lm_sketch"]]  # and other weights
    (other / "config.json").write_text(json.dumps(config))
    seal(other)  # as that training exported it
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(
        steer_command(cfg, *[o.format(other=other, lm=cfg.model.pretrained) for o in overrides]), capsys
    )
    assert code == 1 and "Traceback" not in printed and re.search(message, printed), printed


def test_the_caa_direction_exports_as_a_llama_cpp_control_vector_read_back_by_gguf(shipped, tmp_path):
    import gguf

    geometry = shipped[0]["gaga_out"]
    concepts = Concepts.of(geometry.meta)
    b, a = concepts.index("Thursday"), concepts.index("Monday")
    direction = control_vector(concepts, b, a)
    torch.testing.assert_close(direction, concepts.centroids[b] - concepts.centroids[a], rtol=0, atol=0)
    write_control_vector(tmp_path / "thursday.gguf", geometry.meta, direction)
    reader = gguf.GGUFReader(tmp_path / "thursday.gguf")
    text = lambda key: bytes(reader.fields[key].parts[-1]).decode()  # noqa: E731
    assert text("general.architecture") == "controlvector" and text("controlvector.model_hint") == "llama"
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 1
    (tensor,) = reader.tensors
    assert tensor.name == f"direction.{geometry.meta['layer']}"
    assert torch.equal(torch.from_numpy(tensor.data.copy()).float(), direction)


def test_a_control_vector_of_a_class_without_rows_or_a_direction_of_nothing_is_refused(shipped, tmp_path):
    geometry = shipped[0]["gaga_out"]
    concepts = Concepts.of(geometry.meta)
    centroids = concepts.centroids.clone()
    centroids[2] = math.nan  # a class no training prompt had
    rowless = Concepts(concepts.values, concepts.variant_ids, centroids)
    for target, source in ((2, None), (0, 2)):
        with pytest.raises(SteeringError, match=rf"\['{concepts.values[2]}'\]: no training prompt .* Pick a class with rows"):
            control_vector(rowless, target, source)
    assert torch.isfinite(control_vector(rowless, 0)).all(), "the mean of the others leaves the class out"
    d = concepts.centroids.shape[1]
    for direction in (torch.full((d,), math.nan), torch.zeros(d), torch.full((d,), math.inf)):
        with pytest.raises(SteeringError, match="holds NaN or Inf, or is all zeros"):
            write_control_vector(tmp_path / "v.gguf", geometry.meta, direction)
    assert not list(tmp_path.iterdir()), "nothing written"


def test_caa_moves_by_the_class_difference_and_skips_classes_without_rows():
    """CAA's source is the nearest centroid among the classes that had rows (a NaN centroid is never picked), or the
    class it is told."""
    centroids = torch.tensor([[0.0, 0.0], [math.nan, math.nan], [10.0, 0.0], [0.0, 10.0]])
    concepts = Concepts(("a", "b", "c", "d"), ((1,), (2,), (3,), (4,)), centroids)
    h = torch.tensor([[1.0, 1.0], [9.0, 1.0]])  # nearest: a, c
    assert concepts.nearest(h).tolist() == [0, 2]
    moved = steering_point(None, concepts, h, 3, 0.5, "caa")
    torch.testing.assert_close(moved, h + 0.5 * (centroids[3] - centroids[[0, 2]]))
    told = steering_point(None, concepts, h, 3, 1.0, "caa", source=2)
    torch.testing.assert_close(told, h + centroids[3] - centroids[2])


# ---- the Hub round trip, against a local Hub server (tests/hub_server.py) and an offline cache ----------------------


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A local Hub (the real huggingface_hub client talks HTTP to it) and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks plain commits
    with local_hub() as server:
        yield server, tmp_path / "hf-cache"


def export_folder(cfg, name: str) -> train.Path:
    return train.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / name


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_family_goes_to_the_hub_and_back_and_steers_from_the_offline_cache(shipped, hub, monkeypatch):
    """push_geometry ships each export folder byte for byte; load_geometry(repo id) and the class's own
    from_pretrained read it back; with the Hub gone and HF_HUB_OFFLINE set, the cache alone serves it, and it steers
    exactly as the local export does. The geometry's own push_to_hub round-trips its weights and meta too."""
    import huggingface_hub.constants

    (server, cache), (geometries, lm, tokenizer, cfg) = hub, shipped
    for name, local in geometries.items():
        folder = export_folder(cfg, name)
        commit = push_geometry(folder, f"lab/{name}", endpoint=server.url, token="secret")
        pushed = server.repos[f"lab/{name}"][-1]
        assert pushed.sha == commit and "stage.json" not in pushed.files, "the run's own record stays home"
        assert pushed.files == {f: (folder / f).read_bytes() for f in SHIPPED if (folder / f).is_file()}
        for pulled in (load_geometry(f"lab/{name}", endpoint=server.url, cache_dir=cache),
                       type(local).from_pretrained(f"lab/{name}", endpoint=server.url, cache_dir=cache)):  # fmt: skip
            assert type(pulled) is type(local) and pulled.meta == local.meta and same_weights(pulled, local)
        local.push_to_hub(f"lab/{name}-object", endpoint=server.url, token="secret")
        again = load_geometry(f"lab/{name}-object", endpoint=server.url, cache_dir=cache)
        assert again.meta == local.meta | {"digest": again.meta["digest"]} and same_weights(again, local)
    server.stop()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for name, local in geometries.items():
        cached = load_geometry(f"lab/{name}", cache_dir=cache)
        steered = []
        for geometry in (local, cached):
            with Steering(lm, geometry, "Thursday", alpha=0.6), torch.no_grad():
                steered.append(lm(**enc).logits[:, -1])
        assert torch.equal(*steered), name


def test_a_revision_pins_the_commit_it_names(shipped, hub):
    (server, cache), (geometries, _, _, cfg) = hub, shipped
    first = push_geometry(export_folder(cfg, "gaga_out"), "lab/geo", endpoint=server.url)
    push_geometry(export_folder(cfg, "innsteer"), "lab/geo", endpoint=server.url)
    assert type(load_geometry("lab/geo", endpoint=server.url, cache_dir=cache)) is type(geometries["innsteer"])
    pinned = load_geometry("lab/geo", revision=first, endpoint=server.url, cache_dir=cache)
    assert type(pinned) is type(geometries["gaga_out"]) and same_weights(pinned, geometries["gaga_out"])


def test_hub_failures_name_the_repo_and_the_fix(shipped, hub, tmp_path):
    (server, cache), (_, _, _, cfg) = hub, shipped
    with pytest.raises(CheckpointError, match=r"lab/none is not an export folder here, and as a Hub repo.*Repository"):
        load_geometry("lab/none", endpoint=server.url, cache_dir=cache)
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*download it once"):
        load_geometry("lab/none", cache_dir=cache, local_files_only=True)
    edited = tmp_path / "edited"
    shutil.copytree(export_folder(cfg, "gaga_out"), edited)
    config = json.loads((edited / "config.json").read_text())
    config["meta"]["layer"] = 0  # another valid block: only the export's own digest can tell
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"changed after the export was written \(meta.digest"):
        push_geometry(edited, "lab/edited", endpoint=server.url)
    assert "lab/edited" not in server.repos, "a damaged export was shipped"


def test_an_export_whose_facts_are_of_another_kind_is_refused(shipped, tmp_path):
    """Hand edits with the digest removed, as the docs allow for an export changed on purpose."""
    (_, lm, _, cfg) = shipped
    edits = [("family", ["gaga"]), ("family", {"a": 1}), ("task", "weekdays"), ("concepts", "x"), ("layer", "1"),
             ("layer", True), ("lm_shape", [32]), ("task", {"name": ["weekdays"]}),
             ("lm_shape", {"model_type": "llama", "hidden_size": "32", "num_layers": 3, "vocab_size": 40})]  # fmt: skip
    for n, (key, value) in enumerate(edits):
        folder = tmp_path / str(n)
        shutil.copytree(export_folder(cfg, "gaga_out"), folder)
        config = json.loads((folder / "config.json").read_text())
        config["meta"][key] = value
        del config["meta"]["digest"]
        (folder / "config.json").write_text(json.dumps(config))
        for load in (lambda: load_geometry(folder), lambda: Steering(lm, folder, "Thursday")):
            with pytest.raises(CheckpointError, match=rf"holds meta.{key}(\.\w+)?=.*: not of the kind an export writes"):
                load()
    folder = tmp_path / "unknown"
    shutil.copytree(export_folder(cfg, "gaga_out"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["meta"]["family"] = "nosuch"
    del config["meta"]["digest"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"names the geometry family 'nosuch'; this geosteer loads \['bridge'"):
        load_geometry(folder)


def test_the_layer_and_the_width_are_each_checked_alone(shipped):
    (_, _, _, cfg) = shipped
    with pytest.raises(GeometryMismatch, match=r"trained on d=32 activations of layer 1, but its activations here are d=32 at "
                                               r"layer 2"):  # fmt: skip
        load_geometry(export_folder(cfg, "gaga_out"), layer=2)
    with pytest.raises(GeometryMismatch, match=r"trained on d=32 activations of layer 1, but it was given d=3\. Use"):
        load_geometry(export_folder(cfg, "gaga_out"), d=3)  # the width alone: no layer to name


def test_a_damaged_copy_in_the_hub_cache_is_downloaded_again_as_told(shipped, hub):
    (server, cache), (geometries, _, _, cfg) = hub, shipped
    push_geometry(export_folder(cfg, "gaga_out"), "lab/damaged", endpoint=server.url)
    load_geometry("lab/damaged", endpoint=server.url, cache_dir=cache)
    (weights,) = cache.glob("models--lab--damaged/snapshots/*/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # through the snapshot's link: the cached blob itself
    with pytest.raises(CheckpointError, match=r"cache's copy of the Hub repo lab/damaged: download it again with "
                                              r"load_geometry\('lab/damaged', force_download=True\), or delete"):  # fmt: skip
        load_geometry("lab/damaged", endpoint=server.url, cache_dir=cache)
    again = load_geometry("lab/damaged", endpoint=server.url, cache_dir=cache, force_download=True)
    assert same_weights(again, geometries["gaga_out"])


def test_a_push_that_cannot_reach_the_hub_names_the_repo_and_the_fix(shipped, hub):
    (server, _), (_, _, _, cfg) = hub, shipped
    server.stop()
    with pytest.raises(PushError, match=r"pushing \S*gaga_out to the Hub repo lab/away failed \(\w*Connect\w*: .*"
                                        r"Check that the Hub is in reach"):  # fmt: skip
        push_geometry(export_folder(cfg, "gaga_out"), "lab/away", endpoint=server.url)
    with pytest.raises(PushError, match=r"repo_id='away' is not a Hub repo id; give one as 'owner/name'"):
        push_geometry(export_folder(cfg, "gaga_out"), "away", endpoint=server.url)


def test_stage_steer_takes_a_hub_repo_id_from_the_offline_cache(shipped, hub, capsys, monkeypatch):
    import huggingface_hub.constants

    from tests.test_bad_input import pipeline_command

    (server, cache), (_, _, _, cfg) = hub, shipped
    push_geometry(export_folder(cfg, "gaga_out"), "lab/weekdays-gaga", endpoint=server.url)
    load_geometry("lab/weekdays-gaga", endpoint=server.url, cache_dir=cache)  # fills the cache
    server.stop()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=lab/weekdays-gaga"), capsys)
    assert code == 0 and "steered:" in printed, printed
    code, printed = pipeline_command(steer_command(cfg, "steer.geometry=lab/elsewhere"), capsys)
    assert code == 1 and "Traceback" not in printed and "not in the Hugging Face cache" in printed, printed


def test_the_python_api_refuses_bad_arguments_by_name(shipped, tiny_lm_dir, tmp_path):
    """Each public call names the argument it cannot use and what it takes, never blames a good export, and takes
    the forms a user reaches for (a Path for a model folder, torch.float32 for a dtype, a list of times)."""
    from geosteer.models.gaga import GAGA
    from geosteer.models.innsteer import InnSteer

    geometries, _, _, cfg = shipped
    load_causal_lm(tiny_lm_dir, torch.float32)  # a Path and a torch dtype
    with pytest.raises(TypeError, match=r"dtype='half' must be one of \['float32', 'bfloat16', 'float16'\]"):
        load_causal_lm(str(tiny_lm_dir), "half")
    with pytest.raises(TypeError, match=r"load_geometry\(\) got unknown keyword\(s\) \['devcie'\]"):
        load_geometry(export_folder(cfg, "gaga_out"), devcie="cpu")
    with pytest.raises(TypeError, match=r"GAGA.from_pretrained\(\) got unknown keyword\(s\) \['foo'\]"):
        GAGA.from_pretrained(export_folder(cfg, "gaga_out"), foo=1)
    with pytest.raises(CheckpointError, match=r"holds a geometry of family 'innsteer', not 'gaga' \(GAGA\)\. Load it with "):
        GAGA.from_pretrained(export_folder(cfg, "innsteer"))
    assert isinstance(InnSteer.from_pretrained(export_folder(cfg, "innsteer")), InnSteer)
    gaga, flow, bridge = (geometries[g] for g in GEOMETRIES)
    h = torch.randn(3, gaga.input_dim)
    with pytest.raises(GeometryMismatch, match=rf"takes activations of width {gaga.input_dim} \(layer 1\) as a tensor "
                                               rf"\(B, {gaga.input_dim}\), but was given one of shape \(3, 5\)"):  # fmt: skip
        gaga.encode(torch.randn(3, 5))
    with pytest.raises(GeometryMismatch, match=rf"but was given one of shape \({gaga.input_dim},\)"):
        gaga.encode(torch.randn(gaga.input_dim))  # one row without its batch axis
    for bad in (99, -1, "Monday", 1.5, True, torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=r"target=.* must be a class index in 0 … 6, one or one per row of h "
                                             r"\(the classes: \['Monday'"):  # fmt: skip
            flow.steer(h, source=0, target=bad)
    with pytest.raises(ValueError, match=r"source=.* or None for each row its own class"):
        flow.steer(h, source=7, target=1)
    with pytest.raises(TypeError, match=r"alpha=.a. must be a finite number, or a 1-D tensor"):
        flow.steer(h, source=0, target=1, alpha="a")
    torch.testing.assert_close(
        flow.steer(h, 0, torch.tensor([1, 2, 3])), flow.steer(h, torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3]))
    )
    times = [0.0, 0.5, 1.0]
    torch.testing.assert_close(bridge(h[:2], h[1:], times), bridge(h[:2], h[1:], torch.tensor(times)))
    concepts = Concepts.of(flow.meta)
    with pytest.raises(SteeringError, match=r"target=99 must be a class index in 0 … 6 \(the classes: \("):
        control_vector(concepts, 99)
    with pytest.raises(SteeringError, match=r"cannot write .*nowhere/c.gguf: its folder does not exist"):
        write_control_vector(tmp_path / "nowhere" / "c.gguf", flow.meta, control_vector(concepts, 1))
    with pytest.raises(SteeringError, match=r"meta must be a geometry's meta \(geometry.meta\)"):
        write_control_vector(tmp_path / "c.gguf", {}, control_vector(concepts, 1))
    with pytest.raises(SteeringError, match=r"cannot write .*: it is a folder"):
        write_control_vector(tmp_path, flow.meta, control_vector(concepts, 1))
    with pytest.raises(
        SteeringError,
        match=rf"direction has shape \(3,\); this geometry's LM takes a vector of its hidden size \({gaga.input_dim}\)",
    ):
        write_control_vector(tmp_path / "c.gguf", flow.meta, torch.ones(3))
    direction = control_vector(concepts, 1)
    for meta, message in (
        ({**flow.meta, "layer": 99}, r"meta\['layer'\]=99 is not a block of its LM \(0 … 2"),
        ({**flow.meta, "layer": True}, r"meta must be a geometry's meta"),
        ({"layer": 1}, r"meta must be a geometry's meta .* meta\['lm_shape'\]"),
    ):
        with pytest.raises(SteeringError, match=message):
            write_control_vector(tmp_path / "c.gguf", meta, direction)
    with pytest.raises(SteeringError, match=r"direction='abc' is not a vector of numbers"):
        write_control_vector(tmp_path / "c.gguf", flow.meta, "abc")
    assert not (tmp_path / "c.gguf").exists()
    with pytest.raises(TypeError, match=r"this geometry computes in torch.float32, but was given torch.float64"):
        gaga.encode(h.double())
    with pytest.raises(GeometryMismatch, match=rf"as a tensor \(B, {gaga.input_dim}\), but was given one of shape \(1, 3, "):
        gaga.encode(h[None])  # batch norm takes rows alone
    z = gaga.encode(h)
    for bad in (z[0], z[None]):
        with pytest.raises(
            GeometryMismatch, match=rf"GAGA.decode takes latents \(B, {z.shape[1]}\); got {re.escape(str(tuple(bad.shape)))}"
        ):
            gaga.decode(bad)
    with pytest.raises(TypeError, match=r"GAGA.decode computes in torch.float32, but was given torch.float64 latents: "
                                        r"pass z.to\(torch.float32\)"):  # fmt: skip
        gaga.decode(z.double())
    with pytest.raises(TypeError, match=r"InnSteer.inverse computes in torch.float32, but was given torch.float64"):
        flow.inverse(flow.encode(h).double())
    for cast in (torch.float64, torch.long):
        with pytest.raises(TypeError, match=rf"the bridge computes in torch.float32, but was given {cast} endpoints: pass "
                                            rf"x_a.to\(torch.float32\)"):  # fmt: skip
            bridge(h[:2].to(cast), h[1:].to(cast), times)
    with pytest.raises(ValueError, match=rf"the bridge takes x_a, x_b of one shape \(P, {gaga.input_dim}\)"):
        bridge(h[:2], h, times)
    torch.testing.assert_close(bridge(h[:2], h[1:], 0.5), bridge(h[:2], h[1:], [0.5]))
    for bad in ({"trust_remote_code": "yes"}, {"revision": 3}, {"device_map": "bogus"}):
        with pytest.raises(TypeError, match=rf"{next(iter(bad))}=.* must be"):
            load_causal_lm(tiny_lm_dir, **bad)


def test_figures_and_file_names_take_any_task_value(tmp_path):
    """Task values are text in figure labels ("$^$" is no formula) and in file names (cut with a hash of the
    whole when long, so that two long values stay apart and a name fits the file system)."""
    from geosteer.pipeline.steer import figure, safe

    values = ["$^$", "%", "&", "$x_{1", "other"]
    q = np.full((3, len(values)), 1 / len(values))
    figure(q, np.linspace(0, 1, 3), values, 0, "a $ title", tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0
    long_a, long_b = "Z" * 240, "Z" * 239 + "Y"
    assert len(safe(long_a)) <= 40 and safe(long_a) != safe(long_b) and safe("Thursday") == "Thursday"


def test_a_folder_that_is_not_an_export_is_named_for_what_it_is(shipped, tmp_path):
    """A missing folder, and a folder above the exports (a task's, a run's), are not called damaged exports."""
    _, _, _, cfg = shipped
    task = export_folder(cfg, "gaga_out").parent
    with pytest.raises(CheckpointError, match=r"nowhere/weekdays/gaga_out does not exist; give an export's folder"):
        load_geometry(tmp_path / "nowhere" / "weekdays" / "gaga_out")
    with pytest.raises(CheckpointError, match=r"is not an export but holds 3: \['bridge', 'gaga_out', 'innsteer'\]"):
        load_geometry(task)
    with pytest.raises(CheckpointError, match=r"is not an export but holds 3: \['weekdays/bridge', 'weekdays/gaga_out'"):
        load_geometry(task.parent)
    with pytest.raises(CheckpointError, match=r"is not an export but holds 3: \['geometry/weekdays/bridge', "):
        load_geometry(task.parent.parent)  # the run's folder: its exports three levels down
    with pytest.raises(CheckpointError, match=r"is not an export but holds \d+: \[.*/geometry/weekdays/bridge'"):
        load_geometry(task.parent.parent.parent)  # the outputs folder: four levels down
    (tmp_path / "run" / "lm").mkdir(parents=True)
    (tmp_path / "run" / "lm" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # an LM's is no export
    with pytest.raises(CheckpointError, match=r"run is not an export \(it holds no config.json\) and holds none below"):
        load_geometry(tmp_path / "run")


def test_a_gaga_is_steered_with_the_lambda_its_export_records(shipped):
    """λ_reg = lam_rel × the eigenvalue scale the export records (the one eval fits on its training rows), not one
    taken on the centroids and h: the steered path is the evaluated one. An export without it falls back."""
    from geosteer.models.geodesics import lbfgs_geodesic
    from geosteer.models.metrics import pullback_of, regularisation
    from geosteer.models.steer import point_at

    gaga = copy.deepcopy(shipped[0]["gaga_out"])
    concepts = Concepts.of(gaga.meta)
    h = concepts.centroids[:2] + 0.1 * torch.randn(2, concepts.centroids.shape[1], generator=torch.Generator().manual_seed(0))
    metric = pullback_of(gaga, lam=1e-3 * gaga.meta["metrics"]["metric_scale"])
    expected = point_at(lbfgs_geodesic(h, concepts.centroids[3].expand_as(h), metric, 16, 200, 20), 0.5)
    assert torch.equal(steering_point(gaga, concepts, h, 3, 0.5), expected)
    del gaga.meta["metrics"]["metric_scale"]  # an older export: the centroids and h stand in for its training rows
    fallback = pullback_of(gaga)
    fallback.lam = regularisation(fallback, torch.cat([concepts.centroids, h]), 1e-3)
    assert fallback.lam != pytest.approx(metric.lam, rel=1e-3), "a test that can tell the two apart"
    expected = point_at(lbfgs_geodesic(h, concepts.centroids[3].expand_as(h), fallback, 16, 200, 20), 0.5)
    assert torch.equal(steering_point(gaga, concepts, h, 3, 0.5), expected)
