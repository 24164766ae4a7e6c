"""The geometry core against analytic cases and reference computations (float64 throughout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from geosteer.models.geodesics import (
    PCA,
    LabelledSpline,
    lbfgs_geodesic,
    linear_path,
    path_energy,
    secant_energy,
    secant_geodesic,
    slerp,
)
from geosteer.models.lm import concept_probs, read_last_token
from geosteer.models.metrics import (
    EncoderPullback,
    FisherPullback,
    OutputPullback,
    effective_dimensionality,
    fisher_gram,
    metric_eigenvalues,
    metric_matrix,
    output_jacobian_reference,
    spectral_deviation,
)
from geosteer.models.steering import (
    caa_direction,
    concept_q,
    conjugate_gradient,
    dual_direction,
    fishback_direction,
    gradient_direction,
    intervene,
    steer,
    subspace_replace,
)
from geosteer.models.tail import CarrierTail
from tests.conftest import random_weekdays_lm

VARIANTS = [[5], [6, 7], [9], [11], [12, 13, 14]]  # five concept bins, some with several token variants


@pytest.fixture(scope="module")
def lm():
    """A random 3-block Llama in float64 with the weekdays word tokenizer, and four left-padded carriers."""
    model, tokenizer, prompts = random_weekdays_lm(hidden_size=24, intermediate_size=48)
    model = model.double()
    enc = tokenizer([prompts[i].text for i in (0, 40, 120, 250)], padding=True, return_tensors="pt")
    assert not enc.attention_mask.all(), "the carriers must differ in length, to exercise padding"
    return model, enc


class Identity:
    lam = 0.0

    def jacobian(self, x):
        return torch.eye(x.shape[1], dtype=x.dtype).expand(len(x), -1, -1)


class Bottleneck:
    """J = diag(1, 1 + 9·exp(−x₁²/0.2)): moving along axis 2 is expensive near x₁ = 0, cheap elsewhere."""

    lam = 0.0

    def jacobian(self, x):
        scale = torch.ones_like(x)
        scale[:, 1] = 1 + 9 * torch.exp(-(x[:, 0] ** 2) / 0.2)
        return torch.diag_embed(scale)


# --- the tail and injection --------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_injecting_the_carriers_own_h_reproduces_the_unsteered_q(lm, use_cache):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask, use_cache=use_cache)
    plain = read_last_token(model, enc.input_ids, enc.attention_mask, 1, VARIANTS)
    torch.testing.assert_close(tail.h.float(), plain.h)  # read_last_token reports float32
    steered = tail.logits(tail.h, torch.arange(4))
    q = concept_probs(steered.softmax(-1), VARIANTS)
    torch.testing.assert_close(q, concept_probs(tail.logits0.softmax(-1), VARIANTS), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.float(), plain.q, rtol=0, atol=1e-6)  # read_last_token reports float32


def test_cached_tail_equals_whole_prompts_with_a_hook(lm):
    model, enc = lm
    h = torch.randn(6, 24, dtype=torch.float64)
    carrier = torch.tensor([0, 3, 1, 1, 2, 0])
    fast = CarrierTail(model, 1, enc.input_ids, enc.attention_mask).logits(h, carrier)
    slow = CarrierTail(model, 1, enc.input_ids, enc.attention_mask, use_cache=False).logits(h, carrier)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(fast[0], fast[5]), "h must matter"


def _gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=3, n_head=4, n_positions=32))


def _gemma3():  # query/key norms, a sliding window shorter than the prompts, soft-capped logits
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=32,
        final_logit_softcapping=30.0,
    )
    return Gemma3ForCausalLM(config)


@pytest.mark.parametrize("build", [_gqa_llama, _gpt2, _gemma3], ids=["llama-gqa", "gpt2", "gemma3-window"])
def test_last_token_attention_equals_the_models_own_on_whole_prompts(build):
    torch.manual_seed(3)
    model = build().double().eval()
    ids = torch.randint(1, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    h = torch.randn(5, 32, dtype=torch.float64)
    carrier = torch.tensor([0, 1, 2, 2, 1])
    fast = CarrierTail(model, 0, ids, mask).logits(h, carrier)
    slow = CarrierTail(model, 0, ids, mask, use_cache=False).logits(h, carrier)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    one = torch.zeros(5, dtype=torch.long)  # one carrier for every point: its prefix is shared
    torch.testing.assert_close(
        CarrierTail(model, 0, ids, mask).logits(h, one),
        CarrierTail(model, 0, ids, mask, use_cache=False).logits(h, one),
        rtol=1e-10,
        atol=1e-10,
    )
    # Jacobian rows batched by vmap through the hand-written attention, against torch.autograd per point.
    tail = CarrierTail(model, 0, ids, mask)
    metric = OutputPullback(tail, [[3], [4, 5], [7]], carrier=torch.tensor([1, 2]))
    J = metric.jacobian(h[:2])
    for i in range(2):
        ref = torch.autograd.functional.jacobian(lambda v: metric.sqrt_q(v[None], start=i)[0], h[i])
        torch.testing.assert_close(J[i], ref, rtol=1e-8, atol=1e-10)


def each_carrier(tail: CarrierTail, waypoints: torch.Tensor) -> torch.Tensor:
    """Every waypoint on every carrier. (W, d) → (W, C, d)"""
    return waypoints[:, None].expand(-1, len(tail), -1)


def test_the_intervention_batches_waypoints_by_carriers_and_subspace_replacement_keeps_the_rest(lm):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    waypoints = torch.randn(5, 24, dtype=torch.float64)
    torch.testing.assert_close(
        intervene(tail, each_carrier(tail, waypoints))[2, 3], tail.logits(waypoints[2:3], torch.tensor([3]))[0]
    )
    q = concept_q(tail, each_carrier(tail, waypoints), VARIANTS)
    assert q.shape == (5, 4, len(VARIANTS) + 1)
    torch.testing.assert_close(q.sum(-1), torch.ones(5, 4, dtype=torch.float64))
    one = concept_probs(tail.logits(waypoints[2:3], torch.tensor([3])).softmax(-1), VARIANTS)[0]
    torch.testing.assert_close(q[2, 3], one, rtol=1e-10, atol=1e-12)

    pca = PCA.fit(torch.randn(50, 24, dtype=torch.float64), 4)
    w = torch.randn(4, 4, dtype=torch.float64)
    h2 = subspace_replace(tail.h, w, pca)
    torch.testing.assert_close(pca.project(h2), w)  # the subspace part is w
    off = torch.eye(24, dtype=torch.float64) - pca.components.T @ pca.components
    torch.testing.assert_close(h2 @ off, tail.h @ off)  # the off-subspace part is the carrier's
    each = subspace_replace(tail.h, w[:1].expand(4, -1), pca)  # each carrier with its own rest
    q_sub = concept_q(tail, each[None], VARIANTS)  # (1, C, K+1)
    torch.testing.assert_close(q_sub[0], concept_probs(tail.logits(each, torch.arange(4)).softmax(-1), VARIANTS))


# --- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_trick", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_output_jacobian_equals_the_row_by_row_autograd_reference(lm, use_cache, head_trick, monkeypatch):
    model, enc = lm
    if not head_trick:  # a config that scales logits: the metric must differentiate through the lm_head itself
        monkeypatch.setattr(model.config, "logit_scale", 1.0, raising=False)
    carrier = 1  # padded: the reference runs it alone, unpadded
    n_pad = int((1 - enc.attention_mask[carrier]).sum())
    ids = enc.input_ids[carrier : carrier + 1, n_pad:]
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask, use_cache=use_cache)
    x = tail.h[carrier] + 0.3 * torch.randn(4, 24, dtype=torch.float64)
    fast = OutputPullback(tail, VARIANTS, carrier=carrier).jacobian(x)
    reference = output_jacobian_reference(model, 1, ids, VARIANTS, x)
    assert fast.shape == (4, len(VARIANTS) + 1, 24)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("family", ["output", "fisher"])
def test_per_point_carriers_equal_each_point_pinned_to_its_own(lm, family):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    x = tail.h + 0.3 * torch.randn(4, 24, dtype=torch.float64)
    make = (lambda c: OutputPullback(tail, VARIANTS, carrier=c, max_batch=3)) if family == "output" else (
        lambda c: FisherPullback(tail, carrier=c, max_batch=3))  # fmt: skip
    each = make(torch.tensor([2, 0, 3, 1])).jacobian(x)  # chunks of 3 points: the carriers must follow the chunks
    for i, c in enumerate([2, 0, 3, 1]):
        torch.testing.assert_close(each[i], make(c).jacobian(x[i : i + 1])[0], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="one carrier per point"):
        make(torch.tensor([0, 1])).jacobian(x)


def test_output_jacobian_of_an_affine_tail_has_the_closed_form(lm):
    """Steer after the last block with the final norm removed: the tail is z = W h, then softmax and √."""
    model, enc = lm
    norm = model.model.norm
    model.model.norm = nn.Identity()
    try:
        tail = CarrierTail(model, 2, enc.input_ids, enc.attention_mask)
        x = torch.randn(3, 24, dtype=torch.float64)
        fast = OutputPullback(tail, VARIANTS).jacobian(x)
        W = model.lm_head.weight  # (V, d)
        p = (x @ W.T).softmax(-1)  # (B, V)
        bins = [*VARIANTS, [v for v in range(W.shape[0]) if all(v not in b for b in VARIANTS)]]
        expected = torch.empty_like(fast)
        for k, tokens in enumerate(bins):
            q_k = p[:, tokens].sum(1)  # ∂q_k/∂h = Σ_{v∈k} p_v (W_v − pᵀW)
            dq = p[:, tokens] @ W[tokens] - q_k[:, None] * (p @ W)
            expected[:, k] = dq / (2 * q_k.sqrt()[:, None])
        torch.testing.assert_close(fast.detach(), expected.detach(), rtol=1e-9, atol=1e-12)
    finally:
        model.model.norm = norm


def test_encoder_pullback_of_a_linear_map_is_AtA():
    A = nn.Linear(6, 3, bias=True).double()
    G = metric_matrix(EncoderPullback(A, lam=0.0), torch.randn(5, 6, dtype=torch.float64))
    torch.testing.assert_close(G, (A.weight.T @ A.weight).expand(5, -1, -1))


def test_encoder_pullback_matches_autograd_for_an_mlp_with_batchnorm():
    enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    enc[1].running_mean.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    J = EncoderPullback(enc).jacobian(x)
    for i in range(4):
        ref = torch.autograd.functional.jacobian(lambda v: enc(v[None])[0], x[i])
        torch.testing.assert_close(J[i], ref)


def test_encoder_pullback_products_equal_the_jacobian_ones():
    enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    enc[1].running_mean.normal_()
    x, v = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    metric = EncoderPullback(enc)
    J = metric.jacobian(x)  # (5, 3, 6)
    Jv, JtJv = metric.jvp_vjp(x, v)
    torch.testing.assert_close(Jv, torch.einsum("brd,bd->br", J, v))
    torch.testing.assert_close(JtJv, torch.einsum("brd,br->bd", J, Jv))


@pytest.mark.parametrize("build", [_gqa_llama, _gemma3], ids=["llama-gqa", "gemma3-window"])
def test_output_pullback_products_equal_the_jacobian_ones(build):
    """Double backward through the hand-written attention (and Gemma's soft cap), in chunks of 3 points."""
    torch.manual_seed(5)
    model = build().double().eval()
    ids = torch.randint(1, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    tail = CarrierTail(model, 0, ids, mask)
    metric = OutputPullback(tail, [[3], [4, 5], [7]], carrier=1, max_batch=3)
    x, v = tail.h[1] + torch.randn(7, 32, dtype=torch.float64), torch.randn(7, 32, dtype=torch.float64)
    J = metric.jacobian(x)  # (7, 4, 32)
    Jv, JtJv = metric.jvp_vjp(x, v)
    # Llama's RMSNorm computes in float32 even in a float64 model, and the two routes round there at
    # different points: they agree to float32 precision, not float64's.
    Jv_ref, JtJv_ref = torch.einsum("brd,bd->br", J, v), torch.einsum("brd,br->bd", J, Jv)
    torch.testing.assert_close(Jv, Jv_ref, rtol=0, atol=1e-6 * Jv_ref.abs().max().item())
    torch.testing.assert_close(JtJv, JtJv_ref, rtol=0, atol=1e-6 * JtJv_ref.abs().max().item())
    with pytest.raises(ValueError, match="one pinned carrier"):
        OutputPullback(tail, [[3]], carrier=torch.tensor([0, 1])).jvp_vjp(x[:2], v[:2])


class JacobianOnly:
    """A metric that offers only its factor J, so the solver takes its Jacobian path."""

    def __init__(self, metric):
        self.metric, self.lam = metric, metric.lam

    def jacobian(self, x):
        return self.metric.jacobian(x)


def test_geodesic_from_jacobian_products_equals_the_one_from_the_jacobian():
    torch.manual_seed(4)
    enc = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double().eval()
    metric = EncoderPullback(enc, lam=1e-3)
    x_a, x_b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    fast = lbfgs_geodesic(x_a, x_b, metric, n_steps=8, max_iter=50)
    slow = lbfgs_geodesic(x_a, x_b, JacobianOnly(metric), n_steps=8, max_iter=50)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)
    assert (path_energy(fast, metric) < path_energy(linear_path(x_a, x_b, 8), metric)).all()


def test_fisher_pullback_is_four_output_pullbacks_when_the_vocabulary_is_the_bins():
    # GPT-2: its LayerNorm keeps float64 (Llama's RMSNorm computes in float32), and its blocks are another family.
    config = GPT2Config(vocab_size=5, n_embd=16, n_layer=3, n_head=2, n_positions=16)
    torch.manual_seed(1)
    model = GPT2LMHeadModel(config).double().eval()
    ids = torch.tensor([[1, 3, 0, 2, 4, 1]])
    tail = CarrierTail(model, 0, ids, torch.ones_like(ids))
    bins = [[0], [1], [2], [3]]  # token 4 is the "other" bin
    x = tail.h + 0.5 * torch.randn(3, 16, dtype=torch.float64)
    G_F = metric_matrix(FisherPullback(tail), x)
    G_out = metric_matrix(OutputPullback(tail, bins), x)
    torch.testing.assert_close(G_F, 4 * G_out, rtol=1e-9, atol=1e-14)
    model.config.logit_scale = 1.0  # the same identity without the head trick
    torch.testing.assert_close(
        metric_matrix(FisherPullback(tail), x), 4 * metric_matrix(OutputPullback(tail, bins), x), rtol=1e-9, atol=1e-14
    )


def test_fisher_pullback_equals_the_dense_formula():
    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=16, n_layer=3, n_head=2, n_positions=16)).double().eval()
    ids = torch.tensor([[4, 7, 1, 19, 3]])
    tail = CarrierTail(model, 1, ids, torch.ones_like(ids))
    x = tail.h + 0.3 * torch.randn(2, 16, dtype=torch.float64)
    fisher = FisherPullback(tail)
    G = metric_matrix(fisher, x)
    for i in range(2):
        Jz = torch.autograd.functional.jacobian(lambda v: fisher.logits(v[None])[0], x[i])  # (V, d)
        p = fisher.logits(x[i : i + 1])[0].softmax(-1).detach()
        dense = Jz.T @ (torch.diag(p) - torch.outer(p, p)) @ Jz
        torch.testing.assert_close(G[i], dense, rtol=1e-9, atol=1e-14)
    top = metric_matrix(FisherPullback(tail, top_k=3), x)
    assert (torch.linalg.eigvalsh(G - top) > -1e-12).all(), "dropping tokens removes a PSD share"


