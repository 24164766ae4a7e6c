"""Comparing metrics exactly: the centred Gram cosine, the Gram-matching loss, trace shares, effective rank and the
stored pullback factors, against dense computations and the limits they stand for; and GAGA-Jac's Jacobian term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from geosteer.data.targets import pullback_factors
from geosteer.models.gaga import GAGA
from geosteer.models.metrics import (
    EncoderPullback,
    centred_gram_cosine,
    effective_rank,
    gram_matching_loss,
    random_rotation,
    trace_share,
)
from geosteer.pipeline.common import StageError
from geosteer.pipeline.family import FAMILIES
from geosteer.pipeline.gaga import GAGASystem, encoder_jacobian


def random_directions(B: int, n: int, D: int, generator: torch.Generator) -> torch.Tensor:
    """Unit directions, uniform on the sphere. → (B, n, D)"""
    v = torch.randn(B, n, D, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def factors(n, r, D, seed):
    return torch.randn(n, r, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_centred_cosine(A, B):
    D = A.shape[-1]
    eye = torch.eye(D, dtype=A.dtype)
    GA, GB = A.transpose(1, 2) @ A, B.transpose(1, 2) @ B  # (n, D, D)
    GA = GA - GA.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / D * eye
    GB = GB - GB.diagonal(dim1=1, dim2=2).sum(-1)[:, None, None] / D * eye
    return (GA * GB).sum((1, 2)) / (GA.norm(dim=(1, 2)) * GB.norm(dim=(1, 2)))


def test_the_centred_gram_cosine_equals_the_dense_computation():
    A, B = factors(5, 3, 7, 0), factors(5, 4, 7, 1)
    torch.testing.assert_close(centred_gram_cosine(A, B), dense_centred_cosine(A, B), atol=1e-12, rtol=0)


def test_the_centred_gram_cosine_ignores_scale_the_factors_rows_and_a_regulariser():
    A, B = factors(4, 3, 6, 2), factors(4, 2, 6, 3)
    base = centred_gram_cosine(A, B)
    Q = random_rotation(3, torch.Generator().manual_seed(0))  # AᵀA = (QA)ᵀ(QA)
    torch.testing.assert_close(centred_gram_cosine(3.0 * (Q @ A), B), base)
    lam_rows = 0.7 * torch.eye(6, dtype=A.dtype).expand(4, 6, 6)  # [A; √λ I] is a factor of AᵀA + λI
    torch.testing.assert_close(centred_gram_cosine(torch.cat([A, lam_rows], 1), B), base)
    torch.testing.assert_close(centred_gram_cosine(A, A), torch.ones(4, dtype=A.dtype))


def test_the_gram_cosine_is_the_limit_of_the_direction_sampled_correlation_whatever_the_sample():
    """Over uniform unit directions v, Cov(vᵀG₁v, vᵀG₂v) ∝ tr(G₁G₂) − tr G₁ tr G₂ / D: their Pearson correlation
    converges to the centred Gram cosine, so the exact value is what every direction sample estimates."""
    A, B = factors(3, 2, 5, 4), factors(3, 3, 5, 5)
    B[:, 0] += 2 * A[:, 0]  # correlated metrics, so the value is far from 0
    exact = centred_gram_cosine(A, B)
    for seed in (0, 1):
        v = random_directions(3, 200_000, 5, torch.Generator().manual_seed(seed))  # (3, n, 5)
        qa, qb = (A @ v.transpose(1, 2)).pow(2).sum(1), (B @ v.transpose(1, 2)).pow(2).sum(1)  # (3, n)
        qa, qb = qa - qa.mean(1, keepdim=True), qb - qb.mean(1, keepdim=True)
        pearson = (qa * qb).sum(1) / (qa.norm(dim=1) * qb.norm(dim=1))
        torch.testing.assert_close(pearson, exact, atol=0.01, rtol=0)


def test_the_gram_matching_loss_is_the_relative_frobenius_error():
    A, B = factors(3, 2, 5, 6), factors(3, 4, 5, 7)
    c = 0.3
    GA, GB = A.transpose(1, 2) @ A, c * B.transpose(1, 2) @ B
    dense = (GA - GB).pow(2).sum() / GB.pow(2).sum()
    torch.testing.assert_close(gram_matching_loss(A, B, c), dense)
    assert gram_matching_loss(c**0.5 * B, B, c) < 1e-24


def test_trace_share_and_effective_rank_on_a_known_spectrum():
    D = 6
    J = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))[None]  # eigenvalues 9, 4, 1
    assert effective_rank(J).item() == round(14**2 / (81 + 16 + 1))
    # The top-1 eigenspace of J is e₁: it holds 9/14 of JᵀJ's trace, and all of a metric living on e₁.
    torch.testing.assert_close(trace_share(J, J, torch.tensor([1])), torch.tensor([9 / 14], dtype=J.dtype))
    e1 = torch.zeros(1, 1, D, dtype=J.dtype)
    e1[0, 0, 0] = 5.0
    torch.testing.assert_close(trace_share(J, e1, torch.tensor([1])), torch.ones(1, dtype=J.dtype))
    # Random metrics share ≈ r/D of each other's trace.
    A, B = factors(2000, 6, 30, 8), factors(2000, 6, 30, 9)
    share = trace_share(A, B, torch.full((2000,), 3))
    assert abs(float(share.mean()) - 3 / 30) < 0.01


def test_stored_pullback_factors_are_the_best_low_rank_metric():
    J = factors(4, 9, 6, 10)
    F, kept = pullback_factors(J, 3)
    assert F.shape == (4, 3, 6)
    eigenvalues, vectors = torch.linalg.eigh(J.transpose(1, 2) @ J)  # ascending
    top = vectors[..., -3:] @ torch.diag_embed(eigenvalues[:, -3:]) @ vectors[..., -3:].transpose(1, 2)
    torch.testing.assert_close(F.transpose(1, 2) @ F, top, atol=1e-10, rtol=0)
    torch.testing.assert_close(kept, eigenvalues[:, -3:].sum(1) / eigenvalues.sum(1))
    full, all_kept = pullback_factors(J, 50)
    torch.testing.assert_close(full.transpose(1, 2) @ full, J.transpose(1, 2) @ J)
    torch.testing.assert_close(all_kept, torch.ones(4, dtype=J.dtype))


def _smooth_gaga(d, k):
    torch.manual_seed(0)
    model = GAGA(d, k, hidden=[32, 32], activation="silu", batch_norm=False).double()
    model.fit_normalisation(torch.randn(100, d, dtype=torch.float64))
    return model


def test_the_encoder_jacobian_of_a_batch_matches_autograd_point_by_point():
    model = _smooth_gaga(5, 3)
    x = torch.randn(7, 5, dtype=torch.float64)
    z, J = encoder_jacobian(model, x, create_graph=False)
    torch.testing.assert_close(z, model.encode(x))
    reference = torch.stack([torch.autograd.functional.jacobian(model.encode, x[i : i + 1])[0, :, 0] for i in range(7)])
    torch.testing.assert_close(J, reference)
    torch.testing.assert_close(J, EncoderPullback(model.encode).jacobian(x))


def test_the_jacobian_term_alone_teaches_an_encoder_a_known_metric():
    """G_out = AᵀA of a linear map A: the pullback term makes G_E = c·AᵀA at held-out points (Gram cosine → 1)."""
    d, k, scale = 5, 3, 0.5
    A = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = _smooth_gaga(d, k)
    system = GAGASystem(model, scale, dist=0, rec=0, cyc=0, pointwise=0, decay=0, lr=1e-2, weight_decay=0,
                        warmup_fraction=0, coords_are_hellinger=True, jac=1.0)  # fmt: skip
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    held_out = torch.randn(64, d, generator=g, dtype=torch.float64)
    _, J_E = encoder_jacobian(model, held_out, create_graph=False)
    before = centred_gram_cosine(J_E, A.expand(64, 2, d)).mean()
    for _ in range(400):
        x = torch.randn(64, d, generator=g, dtype=torch.float64)
        batch = {"x": x, "coords": torch.rand(64, 3, generator=g, dtype=torch.float64), "pullback": A.expand(64, 2, d)}
        loss = system.losses(batch)[0]["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _, J_E = encoder_jacobian(model, held_out, create_graph=False)
    after = centred_gram_cosine(J_E, A.expand(64, 2, d))
    assert before < 0.9 and after.min() > 0.99
    c = 1 / (2 * scale**2)
    G_E, G = J_E.transpose(1, 2) @ J_E, c * A.T @ A
    assert ((G_E - G).norm(dim=(1, 2)) / G.norm()).max() < 0.1, "the scale follows the Hellinger targets' c"


def test_a_jacobian_term_on_batchnorm_or_non_hellinger_targets_is_refused_with_the_fix():
    g = {"target": "hellinger", "batch_norm": True, "loss": {"pointwise": 0, "jac": 1.0}}
    with pytest.raises(StageError, match="batch_norm=false"):
        FAMILIES["gaga"].check("mine", g)
    with pytest.raises(StageError, match="target=hellinger"):
        FAMILIES["gaga"].check("mine", {**g, "target": "phate", "batch_norm": False})
    FAMILIES["gaga"].check("mine", {**g, "batch_norm": False})


def test_gaga_jac_is_smooth_and_free_of_batchnorm():
    model = GAGA(12, 3, hidden=[16, 8], activation="silu", batch_norm=False)
    assert [type(m) for m in model.encoder] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]


def test_the_spectral_deviation_at_the_effective_rank_reports_the_model_not_the_regulariser():
    from geosteer.models.metrics import factor_eigenvalues, spectral_deviation

    J = torch.diag(torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64))[None]  # JᵀJ: 4, 1, 0, 0
    lam = 1e-3
    whole = spectral_deviation(factor_eigenvalues(J, lam))
    torch.testing.assert_close(whole, torch.tensor([1 - lam / (4 + lam)], dtype=J.dtype))  # λ_reg's, not the model's
    top = spectral_deviation(factor_eigenvalues(J, 0.0), torch.tensor([2]))
    torch.testing.assert_close(top, torch.tensor([1 - 1 / 4], dtype=J.dtype))


def test_an_unknown_start_of_the_g_out_geodesic_is_refused_when_the_methods_are_built():
    from geosteer.pipeline.methods import build_methods

    with pytest.raises(StageError, match="starts.*great circle"):
        build_methods({"g_out": {"starts": ["spline", "straight"], "spline_pca": 8, "max_batch": 16}})
    assert build_methods({"g_out": {"starts": ["great circle"], "spline_pca": 8, "max_batch": 16}})["g_out"].starts
