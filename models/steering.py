"""Injection of paths into the LM (docs/method.md §7) and the point-wise steering baselines (docs/method.md §6).

Injection replaces block ℓ's output at a carrier's last position, either
wholly or within a PCA subspace, and reads `q` back; all waypoints × carriers
go through `CarrierTail` as one batch. The baselines step `h` until the target
concept's probability reaches a threshold:
- CAA (mean difference of class activations);
- Euclidean gradient ascent on log q_target;
- FishBack's natural gradient (G_F + λI)⁻¹∇log q_target, by matrix-free conjugate gradient;
- dual steering (Park et al. 2026): (Cov_p[g] + αI)⁻¹β over the unembedding rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geosteer.models import arguments
from geosteer.models.geodesics import PCA
from geosteer.models.metrics import EncoderPullback, FisherPullback
from geosteer.models.tail import CarrierTail, log_concept_probs


def subspace_replace(h: torch.Tensor, w: torch.Tensor, pca: PCA) -> torch.Tensor:
    """h ← h + (w − P(h − m)) Pᵀ: the PCA coordinates of h become w; the off-subspace part stays. (N, d), (N, k) → (N, d)"""
    return h + (w - pca.project(h)) @ pca.components


def _intervention(call: str, tail: CarrierTail, h: torch.Tensor, carrier: torch.Tensor | None) -> None:
    """Refuse an `intervene` whose h is not (N, d) with carriers (N,), or (W, C, d) with C ≤ the tail's carriers."""
    if not isinstance(tail, CarrierTail):
        raise TypeError(f"{call}: tail must be a models.tail.CarrierTail, e.g. CarrierTail.of_prompts(model, "
                        f"tokenizer, layer, prompts); got {type(tail).__name__}.")  # fmt: skip
    C, d = tail.h.shape
    if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.ndim != (3 if carrier is None else 2) or (
            h.shape[-1] != d or (carrier is None and h.shape[1] > C)):  # fmt: skip
        got = f"a {h.dtype} tensor of shape {tuple(h.shape)}" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"{call}: h must be a floating tensor (N, {d}) with carrier (N,), or (W, C, {d}) with C ≤ {C} "
                         f"(the tail's carriers) and carrier None; {d} is the LM's width at block {tail.layer}; got "
                         f"{got} and {'carrier None' if carrier is None else 'a carrier'}.")  # fmt: skip
    if carrier is not None:
        if not isinstance(carrier, torch.Tensor) or carrier.ndim != 1 or len(carrier) != len(h):
            got = f"shape {tuple(carrier.shape)}" if isinstance(carrier, torch.Tensor) else type(carrier).__name__
            raise ValueError(f"{call}: carrier must be a 1-D integer tensor (N,) = ({len(h)},), one carrier per row "
                             f"of h (or None with h (W, C, d)); got {got}.")  # fmt: skip
        arguments.index(call, "carrier", carrier, C, "the tail's {n} carriers")


def intervene(tail: CarrierTail, h: torch.Tensor, carrier: torch.Tensor | None = None) -> torch.Tensor:
    """The LM's logits with block ℓ's output at a carrier's last position replaced by h: geosteer's one intervention.

    h (N, d) with `carrier` (N,) naming each row's carrier → (N, V); or h (W, C, d), row c on carrier c → (W, C, V).
    """
    _intervention("intervene", tail, h, carrier)
    if not h.shape[:-1].numel():  # no row: no logits
        return h.new_zeros(*h.shape[:-1], tail.logits0.shape[-1])
    if carrier is None:
        W, C, d = h.shape
        carrier = torch.arange(C, device=tail.h.device).repeat(W)  # row w·C + c
        return tail.logits(h.reshape(W * C, d).to(tail.h), carrier).view(W, C, -1)
    return tail.logits(h.to(tail.h), carrier)


def concept_q(tail: CarrierTail, h: torch.Tensor, variant_ids, carrier: torch.Tensor | None = None) -> torch.Tensor:
    """q of the LM under `intervene(tail, h, carrier)`. (N, d) → (N, K+1), or (W, C, d) → (W, C, K+1)"""
    logits = intervene(tail, h, carrier)
    return log_concept_probs(logits.flatten(0, -2), variant_ids).exp().view(*logits.shape[:-1], -1)


