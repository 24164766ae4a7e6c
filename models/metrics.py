"""Pullback metrics as Jacobian factors (docs/method.md §4–§6): `G(x) = J(x)ᵀ J(x) + λ I`, G never formed.

One contract, `Metric`: `jacobian(x)` maps points (B, D) to factors (B, r, D),
and `lam` is λ_reg. Plug-ins:
- `EncoderPullback`: J_E = ∂E/∂x of any encoder (GAGA, Sun et al. 2025); `pullback_of`
  gives it for a shipped geometry's `encode`, so INNSteer's flow φ defines G_φ = J_φᵀJ_φ.
- `OutputPullback`: J_s = ∂√q(tail(h))/∂h, the analytical output metric G_out.
- `FisherPullback`: FishBack's full-vocabulary Fisher G_F = J_zᵀ(diag p − ppᵀ)J_z,
  factored as rows √p_v (∇z_v − ∇E_p[z]) so that no V×V matrix is formed.
Plus the FishBack diagnostics of a metric's spectrum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from geosteer.models import arguments
from geosteer.models.lm import concept_probs, replace_last_token
from geosteer.models.tail import CarrierTail, log_concept_probs, sqrt_q_head_jacobian


class Metric(Protocol):
    lam: float

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """Jacobian factor at each point. (B, D) → (B, r, D)"""
        ...


def metric_matrix(metric: Metric, x: torch.Tensor) -> torch.Tensor:
    """G = JᵀJ + λI, for small D (tests, diagnostics). (B, D) → (B, D, D)"""
    J = metric.jacobian(x)
    return J.transpose(1, 2) @ J + metric.lam * torch.eye(x.shape[1], dtype=J.dtype, device=J.device)


def metric_eigenvalues(metric: Metric, x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of G at each point, from the factor's singular values (no D×D matrix). (B, D) → (B, D), descending"""
    return factor_eigenvalues(metric.jacobian(x), metric.lam)


def factor_eigenvalues(J: torch.Tensor, lam: float) -> torch.Tensor:
    """Eigenvalues of JᵀJ + λI from a factor J. (B, r, D) → (B, D), descending"""
    sv2 = torch.linalg.svdvals(J) ** 2  # (B, min(r, D))
    return torch.cat([sv2, sv2.new_zeros(len(J), J.shape[2] - sv2.shape[1])], 1) + lam


