"""LM access: the residual hook, concept bins, layer lookup and loading errors."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.nn import functional as F

from geosteer.data.tasks import concept_schema, load_task
from geosteer.models.lm import (
    ModelLoadError,
    capture_residual,
    check_layer,
    concept_probs,
    decoder_layers,
    last_token_positions,
    load_causal_lm,
    position_ids_for,
    read_last_token,
    replace_last_token,
)
from geosteer.models.task_lm import build_word_tokenizer
from geosteer.pipeline.lm import ResumableSampler, answer_logits, encode_prompts
from tests.conftest import TASK_DIR

LAYER = 1


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir))


def test_hook_equals_hidden_states_with_left_padding(lm):
    model, tok = lm
    texts = ["Q: What day is one days after Monday?\nA:", "Today is Friday. In three days it will be"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert not enc.attention_mask.all(), "the prompts must differ in length for this test"
    pos = last_token_positions(enc.attention_mask)
    with torch.no_grad(), capture_residual(model, LAYER, pos) as cap:
        out = model(**enc, position_ids=position_ids_for(enc.attention_mask), output_hidden_states=True)
    expected = out.hidden_states[LAYER + 1][torch.arange(2), pos]
    torch.testing.assert_close(cap["h"], expected, rtol=0, atol=0)
    # Left padding with position ids gives each prompt what it gets alone.
    for i, text in enumerate(texts):
        alone = tok([text], return_tensors="pt")
        with torch.no_grad(), capture_residual(model, LAYER, last_token_positions(alone.attention_mask)) as one:
            model(**alone)
        torch.testing.assert_close(one["h"][0], cap["h"][i], rtol=1e-5, atol=1e-5)


def test_hook_equals_hidden_states_without_padding(lm):
    model, tok = lm
    texts = ["Q: What day is one days after Monday?\nA:", "Q: What day is two days after Sunday?\nA:"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert enc.attention_mask.all()
    pos = last_token_positions(enc.attention_mask)
    with torch.no_grad(), capture_residual(model, LAYER, pos) as cap:
        out = model(**enc, output_hidden_states=True)
    torch.testing.assert_close(cap["h"], out.hidden_states[LAYER + 1][:, -1], rtol=0, atol=0)


def test_last_token_positions_for_left_right_and_no_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_positions(mask).tolist() == [3, 1, 3]


class TupleBlock(nn.Module):
    """A block in the pre-4.57 style: it returns a tuple."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return (self.lin(x), None)


class TupleLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([TupleBlock(), TupleBlock()])

    def forward(self, x):
        for block in self.model.layers:
            x = block(x)[0]
        return x


def test_hook_accepts_tuple_outputs_and_is_removed_on_error():
    lm = TupleLM()
    x = torch.randn(3, 5, 4)  # (B, T, d)
    with capture_residual(lm, 0, torch.tensor([4, 2, 0])) as cap:
        lm(x)
    expected = lm.model.layers[0](x)[0][torch.arange(3), torch.tensor([4, 2, 0])]
    torch.testing.assert_close(cap["h"], expected)
    with pytest.raises(RuntimeError), capture_residual(lm, 1, torch.zeros(3, dtype=torch.long)):
        raise RuntimeError("boom")
    assert all(not block._forward_hooks for block in decoder_layers(lm))


def test_q_sums_to_one_and_other_is_the_rest(lm):
    model, tok = lm
    schema = concept_schema(load_task("weekdays", TASK_DIR), tok, "tiny")
    enc = tok(
        ["Q: What day is one days after Monday?\nA:", "Today is Friday. In three days it will be"],
        padding=True,
        return_tensors="pt",
    )
    out = read_last_token(model, enc.input_ids, enc.attention_mask, LAYER, schema.variant_ids)
    torch.testing.assert_close(out.q.sum(1), torch.ones(2))
    probs = model(**enc, position_ids=position_ids_for(enc.attention_mask)).logits[:, -1].softmax(-1)
    concept_mass = sum(probs[:, list(ids)].sum(1) for ids in schema.variant_ids)
    torch.testing.assert_close(out.q[:, -1], 1 - concept_mass.detach())
    assert out.top1.tolist() == probs.argmax(-1).tolist()


