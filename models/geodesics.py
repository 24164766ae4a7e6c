"""Geodesic solvers (docs/method.md §5): a path is T+1 waypoints with exact endpoints.

- `linear_path`: the chord, the geodesic of a flat metric.
- `LabelledSpline`: Wurgaft et al. 2026; a cubic spline through the class
  centroids of PCA(64) activations, in label order (periodic on cyclic tasks).
- `lbfgs_geodesic`: Arvanitidis et al. 2018; the discrete energy under a
  frozen metric (any `models.metrics.Metric`), many pairs as one batched problem.
- `secant_geodesic`: the exact discrete energy Σ‖s(x_{t+1}) − s(x_t)‖² of the
  pullback of a map s (G_out's √q), from several starts.
Both minimise with `batched_lbfgs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import CubicSpline

from geosteer.models import arguments
from geosteer.models.metrics import Metric


def linear_path(x_a: torch.Tensor, x_b: torch.Tensor, n_steps: int) -> torch.Tensor:
    """x_t = (1 − t/T) x_a + (t/T) x_b. x_a, x_b (..., D) → (..., T+1, D)"""
    arguments.pair("linear_path", x_a, x_b, dims=None)
    arguments.counts("linear_path", n_steps=n_steps)
    t = torch.linspace(0, 1, n_steps + 1, dtype=x_a.dtype, device=x_a.device).unsqueeze(-1)  # (T+1, 1)
    return (1 - t) * x_a.unsqueeze(-2) + t * x_b.unsqueeze(-2)


def subdivide(path: torch.Tensor, pieces: int) -> torch.Tensor:
    """Every segment of a path cut into `pieces` straight pieces. (..., W, D) → (..., pieces·(W−1)+1, D)"""
    inner = linear_path(path[..., :-1, :], path[..., 1:, :], pieces)[..., :-1, :].flatten(-3, -2)
    return torch.cat([inner, path[..., -1:, :]], -2)


def path_energy(path: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Σ_t ‖J(x̄_t) Δ_t‖² + λ‖Δ_t‖², J at the segment midpoints. (P, T+1, D) → (P,)"""
    arguments.tensor("path_energy", "path", path, 3)
    arguments.metric("path_energy", metric)
    P, T1, D = path.shape
    if T1 < 2:
        raise ValueError(f"path_energy: path must be paths of two or more waypoints (P, T+1 ≥ 2, D); got shape "
                         f"{tuple(path.shape)}.")  # fmt: skip
    if P == 0:  # no path: no energy
        return path.new_zeros(0)
    delta = path.diff(dim=1)  # (P, T, D)
    mid = 0.5 * (path[:, 1:] + path[:, :-1])
    J = metric.jacobian(mid.reshape(-1, D)).view(P, T1 - 1, -1, D)  # (P, T, r, D)
    Jd = torch.einsum("ptrd,ptd->ptr", J, delta)
    return (Jd**2).sum((1, 2)) + metric.lam * (delta**2).sum((1, 2))