def carrier_rows(labels: np.ndarray, a: int, n: int, seed: int) -> np.ndarray:
    """The carriers of class a: a seeded sample of up to n rows with label a, sorted; the same wherever steering is scored."""
    rows = np.flatnonzero(labels == a)
    return np.sort(np.random.default_rng([seed, a]).choice(rows, min(n, len(rows)), replace=False))


def steering_pairs(classes: Sequence[int], max_pairs: int, seed: int, all_pairs_max_k: int) -> list[tuple[int, int]]:
    """Every ordered pair (a, b), a ≠ b, of `classes` when there are at most `all_pairs_max_k` of them
    (or at most `max_pairs` pairs); else a seeded sample of `max_pairs`."""
    pairs = [(a, b) for a in classes for b in classes if a != b]
    if len(classes) <= all_pairs_max_k or len(pairs) <= max_pairs:
        return pairs
    keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
    return [pairs[i] for i in sorted(keep)]


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, tol: float = 1e-8,
                       max_iter: int = 200) -> torch.Tensor:  # fmt: skip
    """Solve A_i x_i = b_i for every row i, each A_i symmetric positive-definite, given only X ↦ (A_i x_i)_i. (B, D) → (B, D)

    A row stops moving once its residual is below `tol`·‖b_i‖.
    """
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), (r * r).sum(1)
    goal = (tol * b.norm(dim=1)) ** 2
    for _ in range(max_iter):
        live = rs > goal  # (B,)
        if not live.any():
            break
        Ap = matvec(p)
        alpha = torch.where(live, rs / (p * Ap).sum(1).where(live, 1), 0)[:, None]
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = (r * r).sum(1)
        p = r + torch.where(live, rs_new / rs.where(live, 1), 0)[:, None] * p
        rs = rs_new
    return x


@dataclass
class Trajectory:
    """Iterated steering of C carriers; a carrier that reaches the threshold stops, and its rows repeat its last state."""

    h: torch.Tensor  # (S+1, C, d) the steered activation after each step, h[0] unsteered
    q: torch.Tensor  # (S+1, C, K+1) its behaviour
    last: torch.Tensor  # (C,) long, each carrier's last step
    reached: torch.Tensor  # (C,) bool, q_target reached the threshold

    @property
    def mask(self) -> torch.Tensor:
        """(S+1, C) bool, the steps each carrier took."""
        return torch.arange(len(self.h), device=self.last.device)[:, None] <= self.last[None]