def test_concept_probs_sums_variants_into_bins():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    q = concept_probs(probs, [(0, 2), (1,)])
    torch.testing.assert_close(q, torch.tensor([[0.4, 0.2, 0.4]]))


def test_layer_out_of_range_names_the_block_count(lm):
    model, _ = lm
    assert check_layer(model, 2) == 2
    with pytest.raises(ModelLoadError, match=r"layer 3 is out of range: the model has 3 decoder blocks \(0 ... 2\)"):
        check_layer(model, 3)


def test_missing_model_path_says_how_to_make_it(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist.*stage=lm"):
        load_causal_lm(str(tmp_path / "nothing-here"))


def test_a_model_without_causal_lm_head_is_refused(tmp_path):
    from transformers import T5Config, T5Model

    T5Model(T5Config(d_model=8, d_ff=8, d_kv=4, num_layers=1, num_heads=2, vocab_size=16)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal LM"):
        load_causal_lm(str(tmp_path))


def test_hub_model_without_network_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # skip the retries; same error
    with pytest.raises(ModelLoadError, match=r"(?s)could not load the config of 'openai-community/gpt2'.*hf download"):
        load_causal_lm("openai-community/gpt2")


def test_replacing_the_last_token_changes_only_the_last_position(lm):
    model, tok = lm
    enc = tok(
        ["Q: What day is one days after Monday?\nA:", "Today is Friday. In three days it will be"],
        padding=True,
        return_tensors="pt",
    )
    new_h = torch.randn(2, model.config.hidden_size)
    positions = last_token_positions(enc.attention_mask)
    hooks_before = [len(block._forward_hooks) for block in decoder_layers(model)]
    kwargs = dict(position_ids=position_ids_for(enc.attention_mask), output_hidden_states=True)
    # Hooks run in registration order: the capture sees what block LAYER hands on.
    with torch.no_grad(), replace_last_token(model, LAYER, new_h), capture_residual(model, LAYER, positions) as cap:
        out = model(**enc, **kwargs)
    torch.testing.assert_close(cap["h"], new_h)
    with torch.no_grad():
        plain = model(**enc, **kwargs)
    # Under causal attention the earlier positions of the next block do not see the replaced row.
    torch.testing.assert_close(out.hidden_states[LAYER + 2][:, :-1], plain.hidden_states[LAYER + 2][:, :-1])
    assert not torch.allclose(out.logits[:, -1], plain.logits[:, -1])
    assert [len(block._forward_hooks) for block in decoder_layers(model)] == hooks_before


def test_soft_answers_keep_the_answer_on_top_and_spread_the_rest_over_its_neighbours():
    task = load_task("weekdays", TASK_DIR)
    prompts = task.prompts()
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts)
    _, _, answer, soft = encode_prompts(tokenizer, [(task, p) for p in prompts], smoothing=0.3, width=1.0).tensors
    torch.testing.assert_close(soft.sum(1), torch.ones(len(prompts)))
    assert torch.equal(soft.argmax(1), answer)
    value_ids = [tokenizer.encode(v, add_special_tokens=False)[0] for v in task.values]
    assert soft[:, value_ids].sum(1).allclose(torch.ones(len(prompts))), "no mass outside the task's values"
    for i in (0, len(prompts) - 1):
        p, j = prompts[i], task.values.index(prompts[i].answer)
        m = 0.3 * p.number / max(task.numbers)  # more uncertainty for longer counts
        expected = {value_ids[k]: m * w + (1 - m if k == j else 0.0) for k, w in task.neighbourhood(j, 1.0).items()}
        assert all(soft[i, t].item() == pytest.approx(v) for t, v in expected.items())


@pytest.mark.parametrize("numbers", [[0], [-3, 0, 2]])
def test_soft_answers_of_zero_and_negative_steps_are_distributions(tmp_path, numbers):
    """A cyclic task may count 0 steps or backwards: the mass grows with |number|, and 0 steps is the one-hot answer."""
    spec = yaml.safe_load((TASK_DIR / "weekdays.yaml").read_text())
    spec["numbers"], spec["number_words"] = numbers, {n: str(n) for n in numbers}
    (tmp_path / "weekdays.yaml").write_text(yaml.safe_dump(spec))
    task = load_task("weekdays", tmp_path)
    prompts = task.prompts()
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts)
    _, _, answer, soft = encode_prompts(tokenizer, [(task, p) for p in prompts], smoothing=0.3, width=1.0).tensors
    assert torch.isfinite(soft).all() and soft.min() >= 0 and soft.max() <= 1
    torch.testing.assert_close(soft.sum(1), torch.ones(len(prompts)))
    zero = torch.tensor([p.number == 0 for p in prompts])
    assert torch.equal(soft[zero], F.one_hot(answer[zero], soft.shape[1]).float()), "no count, no doubt"
    if len(numbers) > 1:
        top = soft.max(1).values
        assert top[torch.tensor([p.number == -3 for p in prompts])].max() < top[zero].min(), "|−3| doubts more than 0"