def spectral_deviation(eigenvalues: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """FishBack's relative spectral deviation from Euclidean, ‖G/‖G‖₂ − I‖₂ = 1 − λ_min/λ_max. (B, D) → (B,)

    With `rank` (B,), over each point's top-r block of eigenvalues (descending, λ_reg excluded): of a rank-deficient
    metric, whose λ_min over all of R^D is its regulariser, the whole-space value would report λ_reg, not the model.
    """
    if rank is None:
        return 1 - eigenvalues.min(-1).values / eigenvalues.max(-1).values
    top = eigenvalues.sort(-1, descending=True).values
    return 1 - top.gather(-1, (rank.to(top.device) - 1).clamp_min(0)[:, None])[:, 0] / top[:, 0]


def effective_dimensionality(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Participation ratio (Σλ)²/Σλ² as a fraction of D. (B, D) → (B,)"""
    return eigenvalues.sum(-1) ** 2 / (eigenvalues**2).sum(-1) / eigenvalues.shape[-1]


class EncoderPullback:
    """G_E = J_Eᵀ J_E + λI for an encoder E: R^D → R^k (any module or function of (B, D) rows; eval mode)."""

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor], lam: float = 0.0):
        if not callable(encoder):
            raise TypeError(f"EncoderPullback: encoder={encoder!r} must be a module or function of (B, D) rows, e.g. "
                            f"geometry.encode (or pullback_of(geometry)).")  # fmt: skip
        self.encoder, self.lam = encoder, arguments.number("EncoderPullback", "lam", lam, " ≥ 0", lambda x: x >= 0)

    @torch.enable_grad()
    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        x = arguments.tensor("EncoderPullback.jacobian", "x", x, 2).detach().requires_grad_()
        z = self.encoder(x)  # (B, k); rows are independent in eval mode
        k = z.shape[1]  # one reverse pass per latent coordinate, batched over points: faster than vmap(jacrev) here
        rows = [torch.autograd.grad(z[:, r].sum(), x, retain_graph=r < k - 1)[0] for r in range(k)]
        return torch.stack(rows, 1)  # (B, k, D)

    def jvp_vjp(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """J v and Jᵀ J v at points x for tangents v, never forming J (`jacobian_products`). (B, D) → (B, k), (B, D)"""
        return jacobian_products(self.encoder, x, v)


@torch.enable_grad()
def jacobian_products(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor,
                      max_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """J v and Jᵀ J v of a row-wise map f at points x for tangents v, by three reverse passes whatever f's width.

    What a geodesic solver needs of G = JᵀJ along a path, without forming J (one reverse pass per
    output row). J v is the gradient in u of ⟨Jᵀu, v⟩ (the double-vjp trick; faster here than forward
    mode). Points go `max_batch` at a time (None: all at once); f's rows must be independent of each
    other. x, v (B, D) → (B, r), (B, D)
    """
    Jv, JtJv = [], []
    step = max_batch or len(x)
    for s in range(0, len(x), step):
        xb = x[s : s + step].detach().requires_grad_()
        z = f(xb)  # (b, r)
        u = torch.zeros_like(z, requires_grad=True)
        (Jt_u,) = torch.autograd.grad(z, xb, u, create_graph=True)  # Jᵀu, linear in u
        (Jv_b,) = torch.autograd.grad(Jt_u, u, v[s : s + step].detach())
        (JtJv_b,) = torch.autograd.grad(z, xb, Jv_b)
        Jv.append(Jv_b.detach())
        JtJv.append(JtJv_b)
    return torch.cat(Jv), torch.cat(JtJv)


FIT_ROWS = 512  # training rows (a class-stratified, seeded sample) the eigenvalue scale of λ_reg is taken on


def regularisation(metric: Metric, x: torch.Tensor, rel: float = 1e-3) -> float:
    """λ_reg = rel × the metric's eigenvalue scale: the mean of JᵀJ's (at most min(r, D)) non-zero eigenvalues over x.

    docs/method.md §4 sets λ_reg to 1e-3 of that scale. trace(JᵀJ) = ‖J‖²_F, so no eigenvalue is computed. x (B, D)
    """
    return scaled_lam(rel, eigenvalue_scale(metric.jacobian(x)))


def scaled_lam(rel: float, scale: float) -> float:
    """λ_reg = rel × scale, refused when it is not a finite number (a rel so large that it overflows)."""
    if not math.isfinite(lam := rel * scale):
        raise ValueError(f"λ_reg = lam_rel={rel!r} × the metric's eigenvalue scale {scale:.4g} is {lam}: lower lam_rel "
                         f"(the method's is 1e-3).")  # fmt: skip
    return lam


def eigenvalue_scale(J: torch.Tensor) -> float:
    """Mean over points of the mean of JᵀJ's at most min(r, D) non-zero eigenvalues, as ‖J‖²_F / min(r, D). J (B, r, D)"""
    return float(J.pow(2).sum((1, 2)).mean()) / min(J.shape[1:])


def recorded_scale(geometry) -> float | None:
    """The eigenvalue scale of a GAGA's pullback on its training rows, as its export records it (`metric_scale`): what
    λ_reg = rel × scale is taken from, in the evaluation and in steering alike; None for an export without it."""
    scale = ((getattr(geometry, "meta", None) or {}).get("metrics") or {}).get("metric_scale")
    return float(scale) if isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0 else None


def pullback_of(geometry, lam: float = 0.0) -> EncoderPullback:
    """The metric a shipped geometry (GAGA, InnSteer) defines on raw activations h: J_encodeᵀ J_encode + λI.

    For INNSteer, J_φ is square (or D × d with PCA) and its latent is flat, so the
    G_φ-geodesics are exactly φ⁻¹ of straight latent lines: the steering paths.
    """
    if not callable(getattr(geometry, "encode", None)) or not isinstance(geometry, torch.nn.Module):
        raise TypeError(f"pullback_of takes a geometry with an encoder (GAGA or InnSteer, e.g. from load_geometry); "
                        f"got {type(geometry).__name__}, which has no encode().")  # fmt: skip
    geometry.eval()
    return EncoderPullback(geometry.encode, lam)


def carriers(carrier: int | torch.Tensor, start: int, h: torch.Tensor) -> torch.Tensor:
    """Carrier indices of the points h, which start at point `start`: one pinned index, or a slice of per-point ones. → (N,)"""
    if isinstance(carrier, torch.Tensor) and carrier.ndim == 1:
        if start + len(h) > len(carrier):
            raise ValueError(f"carrier holds {len(carrier)} per-point carriers, for {start + len(h)} points: give the "
                             f"metric one carrier per point (carrier=torch.tensor([...]) of their number), or one int "
                             f"for all.")  # fmt: skip
        return carrier[start : start + len(h)].to(h.device)
    return torch.full((len(h),), int(carrier), device=h.device)


def _pullback_rows(forward, cotangents, x: torch.Tensor, max_batch: int) -> torch.Tensor:
    """Rows cᵣᵀ ∂y/∂x for every point, by one reverse pass per chunk batched over the rows (vmap over the vjp).

    `forward(x_chunk, s)` returns y (b, …) for the chunk starting at point s, each
    point's output depending only on that point; `cotangents(y, s)` gives the
    rows (R, b, …), possibly computed from y itself. Returns (B, R, D).
    """
    out = []
    for s in range(0, len(x), max_batch):
        xb = x[s : s + max_batch].detach().requires_grad_()
        with torch.enable_grad():  # solvers call metrics under no_grad
            y = forward(xb, s)
        with torch.no_grad():
            rows = cotangents(y.detach(), s)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(y, xb, grad_outputs=rows, is_grads_batched=True)
        out.append(grad.transpose(0, 1))  # (b, R, D)
    return torch.cat(out)


def _identity_rows(R: int, b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.eye(R, dtype=like.dtype, device=like.device).unsqueeze(1).expand(R, b, R)  # (R, b, R)


def _tail_arguments(call: str, tail, carrier, lam, max_batch) -> None:
    """The arguments an output or Fisher pullback shares: a `CarrierTail`, a carrier of it, λ ≥ 0, a batch ≥ 1."""
    if not isinstance(tail, CarrierTail):
        raise TypeError(f"{call}: tail must be a models.tail.CarrierTail, e.g. CarrierTail.of_prompts(model, "
                        f"tokenizer, layer, prompts); got {type(tail).__name__}.")  # fmt: skip
    arguments.index(call, "carrier", carrier, len(tail), "the tail's {n} carriers")
    arguments.number(call, "lam", lam, " ≥ 0", lambda x: x >= 0)
    arguments.counts(call, max_batch=max_batch)


class OutputPullback:
    """G_out = J_sᵀ J_s + λI with J_s = ∂√q(tail(h))/∂h in a carrier's context (docs/method.md §6). Rows K+1, columns d.

    With a plain lm_head, ∂√q/∂u at the final hidden state u is taken in closed
    form and only the blocks after ℓ are differentiated (the "head trick").

    Args:
        tail: the carriers' tail.
        carrier: the carrier the metric is taken on: an index pins one for every point (a solve's
            canonical carrier); a tensor (B,) gives point i carrier[i] (each point in its own prompt).
        variant_ids: the concept schema (token ids per concept).
        max_batch: points per reverse pass (bounds memory).
    """

    def __init__(self, tail: CarrierTail, variant_ids: Sequence[Sequence[int]], carrier: int | torch.Tensor = 0,
                 lam: float = 0.0, max_batch: int = 64):  # fmt: skip
        _tail_arguments("OutputPullback", tail, carrier, lam, max_batch)
        arguments.token_lists("OutputPullback", "variant_ids", variant_ids, tail.logits0.shape[-1])
        self.tail, self.variant_ids, self.carrier, self.lam, self.max_batch = tail, variant_ids, carrier, lam, max_batch

    def sqrt_q(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """s = √q at points h (the points from `start` on), each on its carrier. (N, d) → (N, K+1)"""
        if h.shape[-1] != (d := self.tail.h.shape[1]):
            raise ValueError(f"OutputPullback.sqrt_q: h must be (N, {d}), the LM's width at block {self.tail.layer}; "
                             f"got shape {tuple(h.shape)}.")  # fmt: skip
        return (0.5 * log_concept_probs(self.tail.logits(h, carriers(self.carrier, start, h)), self.variant_ids)).exp()

    def jvp_vjp(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """J_s v and J_sᵀ J_s v (`jacobian_products`): three reverse passes through the tail whatever K is,
        where `jacobian` takes a batched one of K+1 rows. (B, d) → (B, K+1), (B, d)"""
        if isinstance(self.carrier, torch.Tensor) and self.carrier.ndim == 1:
            raise ValueError("jvp_vjp takes one pinned carrier; give `carrier` as an int, or use `jacobian`.")
        d = self.tail.h.shape[1]
        arguments.tensor("OutputPullback.jvp_vjp", "x", x, 2, d)
        arguments.tensor("OutputPullback.jvp_vjp", "v", v, 2, d)
        if v.shape != x.shape:
            raise ValueError(f"OutputPullback.jvp_vjp: v must be one tangent per point, of x's shape {tuple(x.shape)}; "
                             f"got {tuple(v.shape)}.")  # fmt: skip
        return jacobian_products(self.sqrt_q, x, v, self.max_batch)

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        arguments.tensor("OutputPullback.jacobian", "x", x, 2, self.tail.h.shape[1])
        R, head = len(self.variant_ids) + 1, self.tail.head
        if head is None:  # logits are not head(hidden): differentiate through the whole tail
            rows = lambda y, s: _identity_rows(R, len(y), y)  # noqa: E731
            return _pullback_rows(self.sqrt_q, rows, x, self.max_batch)

        def hidden(xb: torch.Tensor, s: int) -> torch.Tensor:  # the final hidden state u (b, d)
            return self.tail.hidden(xb, carriers(self.carrier, s, xb))

        def head_rows(u: torch.Tensor, s: int) -> torch.Tensor:  # ∂√q/∂u in closed form, (R, b, d)
            return sqrt_q_head_jacobian(head(u), head.weight, self.variant_ids).transpose(0, 1)

        return _pullback_rows(hidden, head_rows, x, self.max_batch)  # (B, K+1, d)


class FisherPullback:
    """FishBack's G_F = J_zᵀ(diag p − ppᵀ)J_z + λI over the full vocabulary (logits z at the last position).

    The factor's rows are √p_v (∇z_v − μ) with μ = Σ_v p_v ∇z_v, since
    G_F = Σ_v p_v (∇z_v − μ)(∇z_v − μ)ᵀ. With a plain lm_head (z = W u + b)
    they are √p_v (W_v − E_p[W]) pulled back through the blocks after ℓ.
    `top_k=None` takes every token (exact); `top_k=k` keeps the k most probable
    tokens per point, dropping the rest's (positive semi-definite) share: use it
    for vocabularies too large to take token by token. With a plain lm_head and
    more kept tokens than d, the k rows are first compressed, exactly, to the d
    rows √λᵢ eᵢ of their Gram matrix, so a reverse pass costs min(k, d) rows.
    """

    def __init__(self, tail: CarrierTail, carrier: int | torch.Tensor = 0, lam: float = 0.0, top_k: int | None = None,
                 max_batch: int = 64):  # fmt: skip
        _tail_arguments("FisherPullback", tail, carrier, lam, max_batch)
        arguments.counts("FisherPullback", optional=("top_k",), top_k=top_k)
        self.tail, self.carrier, self.lam, self.top_k, self.max_batch = tail, carrier, lam, top_k, max_batch

    def logits(self, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits at points h, each on its carrier (`carrier` as in `OutputPullback`). (N, d) → (N, V)"""
        return self.tail.logits(h, carriers(self.carrier, start, h))

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        arguments.tensor("FisherPullback.jacobian", "x", x, 2, self.tail.h.shape[1])
        with torch.no_grad():
            p = self.logits(x).softmax(-1)  # (B, V)
        k = p.shape[1] if self.top_k is None else min(self.top_k, p.shape[1])
        p_top, tokens = p.topk(k, dim=1)  # (B, k)
        head = self.tail.head
        if head is not None:
            W = head.weight.detach()  # (V, d)
            if k > W.shape[1]:  # the same Gram matrix RᵀR from d rows √λᵢ eᵢ
                gram = fisher_gram(W, p, p_top, tokens)  # (B, d, d); eigh takes no half precision: float32, then back
                eigenvalues, vectors = torch.linalg.eigh(gram if gram.dtype in (torch.float32, torch.float64) else gram.float())
                rows = (vectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(1)).transpose(1, 2).to(gram.dtype)  # (B, d, d)
            else:
                rows = p_top.sqrt().unsqueeze(-1) * (W[tokens] - (p @ W).unsqueeze(1))  # (B, k, d) cotangents on u

            def hidden(xb: torch.Tensor, s: int) -> torch.Tensor:
                return self.tail.hidden(xb, carriers(self.carrier, s, xb))

            return _pullback_rows(hidden, lambda u, s: rows[s : s + len(u)].transpose(0, 1), x, self.max_batch)

        def token_logits(xb: torch.Tensor, s: int) -> torch.Tensor:  # (b, k+1): the kept tokens' logits and E_p[z]
            z = self.logits(xb, s)
            return torch.cat([z.gather(1, tokens[s : s + len(xb)]), (p[s : s + len(xb)] * z).sum(1, keepdim=True)], 1)

        J = _pullback_rows(token_logits, lambda y, s: _identity_rows(k + 1, len(y), y), x, self.max_batch)  # (B, k+1, d)
        return p_top.sqrt().unsqueeze(-1) * (J[:, :k] - J[:, k:])  # (B, k, d)


def fisher_gram(W: torch.Tensor, p: torch.Tensor, p_top: torch.Tensor, tokens: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """RᵀR for the rows R_v = √p_v (W_v − w̄) of the kept tokens, w̄ = E_p[W], without forming R. → (B, d, d)

    Summed over chunks of tokens, so memory stays at B × chunk × d whatever the vocabulary.
    W (V, d), p (B, V), p_top and tokens (B, k).
    """
    w_bar = (p @ W).unsqueeze(1)  # (B, 1, d)
    gram = W.new_zeros(len(p), W.shape[1], W.shape[1])
    for c in range(0, tokens.shape[1], chunk):
        R = p_top[:, c : c + chunk, None].sqrt() * (W[tokens[:, c : c + chunk]] - w_bar)  # (B, c, d)
        gram += R.transpose(1, 2) @ R
    return gram


def output_jacobian_reference(model, layer: int, input_ids: torch.Tensor, variant_ids, x: torch.Tensor) -> torch.Tensor:
    """The paper's method, kept as the reference: whole model per point, one `autograd.grad` per row.

    input_ids (1, T) one carrier, x (B, d) → J_s (B, K+1, d).
    """
    out = []
    for h in x:
        h = h.detach().clone().requires_grad_()
        with replace_last_token(model, layer, h.unsqueeze(0)):
            logits = model(input_ids=input_ids, use_cache=False).logits[:, -1]
        s = concept_probs(logits.softmax(-1), variant_ids)[0].sqrt()  # (K+1,)
        out.append(torch.stack([torch.autograd.grad(s[r], h, retain_graph=True)[0] for r in range(len(s))]))
    return torch.stack(out)


# ---------------------------------------------------------------- metric alignment (docs/method.md §9)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last axis, tied values taking their average rank. (..., n), (..., n) → (...)"""

    def ranks(x: torch.Tensor) -> torch.Tensor:  # average 1-based ranks: ties span positions lo … hi−1 of the sort
        s = x.sort(-1).values.contiguous()
        lo, hi = torch.searchsorted(s, x.contiguous()), torch.searchsorted(s, x.contiguous(), right=True)
        return (lo + hi + 1).to(x.dtype if x.is_floating_point() else torch.float64) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def centred_gram_cosine(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """cos(AᵀA − τ_A I, BᵀB − τ_B I), τ = tr/D: how alike two metrics are, whatever their scale and any λI.

    The Frobenius cosine of the metrics with their isotropic parts removed, so that neither a scale nor a
    regulariser λI moves it; computed from the factors through their small Gram matrices,
    ⟨AᵀA, BᵀB⟩ = ‖A Bᵀ‖²_F, never a D×D matrix. 1 for metrics equal up to scale; about 0 for unrelated ones.
    A (n, a, D), B (n, b, D) → (n,)
    """
    D = A.shape[-1]
    inner = (A @ B.transpose(1, 2)).pow(2).sum((1, 2))
    norm_a, norm_b = (A @ A.transpose(1, 2)).pow(2).sum((1, 2)), (B @ B.transpose(1, 2)).pow(2).sum((1, 2))
    tr_a, tr_b = A.pow(2).sum((1, 2)), B.pow(2).sum((1, 2))
    centred = (norm_a - tr_a**2 / D).clamp_min(0) * (norm_b - tr_b**2 / D).clamp_min(0)
    return (inner - tr_a * tr_b / D) / centred.sqrt().clamp_min(torch.finfo(A.dtype).tiny)


def gram_matching_loss(A: torch.Tensor, B: torch.Tensor, c: float) -> torch.Tensor:
    """Σ_i ‖A_iᵀA_i − c B_iᵀB_i‖²_F / Σ_i ‖c B_iᵀB_i‖²_F: a pullback AᵀA matched to c·BᵀB, through the Gram
    matrices A Aᵀ, A Bᵀ and B Bᵀ (a×a, a×b, b×b), never D×D. A (n, a, D), B (n, b, D) → ()"""
    B = B * c**0.5
    aa, ab = (A @ A.transpose(1, 2)).pow(2).sum((1, 2)), (A @ B.transpose(1, 2)).pow(2).sum((1, 2))
    bb = (B @ B.transpose(1, 2)).pow(2).sum((1, 2))
    return (aa - 2 * ab + bb).sum() / bb.sum()


def effective_rank(J: torch.Tensor) -> torch.Tensor:
    """The participation ratio (Σσ²)²/Σσ⁴ of JᵀJ, rounded, at least 1: how many directions the metric uses. (n, r, D) → (n,)"""
    sv2 = torch.linalg.svdvals(J).pow(2)
    return (sv2.sum(-1) ** 2 / sv2.pow(2).sum(-1).clamp_min(torch.finfo(J.dtype).tiny)).round().clamp_min(1).long()


def trace_share(J_top: torch.Tensor, J: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The share of tr(JᵀJ) in the top-r(i) eigenspace of J_topᵀJ_top, per point: 1 when JᵀJ lives there, r/D by
    chance. J_top (n, a, D), J (n, b, D), r (n,) → (n,)"""
    _, _, Vh = torch.linalg.svd(J_top, full_matrices=False)  # (n, min(a, D), D)
    keep = torch.arange(Vh.shape[1], device=J.device) < r[:, None]  # (n, min(a, D))
    captured = (J @ Vh.transpose(1, 2)).pow(2) * keep[:, None]  # (n, b, min(a, D)): ‖J v_j‖² of the kept v_j
    return captured.sum((1, 2)) / J.pow(2).sum((1, 2)).clamp_min(torch.finfo(J.dtype).tiny)


def random_rotation(D: int, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random orthogonal D×D matrix (QR of a Gaussian, signs fixed). → (D, D)"""
    Q, R = torch.linalg.qr(torch.randn(D, D, generator=generator, dtype=dtype, device=generator.device))
    return Q * torch.sign(torch.diagonal(R))