def _two_loop(g: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, rho: torch.Tensor, newest: int, filled: int,
              gamma: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """L-BFGS directions −H g for every pair at once. g (P, n); S, Y (m, P, n); rho (m, P); gamma (P,) → (P, n)

    The history is one ring of m slots shared by all pairs, `filled` of them written, slot `newest` last;
    a pair that did not update at some iteration has rho = 0 in that slot, which changes nothing.
    """
    m = S.shape[0]
    q, alphas = g.clone(), []
    for i in range(filled):  # newest to oldest
        k = (newest - i) % m
        a = rho[k] * (S[k] * q).sum(1)  # (P,)
        q -= a[:, None] * Y[k]
        alphas.append((k, a))
    q *= gamma[:, None]
    for k, a in reversed(alphas):
        b = rho[k] * (Y[k] * q).sum(1)
        q += (a - b)[:, None] * S[k]
    return -q


def batched_lbfgs(
    fun: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    max_iter: int = 200,
    history_size: int = 20,
    tolerance: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise P independent problems at once: `fun(x_rows, rows)` gives the energies (b,) and gradients (b, n)
    of the problems `rows` (b,) at x_rows (b, n). x (P, n) → the minimisers (P, n) and their energies (P,).

    Every problem keeps its own history, step length and stopping test, so a batch solves to exactly what
    each problem solves to alone while `fun` is evaluated for all of them at once. The line search
    backtracks to the Armijo condition, per problem (docs/method.md §5's settings).
    """
    P = len(x)
    x = x.clone()
    f, g = fun(x, torch.arange(P))
    # The (s, y) history: a ring of slots shared by all problems, written once per iteration (rho = 0 where a
    # problem has nothing to add), so no history is ever shifted or gathered. A problem keeps its updates of
    # the last history_size iterations: all its updates but when one was skipped (sᵀy ≤ 1e-10, rare), and a
    # problem that stops has no further use for its history.
    S, Y = x.new_zeros(history_size, P, x.shape[1]), x.new_zeros(history_size, P, x.shape[1])
    rho, gamma = x.new_zeros(history_size, P), x.new_ones(P)
    n_hist, newest, filled = torch.zeros(P, dtype=torch.long), -1, 0
    active = g.abs().amax(1) > tolerance
    for _ in range(max_iter):
        if not active.any():
            break
        d = _two_loop(g, S, Y, rho, newest, filled, gamma)
        slope = (g * d).sum(1)
        d = torch.where((slope < 0)[:, None], d, -g)  # fall back to steepest descent
        slope = (g * d).sum(1)
        t = torch.where(n_hist > 0, 1.0, (1 / g.abs().sum(1).clamp_min(1e-300)).clamp(max=1.0)).to(x.dtype)
        pending = active.clone()
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        for _ in range(30):  # backtracking; only the problems still searching are evaluated, all together
            rows = torch.nonzero(pending).flatten()
            trial = x[rows] + t[rows, None] * d[rows]
            f_t, g_t = fun(trial, rows)
            ok = f_t <= f[rows] + 1e-4 * t[rows] * slope[rows]  # Armijo
            x_new[rows[ok]], f_new[rows[ok]], g_new[rows[ok]] = trial[ok], f_t[ok], g_t[ok]
            pending[rows[ok]] = False
            if not pending.any():
                break
            t = torch.where(pending, 0.5 * t, t)
        moved = active & ~pending  # problems whose line search succeeded
        s_vec, y_vec = x_new - x, g_new - g
        sy = (s_vec * y_vec).sum(1)
        keep = moved & (sy > 1e-10)  # problems that add (s, y) to their history
        newest, filled = (newest + 1) % history_size, min(filled + 1, history_size)
        S[newest], Y[newest] = s_vec * keep[:, None], y_vec * keep[:, None]
        rho[newest] = torch.where(keep, 1 / sy.where(keep, 1), 0)
        yy = (y_vec**2).sum(1)
        gamma = torch.where(keep & (yy > 0), sy / yy.clamp_min(1e-300), gamma)  # sᵀy / yᵀy of the newest update
        n_hist += keep
        done = (
            pending  # no step lowered the energy
            | (g_new.abs().amax(1) <= tolerance)
            | ((t[:, None] * d).abs().amax(1) <= tolerance)
            | ((f - f_new).abs() < tolerance)
        )
        x, f, g = x_new, f_new, g_new
        active &= ~done
    return x, f


def lbfgs_geodesic(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    metric: Metric,
    n_steps: int = 16,
    max_iter: int = 200,
    history_size: int = 20,
    tolerance: float = 1e-6,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimise each pair's discrete energy over its interior waypoints, J detached at each evaluation (docs/method.md §5).

    `batched_lbfgs` over all pairs at once. A metric with `jvp_vjp` (an encoder or output pullback) is used
    through J·Δ and JᵀJ·Δ alone, never forming J; the gradient is taken in closed form from ∂e/∂Δ.
    x_a, x_b (P, D) → (P, T+1, D), starting on the chord (or `init`, whose endpoints are ignored).
    """
    call = "lbfgs_geodesic"
    arguments.pair(call, x_a, x_b)
    arguments.metric(call, metric)
    arguments.counts(call, n_steps=n_steps, max_iter=max_iter, history_size=history_size)
    arguments.number(call, "tolerance", tolerance, " ≥ 0", lambda x: x >= 0)
    P, D = x_a.shape
    chord = linear_path(x_a.detach(), x_b.detach(), n_steps)  # (P, T+1, D)
    if P == 0:  # no pair: no path
        return chord
    if init is not None:
        arguments.tensor(call, "init", init, 3, D)
        if init.shape != chord.shape:
            raise ValueError(f"{call}: init must be one path per pair, of shape {tuple(chord.shape)}; got {tuple(init.shape)}.")
    if n_steps == 1:  # no inner waypoint to move
        return chord
    x = (chord if init is None else init.detach())[:, 1:-1].reshape(P, -1)  # (P, n) interior waypoints

    @torch.no_grad()
    def energy_and_grad(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Energies and gradients of the pairs `rows` at their interiors x, G frozen. (b, n) → (b,), (b, n)"""
        b = len(rows)
        path = torch.cat([chord[rows, :1], x.view(b, n_steps - 1, D), chord[rows, -1:]], 1)
        delta = path.diff(dim=1).reshape(-1, D)  # (b·T, D)
        mid = (0.5 * (path[:, 1:] + path[:, :-1])).reshape(-1, D)
        if hasattr(metric, "jvp_vjp"):  # J Δ and Jᵀ J Δ at the midpoints, never J itself
            Jd, JtJd = metric.jvp_vjp(mid, delta)  # (b·T, r), (b·T, D)
        else:
            J = metric.jacobian(mid)  # (b·T, r, D)
            Jd = torch.einsum("nrd,nd->nr", J, delta)
            JtJd = torch.einsum("nrd,nr->nd", J, Jd)
        e = Jd.pow(2).view(b, -1).sum(1) + metric.lam * delta.pow(2).view(b, -1).sum(1)
        slope = 2 * (JtJd + metric.lam * delta).view(b, n_steps, D)  # ∂e/∂Δ_t
        return e, (slope[:, :-1] - slope[:, 1:]).reshape(b, -1)  # x_t ends Δ_{t−1} and starts Δ_t

    x, _ = batched_lbfgs(energy_and_grad, x, max_iter, history_size, tolerance)
    return torch.cat([chord[:, :1], x.view(P, n_steps - 1, D), chord[:, -1:]], 1)


Embedding = Callable[[torch.Tensor], torch.Tensor]  # row-wise map s: (N, D) → (N, m)


def secant_energy(path: torch.Tensor, s: Embedding, lam: float = 0.0) -> torch.Tensor:
    """Σ_t ‖s(x_{t+1}) − s(x_t)‖² + λ‖x_{t+1} − x_t‖²: the exact discrete energy of the pullback of s. (P, T+1, D) → (P,)"""
    P, W, D = path.shape
    return _secant(s(path.reshape(-1, D)).view(P, W, -1), path, lam)


def _secant(image: torch.Tensor, path: torch.Tensor, lam: float) -> torch.Tensor:
    """`secant_energy` of paths (P, T+1, D) whose images under s are `image` (P, T+1, m). → (P,)"""
    return image.diff(dim=1).pow(2).sum((1, 2)) + lam * path.diff(dim=1).pow(2).sum((1, 2))


def _path_energy(s: Embedding, ends: torch.Tensor, s_ends: torch.Tensor, lam: float, max_batch: int | None,
                 target: torch.Tensor | None = None):  # fmt: skip
    """The `batched_lbfgs` energy of paths between `ends` (P, 2, D), whose images there are `s_ends` (P, 2, m):
    their secant energy, or with `target` (P, T−1, m), Σ_t ‖s(x_t) − target_t‖² over the interior. The
    gradient is one reverse pass through s, a chunk of whole pairs at a time."""
    D = ends.shape[-1]

    @torch.enable_grad()
    def fun(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, W1 = len(x), x.shape[1] // D  # W1 = T − 1 interior waypoints
        chunk = b if max_batch is None else max(1, max_batch // W1)
        es, gs = [], []
        for c in range(0, b, chunk):
            r = rows[c : c + chunk]
            xi = x[c : c + chunk].detach().view(len(r), W1, D).requires_grad_()
            image = s(xi.reshape(-1, D)).view(len(r), W1, -1)  # (c, T−1, m)
            if target is None:
                e = _secant(
                    torch.cat([s_ends[r, :1], image, s_ends[r, 1:]], 1), torch.cat([ends[r, :1], xi, ends[r, 1:]], 1), lam
                )
            else:
                e = (image - target[r]).pow(2).sum((1, 2))
            (g,) = torch.autograd.grad(e.sum(), xi)
            es.append(e.detach())
            gs.append(g.reshape(len(r), -1))
        return torch.cat(es), torch.cat(gs)

    return fun


def sphere_angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The angle between unit vectors (after normalising), 2·asin(‖u − v‖/2): accurate at small angles, where
    arccos⟨u, v⟩ loses half the digits. (..., m), (..., m) → (...)"""
    u, v = u / u.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
    return 2 * ((u - v).norm(dim=-1) / 2).clamp(max=1).asin()


def slerp(u: torch.Tensor, v: torch.Tensor, n_steps: int) -> torch.Tensor:
    """T+1 equally spaced points of the great circle from unit u to unit v (the shorter arc). (P, m) → (P, T+1, m)"""
    theta = sphere_angle(u, v)[:, None, None]  # (P, 1, 1)
    t = torch.linspace(0, 1, n_steps + 1, dtype=u.dtype, device=u.device).view(1, -1, 1)
    sin = theta.sin().clamp_min(1e-12)
    small = theta < 1e-6  # (nearly) the same point: the chord
    wa = torch.where(small, 1 - t, ((1 - t) * theta).sin() / sin)
    wb = torch.where(small, t, (t * theta).sin() / sin)
    return wa * u.unsqueeze(1) + wb * v.unsqueeze(1)


@dataclass
class SecantGeodesics:
    """`secant_geodesic`'s result: the paths, their energies, and which start each came from."""

    paths: torch.Tensor  # (P, T+1, D)
    energy: torch.Tensor  # (P,)
    start: list[str]  # per pair, the name of the start its path came from
    energies: dict[str, torch.Tensor]  # per start, its solved energies (P,)


def secant_geodesic(
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    s: Embedding,
    n_steps: int = 16,
    max_iter: int = 200,
    history_size: int = 20,
    tolerance: float = 1e-9,
    lam: float = 0.0,
    starts: dict[str, torch.Tensor] | None = None,
    great_circle: bool = True,
    max_batch: int | None = None,
) -> SecantGeodesics:
    """Geodesics of the pullback G = J_sᵀJ_s + λI of a map s onto a sphere (√q), as minimisers of the exact
    secant energy `secant_energy` (docs/method.md §6): s itself is evaluated at every waypoint, so nothing
    about G is frozen or taken at midpoints.

    Solved by `batched_lbfgs` from several starts, each pair keeping its lowest-energy path: the chord,
    every path in `starts` (P, T+1, D), and, with `great_circle`, the path fitted point by point to the
    great circle between s(x_a) and s(x_b) (`max_iter` iterations of its own), the lower bound's shape.
    `max_batch` bounds the points per pass through s. x_a, x_b (P, D).
    """
    P, D = x_a.shape
    x_a, x_b = x_a.detach(), x_b.detach()
    chord = linear_path(x_a, x_b, n_steps)
    with torch.no_grad():
        s_ends = s(torch.cat([x_a, x_b])).view(2, P, -1).transpose(0, 1)  # (P, 2, m)
    ends = torch.stack([x_a, x_b], 1)  # (P, 2, D)
    inits = {"chord": chord, **(starts or {})}
    if great_circle:
        arc = slerp(s_ends[:, 0], s_ends[:, 1], n_steps)[:, 1:-1]  # (P, T−1, m)
        fit = _path_energy(s, ends, s_ends, lam, max_batch, target=arc)
        x, _ = batched_lbfgs(fit, chord[:, 1:-1].reshape(P, -1), max_iter, history_size, tolerance)
        inits["great circle"] = torch.cat([chord[:, :1], x.view(P, n_steps - 1, D), chord[:, -1:]], 1)
    energy = _path_energy(s, ends, s_ends, lam, max_batch)
    solved, energies = {}, {}
    for name, init in inits.items():
        x, e = batched_lbfgs(energy, init[:, 1:-1].reshape(P, -1).detach(), max_iter, history_size, tolerance)
        solved[name] = torch.cat([chord[:, :1], x.view(P, n_steps - 1, D), chord[:, -1:]], 1)
        energies[name] = e
    names = list(solved)
    best = torch.stack([energies[n] for n in names]).argmin(0)  # (P,)
    paths = torch.stack([solved[n] for n in names])[best, torch.arange(P)]
    return SecantGeodesics(paths, torch.stack([energies[n] for n in names]).min(0).values, [names[i] for i in best], energies)


@dataclass
class PCA:
    """An affine subspace: `components` (k, d) orthonormal rows, `mean` (d,)."""

    components: torch.Tensor
    mean: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, k: int) -> PCA:
        """Top-k principal directions of x (N, d), signs fixed so that each row's largest entry is positive."""
        arguments.tensor("PCA.fit", "x", x, 2)
        arguments.counts("PCA.fit", k=k)
        if len(x) < 2:
            raise ValueError(f"PCA.fit: x holds {len(x)} row(s); principal directions need at least 2.")
        if not x.isfinite().all():
            raise ValueError("PCA.fit: x holds NaN or Inf; principal directions need finite rows (drop those rows).")
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comps = vh[: min(k, *x.shape)]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        return cls(comps * signs, mean)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        arguments.tensor("PCA.project", "x", x, None, self.components.shape[1])
        return (x - self.mean) @ self.components.T  # (..., d) → (..., k)

    def lift(self, w: torch.Tensor) -> torch.Tensor:
        arguments.tensor("PCA.lift", "w", w, None, self.components.shape[0])
        return self.mean + w @ self.components  # (..., k) → (..., d)


class LabelledSpline:
    """Cubic spline through per-class centroids of PCA(k) activations, in label order (Wurgaft et al.).

    Periodic (C² at the seam) for cyclic tasks, natural otherwise. Paths run
    between two classes' centroids along the spline, the shorter way round on
    cyclic tasks, and live in PCA coordinates: inject them by subspace replacement.

    Args:
        h: activations (N, d), finite; labels: answer class per row (N,), at least 2 classes; cyclic: the
            task's topology; n_components: k of PCA(k), at most min(N, d) taken (a larger k keeps every
            direction, so the default PCA(64) also fits a narrower model).
    """

    def __init__(self, h: torch.Tensor, labels: torch.Tensor, cyclic: bool, n_components: int = 64):
        call = "LabelledSpline"
        arguments.tensor(call, "h", h, 2)
        arguments.counts(call, n_components=n_components)
        if not bool(h.isfinite().all()):
            raise ValueError(f"{call}: h holds NaN or Inf; the spline needs finite activations (drop those rows).")
        if not isinstance(cyclic, (bool, np.bool_)):
            raise ValueError(f"{call}: cyclic={cyclic!r} must be True (a cyclic task: weekdays, months) or False.")
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or len(labels) != len(h) or (
                labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):  # fmt: skip
            got = (f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                   else type(labels).__name__)  # fmt: skip
            raise ValueError(f"{call}: labels must be an integer tensor ({len(h)},), one class per row of h; got {got}.")
        self.pca = PCA.fit(h.double(), n_components)
        self.classes = torch.unique(labels).tolist()  # label order
        if len(self.classes) < 2:
            raise ValueError(f"{call}: labels hold {len(self.classes)} class(es) {self.classes}; a spline runs "
                             f"through at least 2 class centroids.")  # fmt: skip
        z = self.pca.project(h.double())
        self.centroids = torch.stack([z[labels == c].mean(0) for c in self.classes])  # (C, k)
        knots = self.centroids.numpy()
        self.cyclic = cyclic
        if cyclic:
            self.spline = CubicSpline(np.arange(len(knots) + 1), np.vstack([knots, knots[:1]]), bc_type="periodic")
        else:
            self.spline = CubicSpline(np.arange(len(knots)), knots, bc_type="natural")

    def _index(self, name: str, c) -> int:
        """The knot of class c, refusing a class the spline does not run through."""
        key = c.item() if isinstance(c, (torch.Tensor, np.ndarray)) and c.ndim == 0 else c
        if isinstance(key, (bool, np.bool_, str, torch.Tensor, np.ndarray)) or not arguments.is_count(key, -2**63) or (
                key not in self.classes):  # fmt: skip
            raise ValueError(f"LabelledSpline.path: {name}={c!r} is not one of the spline's classes {self.classes}.")
        return self.classes.index(key)

    def path(self, a: int, b: int, n_steps: int) -> torch.Tensor:
        """Waypoints from class a's centroid to class b's, in PCA coordinates. → (T+1, k)"""
        ia, ib = self._index("a", a), self._index("b", b)
        arguments.counts("LabelledSpline.path", n_steps=n_steps)
        span = ib - ia
        if self.cyclic:
            C = len(self.classes)
            span = (span + C // 2) % C - C // 2  # shorter way round, in [−⌊C/2⌋, ⌈C/2⌉)
            span = -span if 2 * span == -C else span  # a tie goes forwards
        u = ia + span * np.linspace(0, 1, n_steps + 1)
        if self.cyclic:
            u = np.mod(u, len(self.classes))
        w = torch.from_numpy(self.spline(u))
        w[0], w[-1] = self.centroids[ia], self.centroids[ib]  # exact endpoints, free of spline round-off
        return w