def test_interchange_on_the_cached_prefix_equals_a_whole_second_forward_in_value_and_gradient(lm):
    model, tok = lm
    texts = ["Q: What day is one days after Monday?\nA:", "Today is Friday. In three days it will be",
             "Q: What month is two months after May?\nA:"]  # fmt: skip
    enc = tok(texts, padding=True, return_tensors="pt")
    assert not enc.attention_mask.all(), "left padding must be exercised"
    donor = torch.tensor([2, 0, 1])
    params = [p for p in model.parameters() if p.requires_grad]

    plain, swapped = answer_logits(model, LAYER, enc.input_ids, enc.attention_mask, donor)  # as training runs it
    fast = torch.autograd.grad(swapped.logsumexp(-1).sum() - swapped[:, 7].sum(), params, allow_unused=True)

    # Reference: the donors' residuals written into a whole second forward of every prompt.
    with capture_residual(model, LAYER, torch.full((3,), enc.input_ids.shape[1] - 1)) as cap:
        model(**enc, position_ids=position_ids_for(enc.attention_mask))
    with replace_last_token(model, LAYER, cap["h"][donor]):
        ref = model(**enc, position_ids=position_ids_for(enc.attention_mask)).logits[:, -1]
    slow = torch.autograd.grad(ref.logsumexp(-1).sum() - ref[:, 7].sum(), params, allow_unused=True)

    torch.testing.assert_close(swapped, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # A row's own residual is a no-op; a donor's changes the answer.
    with torch.no_grad():
        _, own = answer_logits(model, LAYER, enc.input_ids, enc.attention_mask, torch.arange(3))
    torch.testing.assert_close(own, plain.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(swapped, plain)


def _draw_in_worker(rank: int, sampler: ResumableSampler, queue) -> None:
    queue.put(list(sampler))


def test_the_lm_sampler_reaches_a_spawned_ddp_worker_and_draws_there_what_it_draws_here():
    """A DDP trainer spawns its workers with the loader's sampler: its generator must arrive whole (a generator
    pickled by torch's multiprocessing arrives as a broken shared file), at the same state."""
    sampler = ResumableSampler(torch.tensor([1.0, 2.0, 3.0, 4.0]), 12, seed=5)
    list(sampler)  # one epoch drawn: the state is no longer the seed's
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_draw_in_worker, args=(sampler, queue), nprocs=1, start_method="spawn")
    assert queue.get() == list(sampler)