def log_q_grad(tail: CarrierTail, carrier: torch.Tensor, h: torch.Tensor, variant_ids,
               target: int | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """∇_h log q_target, each row on its carrier (rows are independent, so one backward gives all).

    target: one concept for all rows, or one per row (N,). carrier (N,), h (N, d) → (N, d)
    """
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        target = torch.as_tensor(target, device=h.device).expand(len(h))[:, None]
        log_q = log_concept_probs(tail.logits(h, carrier), variant_ids).gather(1, target)
        return torch.autograd.grad(log_q.sum(), h)[0]


def steer(
    tail: CarrierTail,
    carrier: torch.Tensor,
    variant_ids: Sequence[Sequence[int]],
    target: int | torch.Tensor,
    direction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    step: float | torch.Tensor,
    threshold: float = 0.5,
    max_steps: int = 50,
) -> Trajectory:
    """Iterate h ← h + step · direction(h, carrier) from each carrier's own h until its q_target ≥ threshold.

    carrier (C,) indices into the tail; `direction` maps the still-moving rows h (n, d) and their carriers (n,)
    to step directions (n, d). All moving carriers step together, one batch per step, so many pairs steer
    as one batch: `target` and `step` are one for all, or one per row of `carrier` (C,). A direction that is NaN or
    Inf (an LM that overflows at its dtype) carries into h and q as it is: the caller names such rows (eval does).
    """
    if not isinstance(carrier, torch.Tensor) or carrier.ndim != 1:
        got = f"shape {tuple(carrier.shape)}" if isinstance(carrier, torch.Tensor) else type(carrier).__name__
        raise ValueError(f"steer: carrier must be a 1-D integer tensor (C,) of the tail's carriers; got {got}.")
    if not len(carrier):
        raise ValueError("steer: carrier holds no carrier; give at least one index of the tail's carriers.")
    arguments.index("steer", "carrier", carrier, len(tail), "the tail's {n} carriers")
    arguments.token_lists("steer", "variant_ids", variant_ids, tail.logits0.shape[-1])
    arguments.index("steer", "target", target, len(variant_ids), "the {n} concepts of variant_ids")
    arguments.number("steer", "threshold", threshold, " > 0 (above 1: never reached, every carrier takes max_steps)",
                     lambda x: x > 0)  # fmt: skip
    arguments.counts("steer", 0, max_steps=max_steps)
    h = tail.h[carrier]
    C = len(carrier)
    for name, value in (("target", target), ("step", step)):  # one for all carriers, or one per row of carrier
        if isinstance(value, torch.Tensor) and value.ndim and value.shape != (C,):
            raise ValueError(f"steer: {name} must be one value or a 1-D tensor of one per carrier ({C},); got shape "
                             f"{tuple(value.shape)}.")  # fmt: skip
    steps = step if isinstance(step, torch.Tensor) else None
    if steps is None:
        arguments.number("steer", "step", step, " ≥ 0", lambda x: x >= 0)
    elif not steps.is_floating_point():
        raise ValueError(f"steer: step must be a float tensor (one step ≥ 0 per carrier); got {steps.dtype}: pass "
                         f"step.float().")  # fmt: skip
    elif not (torch.isfinite(steps) & (steps >= 0)).all():
        raise ValueError(f"steer: step must hold finite floats ≥ 0 (one per carrier); got {steps.flatten().tolist()[:5]}.")
    target = torch.as_tensor(target, device=h.device).expand(C)[:, None]  # (C, 1)
    step = torch.as_tensor(step, dtype=h.dtype, device=h.device).expand(C)[:, None]  # (C, 1)
    with torch.no_grad():
        q = concept_q(tail, h, variant_ids, carrier)
    hs, qs = [h], [q]
    last = torch.zeros(C, dtype=torch.long, device=h.device)
    moving = q.gather(1, target)[:, 0] < threshold
    for n in range(1, max_steps + 1):
        if not moving.any():
            break
        rows = torch.nonzero(moving).flatten()
        h, q = h.clone(), q.clone()
        move = direction(h[rows], carrier[rows])  # (n, d)
        if not isinstance(move, torch.Tensor) or move.shape != h[rows].shape:
            got = f"shape {tuple(move.shape)}" if isinstance(move, torch.Tensor) else type(move).__name__
            raise ValueError(f"steer: direction must map h ({len(rows)}, {h.shape[1]}) to directions of that shape; "
                             f"at step {n} it gave {got}.")  # fmt: skip
        h[rows] = h[rows] + (step[rows] * move.detach()).to(h.dtype)  # a bf16 LM's h
        with torch.no_grad():
            q[rows] = concept_q(tail, h[rows], variant_ids, carrier[rows])
        last[rows] = n
        moving[rows] = q[rows].gather(1, target[rows])[:, 0] < threshold
        hs.append(h)
        qs.append(q)
    return Trajectory(torch.stack(hs), torch.stack(qs), last, q.gather(1, target)[:, 0] >= threshold)


# Each *_direction returns the function (h (n, d), carrier (n,)) → unit step directions (n, d) that `steer` iterates.
# Its target (and source) is one concept for every carrier, or a tensor with one per carrier of the tail, so
# that one `steer` call moves many pairs at once.


def _at(x: int | torch.Tensor, carrier: torch.Tensor) -> int | torch.Tensor:
    """A per-carrier setting at the rows' carriers; a single value as it is."""
    return x[carrier] if isinstance(x, torch.Tensor) and x.ndim else x


def caa_direction(mean_source: torch.Tensor, mean_target: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CAA: the unit mean difference of the two classes' activations, the same at every step.

    The means are (d,), or (C, d) with a row per tail carrier.
    """
    delta = mean_target - mean_source
    unit = delta / delta.norm(dim=-1, keepdim=True)
    return lambda h, carrier: (unit[carrier] if unit.ndim == 2 else unit).expand_as(h)


def gradient_direction(
    tail: CarrierTail, variant_ids, target: int | torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Euclidean gradient ascent on log q_target, unit length."""

    def direction(h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        g = log_q_grad(tail, carrier, h, variant_ids, _at(target, carrier))
        return g / g.norm(dim=1, keepdim=True)

    return direction


def fishback_direction(tail: CarrierTail, variant_ids, target: int | torch.Tensor, lam: float = 1e-4,
                       top_k: int | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """FishBack: δ = (G_F + λI)⁻¹ ∇log q_target by matrix-free CG, of unit length in the (G_F + λI) norm.

    `top_k` as in `FisherPullback` (None: every token).
    """
    arguments.number("fishback_direction", "lam", lam, " ≥ 0", lambda x: x >= 0)
    arguments.counts("fishback_direction", optional=("top_k",), top_k=top_k)

    def direction(h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        F = FisherPullback(tail, carrier=carrier, top_k=top_k).jacobian(h).detach()  # (n, r, d) factor: G_F = FᵀF

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return torch.einsum("nrd,nr->nd", F, torch.einsum("nrd,nd->nr", F, v)) + lam * v

        delta = conjugate_gradient(matvec, log_q_grad(tail, carrier, h, variant_ids, _at(target, carrier)))
        return delta / (delta * matvec(delta)).sum(1, keepdim=True).sqrt()

    return direction


def dual_direction(
    tail: CarrierTail,
    unembedding: torch.Tensor,
    variant_ids: Sequence[Sequence[int]],
    source: int | torch.Tensor,
    target: int | torch.Tensor,
    alpha: float = 1e-3,
    top_k: int = 256,
    ridge: float = 1e-4,
    chunk: int = 1024,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dual steering (Park et al.), pulled back to block ℓ through the tail's Jacobian (docs/method.md §6).

    The formula δ_u = (Cov_p[g] + αI)⁻¹β, Cov_p[g] = Gᵀdiag(p)G − μμᵀ over the top-k unembedding rows G, holds in
    the final hidden space u (the lm_head's input), where β, the difference of the target and source concepts' mean
    unembedding rows, lives. The step at block ℓ is δ_h = (JᵀAJ + εI)⁻¹Jᵀβ, J = ∂u/∂h and A = Cov_p[g] + αI: the
    same objective ⟨β, Jδ⟩ − ½‖Jδ‖²_A in h, so J δ_h = δ_u wherever J is invertible. ε = `ridge`·tr(JᵀAJ)/d holds
    the directions u ignores (a final RMSNorm's radial one) and stays above the float32 rounding of JᵀAJ. J and A
    are taken at every step's h, J by `EncoderPullback` (one reverse pass per row of u, batched over points: 2.8×
    faster here than one pass batched over the rows by vmap); the products in h's dtype, the d × d system solved
    in float64. unembedding (V, d).
    """
    arguments.counts("dual_direction", top_k=top_k, chunk=chunk)
    for name, value in (("alpha", alpha), ("ridge", ridge)):
        arguments.number("dual_direction", name, value, " ≥ 0", lambda x: x >= 0)
    means = torch.stack([unembedding[list(v)].mean(0) for v in variant_ids])  # (K, d) each concept's mean row
    beta = means[target] - means[source]  # (d,), or (C, d) with a row per carrier

    def direction(h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(h), chunk):
            hc, cc = h[s : s + chunk].detach(), carrier[s : s + chunk]
            n, d = hc.shape
            J = EncoderPullback(lambda x: tail.hidden(x, cc)).jacobian(hc)  # (n, d_u, d): J = ∂u/∂h
            with torch.no_grad():
                p = tail.logits(hc, cc).softmax(-1)
            p_top, tokens = p.topk(min(top_k, p.shape[1]), dim=1)
            p_top = (p_top / p_top.sum(1, keepdim=True)).to(h.dtype)
            G = unembedding[tokens].to(h.dtype)  # (n, k, d_u)
            GJ = G @ J  # (n, k, d): the token rows pulled back
            R = p_top.sqrt().unsqueeze(2) * (GJ - p_top.unsqueeze(1) @ GJ)  # (n, k, d) √p_k (g_k − μ)ᵀJ
            F = torch.cat([R, alpha**0.5 * J], 1)  # JᵀAJ = FᵀF, a Gram matrix: positive semi-definite in any dtype
            M = (F.transpose(1, 2) @ F).double()
            eps = ridge * M.diagonal(dim1=1, dim2=2).sum(1) / d  # (n,)
            M = M + eps[:, None, None] * torch.eye(d, dtype=M.dtype, device=M.device)
            b = (beta[cc] if beta.ndim == 2 else beta.expand(n, -1)).to(h.dtype)  # (n, d_u)
            rhs = (J.transpose(1, 2) @ b.unsqueeze(2)).squeeze(2).double()  # Jᵀβ
            delta = torch.linalg.solve(M, rhs)  # LU: a float32 Gram matrix may be indefinite at its rounding level
            out.append((delta / delta.norm(dim=1, keepdim=True)).to(h.dtype))
        return torch.cat(out)

    return direction