def test_spectral_diagnostics_on_analytic_spectra():
    eye = metric_eigenvalues(Identity(), torch.randn(2, 5, dtype=torch.float64))
    torch.testing.assert_close(spectral_deviation(eye), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(effective_dimensionality(eye), torch.ones(2, dtype=torch.float64))
    rank_one = EncoderPullback(nn.Linear(5, 1, bias=False).double())
    ev = metric_eigenvalues(rank_one, torch.randn(2, 5, dtype=torch.float64))
    torch.testing.assert_close(effective_dimensionality(ev), torch.full((2,), 1 / 5, dtype=torch.float64))
    torch.testing.assert_close(spectral_deviation(ev), torch.ones(2, dtype=torch.float64))
    G = metric_matrix(rank_one, torch.randn(1, 5, dtype=torch.float64))
    torch.testing.assert_close(ev[:1].sort(descending=True).values, torch.linalg.eigvalsh(G).flip(-1), atol=1e-12, rtol=0)


# --- solvers ------------------------------------------------------------------------------------


def test_lbfgs_under_the_identity_metric_returns_the_straight_line():
    x_a, x_b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    bent = linear_path(x_a, x_b, 8) + 0.3 * torch.sin(torch.linspace(0, np.pi, 9, dtype=torch.float64))[:, None]
    path = lbfgs_geodesic(x_a, x_b, Identity(), n_steps=8, init=bent)
    chord = linear_path(x_a, x_b, 8)
    deviation = (path - chord).norm(dim=-1).max(1).values
    assert (deviation <= 1e-5 * (x_b - x_a).norm(dim=-1)).all()
    assert torch.equal(path[:, 0], x_a) and torch.equal(path[:, -1], x_b)


def test_a_penalised_axis_bends_the_path_and_lowers_its_energy():
    x_a, x_b = torch.tensor([[-1.0, -1.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    path = lbfgs_geodesic(x_a, x_b, Bottleneck(), n_steps=16)[0]
    chord = linear_path(x_a, x_b, 16)[0]
    middle = path[:, 0].abs() < 0.2
    assert middle.sum() >= 2
    slope = (path[middle, 1].max() - path[middle, 1].min()) / (path[middle, 0].max() - path[middle, 0].min())
    assert slope < 0.5, "the path climbs axis 2 away from the expensive middle (the chord's slope is 1)"
    assert (path - chord).norm(dim=1).max() > 0.1
    assert path_energy(path[None], Bottleneck()) < 0.8 * path_energy(chord[None], Bottleneck())
    assert torch.equal(path[0], x_a[0]) and torch.equal(path[-1], x_b[0])


def test_batched_and_single_pair_solutions_agree():
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(4, 2, generator=g, dtype=torch.float64) - 1
    x_b = torch.randn(4, 2, generator=g, dtype=torch.float64) + 1
    batched = path_energy(lbfgs_geodesic(x_a, x_b, Bottleneck(), n_steps=12), Bottleneck())
    single = [
        path_energy(lbfgs_geodesic(x_a[i : i + 1], x_b[i : i + 1], Bottleneck(), n_steps=12), Bottleneck()) for i in range(4)
    ]
    torch.testing.assert_close(batched, torch.cat(single), rtol=0.01, atol=0)


def inverse_stereographic(x: torch.Tensor) -> torch.Tensor:
    """R^D onto the unit sphere of R^{D+1} (less one pole), a diffeomorphism: its pullback's geodesics are
    the preimages of great circles. (N, D) → (N, D+1)"""
    r2 = x.pow(2).sum(-1, keepdim=True)
    return torch.cat([2 * x, r2 - 1], -1) / (r2 + 1)


def test_the_secant_geodesic_of_a_sphere_chart_is_the_great_circle():
    g = torch.Generator().manual_seed(0)  # within radius ~1 of the origin: no pair near antipodal, where the circle is loose
    x_a, x_b = (0.6 * torch.randn(2, 5, 2, generator=g, dtype=torch.float64)).unbind()
    T = 16
    solved = secant_geodesic(x_a, x_b, inverse_stereographic, n_steps=T, great_circle=False, tolerance=0.0)
    image = inverse_stereographic(solved.paths.reshape(-1, 2)).view(5, T + 1, 3)
    # The discrete energy's minimiser: T equal steps along the great circle, energy T·2(1 − cos(θ/T)).
    theta = (image[:, 0] * image[:, -1]).sum(-1).arccos()
    minimum = T * 2 * (1 - torch.cos(theta / T))
    assert ((solved.energy - minimum).abs() <= 1e-8 * minimum).all()
    # Along the circle the energy is flat to second order: 1e-8 of it leaves the waypoints ~1e-4 from equal spacing.
    torch.testing.assert_close(image, slerp(image[:, 0], image[:, -1], T), atol=2e-4, rtol=0)
    normal = torch.linalg.cross(image[:, 0], image[:, -1])  # off the great circle's plane: tighter
    assert ((image * normal[:, None]).sum(-1).abs() / normal.norm(dim=-1, keepdim=True)).max() < 1e-5
    assert torch.equal(solved.paths[:, 0], x_a) and torch.equal(solved.paths[:, -1], x_b)
    chord = secant_energy(linear_path(x_a, x_b, T), inverse_stereographic)
    torch.testing.assert_close(solved.energy, secant_energy(solved.paths, inverse_stereographic), atol=1e-12, rtol=0)
    assert (solved.energy < chord).all() and solved.start == ["chord"] * 5


def test_the_great_circle_start_reaches_the_same_geodesic_and_the_best_start_is_kept():
    g = torch.Generator().manual_seed(1)
    x_a, x_b = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    far = linear_path(x_a, x_b, 8) + 5 * torch.sin(torch.linspace(0, np.pi, 9, dtype=torch.float64))[:, None]
    solved = secant_geodesic(x_a, x_b, inverse_stereographic, n_steps=8, starts={"far": far}, max_iter=3)
    assert set(solved.energies) == {"chord", "great circle", "far"}
    best = torch.stack(list(solved.energies.values())).min(0).values
    torch.testing.assert_close(solved.energy, best, atol=0, rtol=0)
    fitted = secant_geodesic(x_a, x_b, inverse_stereographic, n_steps=8, starts={}, max_iter=200)
    image = inverse_stereographic(fitted.paths.reshape(-1, 2)).view(3, 9, 3)
    torch.testing.assert_close(image, slerp(image[:, 0], image[:, -1], 8), atol=2e-4, rtol=0)


def test_slerp_keeps_unit_norm_and_equal_angles():
    u = torch.nn.functional.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    arc = slerp(u, v, 6)
    torch.testing.assert_close(arc.norm(dim=-1), torch.ones(4, 7, dtype=torch.float64))
    steps = (arc[:, 1:] * arc[:, :-1]).sum(-1).arccos()  # (4, 6) angle of each step
    torch.testing.assert_close(steps, ((u * v).sum(-1).arccos() / 6)[:, None].expand(4, 6))
    assert torch.equal(arc[:, 0], u) and torch.allclose(arc[:, -1], v, atol=1e-12)


@pytest.mark.parametrize("cyclic", [True, False])
def test_labelled_spline_passes_through_every_centroid(cyclic):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(7).repeat_interleave(20)
    angle = 2 * np.pi * labels / 7
    h = torch.stack([torch.cos(angle), torch.sin(angle)], 1).double() @ torch.randn(2, 10, generator=g, dtype=torch.float64)
    h = h + 0.05 * torch.randn(h.shape, generator=g, dtype=torch.float64)
    spline = LabelledSpline(h, labels, cyclic=cyclic, n_components=4)
    knots = torch.from_numpy(spline.spline(np.arange(7)))
    torch.testing.assert_close(knots, spline.centroids, rtol=0, atol=1e-12)
    for a, b in [(0, 3), (5, 1)]:
        path = spline.path(a, b, 10)
        assert torch.equal(path[0], spline.centroids[a]) and torch.equal(path[-1], spline.centroids[b])
    if cyclic:
        for nu in (0, 1, 2):  # C² at the seam
            np.testing.assert_allclose(spline.spline(0.0, nu), spline.spline(7.0, nu), atol=1e-10)
        short = spline.path(0, 6, 10)  # one step back across the seam, not six forwards
        assert (short - spline.centroids[3]).norm(dim=1).min() > (spline.centroids[0] - spline.centroids[6]).norm()


# --- steering updates ---------------------------------------------------------------------------


def test_conjugate_gradient_solves_every_rows_spd_system():
    A = torch.randn(3, 6, 6, dtype=torch.float64)
    A = A @ A.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(3, 6, dtype=torch.float64)
    b[1] = 0  # a row solved from the start must stay at zero, not turn NaN
    x = conjugate_gradient(lambda v: torch.einsum("bij,bj->bi", A, v), b, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


def test_gradient_steering_raises_the_target_and_stops_each_carrier_at_the_threshold(lm):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    target, carrier = 2, torch.tensor([0, 2])
    q0 = concept_q(tail, tail.h[None], VARIANTS)[0, :, target]  # (C,)
    directions = {
        "gradient": gradient_direction(tail, VARIANTS, target),
        "fishback": fishback_direction(tail, VARIANTS, target),
    }
    threshold = float(q0[carrier].max()) + 0.01  # a random tiny LM's q barely moves: q_target saturates near 0.034
    for name, direction in directions.items():
        traj = steer(tail, carrier, VARIANTS, target, direction, step=0.01, threshold=threshold, max_steps=40)
        assert traj.h.shape[:2] == traj.q.shape[:2] and torch.equal(traj.h[0], tail.h[carrier])
        assert traj.reached.all(), f"{name} did not raise q_target by 0.01 in 40 steps"
        for c in range(2):
            steps = traj.q[: traj.last[c] + 1, c, target]
            assert (steps[:-1] < threshold).all() and steps[-1] >= threshold, f"{name} must stop at the first step past it"
            assert torch.equal(traj.h[traj.last[c] :, c], traj.h[traj.last[c], c].expand_as(traj.h[traj.last[c] :, c]))
    never = steer(tail, carrier, VARIANTS, target, directions["gradient"], step=0.1, threshold=1.1, max_steps=3)
    assert not never.reached.any() and never.h.shape[0] == 4 and never.mask.all()


def test_caa_steps_along_the_mean_difference(lm):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    mean_a, mean_b = tail.h[1], tail.h[2]
    traj = steer(tail, torch.tensor([0, 3]), VARIANTS, 2, caa_direction(mean_a, mean_b), step=0.25, threshold=1.1, max_steps=5)
    unit = (mean_b - mean_a) / (mean_b - mean_a).norm()
    steps = 0.25 * torch.arange(6, dtype=torch.float64)[:, None, None] * unit  # (S+1, 1, d)
    expected = tail.h[[0, 3]] + steps
    torch.testing.assert_close(traj.h, expected)
    for i, c in enumerate([0, 3]):
        torch.testing.assert_close(traj.q[:, i], concept_q(tail, each_carrier(tail, expected[:, i]), VARIANTS)[:, c])


@pytest.mark.parametrize("method", ["caa", "gradient", "fishback", "dual"])
def test_pairs_steered_as_one_batch_equal_each_pair_steered_alone(lm, method):
    """Per-carrier sources, targets and steps on a `select`ed tail (two pairs on one prompt) change nothing."""
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    W = model.lm_head.weight.detach()
    means = torch.randn(len(VARIANTS), 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pairs = [(0, 2, torch.tensor([0, 3]), 0.02), (1, 4, torch.tensor([3, 1]), 0.05), (3, 0, torch.tensor([2]), 0.03)]

    def direction(view, a, b):
        return {
            "caa": lambda: caa_direction(means[a], means[b]),  # (d,) for one pair, (C, d) per carrier
            "gradient": lambda: gradient_direction(view, VARIANTS, b),
            "fishback": lambda: fishback_direction(view, VARIANTS, b, lam=1e-3),
            "dual": lambda: dual_direction(view, W, VARIANTS, a, b, alpha=1e-2, top_k=10),
        }[method]()

    rows = torch.cat([c for *_, c, _ in pairs])  # (5,) carrier 3 steers in two pairs
    view = tail.select(rows)
    a = torch.cat([torch.full((len(c),), s) for s, _, c, _ in pairs])
    b = torch.cat([torch.full((len(c),), t) for _, t, c, _ in pairs])
    step = torch.cat([torch.full((len(c),), st, dtype=torch.float64) for *_, c, st in pairs])
    every = torch.arange(len(rows))
    # A random tiny LM's q barely moves: at 0.07 the pair steered to concept 4 (q₄ ≈ 0.06 at the start) stops
    # part-way and the others never do, so each row must keep its own target and stopping step.
    together = steer(view, every, VARIANTS, b, direction(view, a, b), step, threshold=0.07, max_steps=6)
    if method != "caa":  # CAA's fixed direction need not raise q₄
        assert together.reached.any() and not together.reached.all()
    start = 0
    for s, t, c, st in pairs:
        alone = steer(tail, c, VARIANTS, t, direction(tail, torch.tensor(s), torch.tensor(t)), st, threshold=0.07, max_steps=6)
        part = slice(start, start + len(c))
        steps = len(alone.h)
        torch.testing.assert_close(together.h[:steps, part], alone.h, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together.q[:steps, part], alone.q, rtol=1e-9, atol=1e-12)
        assert torch.equal(together.last[part], alone.last) and torch.equal(together.reached[part], alone.reached)
        start += len(c)


@pytest.mark.parametrize("top_k", [None, 10])
def test_dual_direction_is_the_final_space_formula_pulled_back_to_the_layer(lm, top_k):
    """Dense reference at block ℓ: J = ∂u/∂h by autograd, A = Cov_p[g] + αI in the final hidden space, and
    δ_h ∝ (JᵀAJ + εI)⁻¹Jᵀβ; where J is invertible, the image J δ_h is the final-space step (Cov + αI)⁻¹β."""
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    W = model.lm_head.weight.detach()
    carrier = torch.tensor([0, 1])
    k = top_k or W.shape[0]
    delta = dual_direction(tail, W, VARIANTS, source=0, target=2, alpha=1e-2, top_k=k)(tail.h[carrier], carrier)
    beta = W[VARIANTS[2]].mean(0) - W[VARIANTS[0]].mean(0)
    for i in range(2):
        h, c = tail.h[i], torch.tensor([i])
        J = torch.autograd.functional.jacobian(lambda v: tail.hidden(v[None], c)[0], h)  # (d, d)
        p = tail.logits(h[None], c)[0].softmax(-1).detach()
        p = torch.where(p >= p.topk(k).values[-1], p, 0)
        p = p / p.sum()
        A = W.T @ torch.diag(p) @ W - torch.outer(p @ W, p @ W) + 1e-2 * torch.eye(24, dtype=torch.float64)
        M = J.T @ A @ J
        M = M + 1e-4 * M.trace() / 24 * torch.eye(24, dtype=torch.float64)
        expected = torch.linalg.solve(M, J.T @ beta)
        torch.testing.assert_close(delta[i], expected / expected.norm(), rtol=1e-6, atol=1e-9)
        final = torch.linalg.solve(A, beta)  # the formula where it holds; J δ_h points the same way up to the ridge
        image = J @ delta[i]
        assert torch.nn.functional.cosine_similarity(image, final, dim=0) > 0.99


def test_fishback_direction_solves_the_natural_gradient_system(lm):
    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    carrier = torch.tensor([0, 3])
    delta = fishback_direction(tail, VARIANTS, target=2, lam=1e-3)(tail.h[carrier], carrier)
    for i, c in enumerate([0, 3]):
        h = tail.h[c]
        G = metric_matrix(FisherPullback(tail, carrier=c), h[None])[0] + 1e-3 * torch.eye(24, dtype=torch.float64)
        sqrt_q = OutputPullback(tail, VARIANTS, carrier=c).sqrt_q
        g = torch.autograd.functional.jacobian(lambda v: sqrt_q(v[None])[0, 2].log() * 2, h)
        natural = torch.linalg.solve(G, g)
        torch.testing.assert_close(delta[i], natural / (natural @ G @ natural).sqrt(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk", [3, 7, 4096])
def test_fisher_gram_in_chunks_equals_the_dense_rows(chunk):
    """RᵀR from token chunks, without forming R (B, k, d), equals the dense rows √p_v (W_v − E_p W) for any chunking."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(50, 6, dtype=torch.float64, generator=g)
    p = torch.randn(3, 50, dtype=torch.float64, generator=g).softmax(-1)
    for k in (50, 20):  # every token, and the top 20
        p_top, tokens = p.topk(k, dim=1)
        R = p_top.sqrt().unsqueeze(-1) * (W[tokens] - (p @ W).unsqueeze(1))
        torch.testing.assert_close(fisher_gram(W, p, p_top, tokens, chunk=chunk), R.transpose(1, 2) @ R)


def test_a_path_walked_to_its_hellinger_budget_stops_where_a_plain_loop_does(lm):
    """`at_budget` against a loop over carriers and points: each carrier walks h_c + w_t − w_0, summing
    arccos⟨√q_i, √q_i+1⟩/√2, and stops at the first point whose sum reaches arccos⟨√q_c, √q̄_b⟩/√2."""
    from geosteer.pipeline.eval import at_budget

    model, enc = lm
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    g = torch.Generator().manual_seed(8)
    start = tail.h.mean(0)
    raw = linear_path(start, start + 3 * torch.randn(24, generator=g, dtype=torch.float64), 6)  # (7, d)
    raw[3] += torch.randn(24, generator=g, dtype=torch.float64)  # a bend
    target = concept_probs(tail.logits(tail.h[:1] + raw[-1] - raw[0], torch.tensor([0])).softmax(-1), VARIANTS)[0]
    b = int(target.argmax())
    for between in (1, 3):
        got = at_budget(tail, raw, VARIANTS, b, target, between)
        pieces = [raw[t] + (raw[t + 1] - raw[t]) * i / between for t in range(len(raw) - 1) for i in range(between)]
        fine = torch.stack([*pieces, raw[-1]])
        q_end = []
        for c in range(len(tail)):
            q = concept_probs(tail.logits(tail.h[c] + fine - fine[0], torch.full((len(fine),), c)).softmax(-1), VARIANTS)
            angle = lambda p, r: float(np.arccos(np.clip((p * r).sqrt().sum().item(), -1, 1))) / np.sqrt(2)  # noqa: E731
            budget, walked, stop = angle(q[0], target), 0.0, len(fine) - 1
            for i in range(1, len(fine)):
                walked += angle(q[i - 1], q[i])
                if walked >= budget:
                    stop = i
                    break
            q_end.append(q[stop])
        q_end = torch.stack(q_end)
        assert got["q_b_budget"] == pytest.approx(float(q_end[:, b].mean()), abs=1e-9)
        assert got["top1_budget"] == float((q_end.argmax(1) == b).double().mean())
    still = at_budget(tail, start.expand(5, -1), VARIANTS, b, target, 2)  # a path that does not move
    own = concept_probs(tail.logits0.softmax(-1), VARIANTS)[:, b].mean()
    assert still["q_b_budget"] == pytest.approx(float(own), abs=1e-12)
