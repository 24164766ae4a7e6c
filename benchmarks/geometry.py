"""Geometry core speed: the G_out Jacobian and batched L-BFGS, each against its slow form, as ratios in one run.

1. J_s = ∂√q(tail(h))/∂h per waypoint: the fast path (carrier K/V cached,
   one token through blocks ℓ+1…L, every row and waypoint in one reverse
   pass) against the paper's method (whole model per waypoint, one
   `autograd.grad` per row), on the embedded-size LM (hidden 128, 3 blocks,
   ℓ = 1, K = 7 and ages' K = 99) and on a random Llama of hidden 1024, 8 blocks, vocab 32k
   (ℓ = 5, K = 7 and K = 26). Also max |ΔJ| relative to max |J|. Target ≥ 30×.
2. L-BFGS geodesics (16 interior waypoints, d = 256, a GAGA-style encoder
   pullback): 64 pairs as one batched problem against one pair at a time
   (the first 16), per pair, and how far apart the per-pair energies land
   (target ≤ 1 %). Target ≥ 10×. Also the solver on J·Δ and JᵀJ·Δ against
   the solver that forms J, for k = 32 and 99 latent coordinates.
3. The amortised geodesic: one GeodesicBridge forward pass (hidden [256, 256])
   for the same 64 pairs and waypoints, per pair, against batched L-BFGS per
   pair. Target ≥ 1000×.
4. The evaluation's `G_out` solve on the embedded-size LM (K = 7 and 99, 16
   pairs, 40 iterations, as the frozen-metric solve once ran): L-BFGS on J_s Δ and
   J_sᵀJ_s Δ (three reverse passes) against the solver that forms J_s (K + 1
   rows), and FishBack steering of 16 carriers for 24 pairs: all pairs as one
   batch against one pair at a time (as `stage=eval` did). Old against new,
   with how far apart their results land.
5. The bridge's density hinge at ages' size (128 curves × 31 inner points
   against 3,780 training rows, d = 128, k = 5), value and gradient: the
   neighbours found without autograd and only their distances differentiated
   (`geosteer.models.geodesic_bridge.knn_mean_distance`) against the backward through the
   whole distance matrix it replaced.

Figures go to benchmarks/results/geometry.json.

    python -m benchmarks.geometry [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from geosteer.data.tasks import load_task
from geosteer.models.geodesic_bridge import GeodesicBridge, knn_mean_distance
from geosteer.models.geodesics import lbfgs_geodesic, linear_path, path_energy
from geosteer.models.metrics import EncoderPullback, OutputPullback, output_jacobian_reference
from geosteer.models.steering import fishback_direction, steer
from geosteer.models.tail import CarrierTail
from geosteer.models.task_lm import build_task_lm, build_word_tokenizer
from geosteer.pipeline.common import CONFIG_DIR, timed

RESULTS = Path(__file__).parent / "results" / "geometry.json"
WAYPOINTS, REFERENCE_WAYPOINTS, PROMPT_LEN = 16, 4, 16


def jacobian_case(name: str, model, ids: torch.Tensor, layer: int, K: int) -> dict:
    variant_ids = [[i + 3] for i in range(K)]  # one-token concepts; every other token is "other"
    tail = CarrierTail(model, layer, ids, torch.ones_like(ids))
    x = tail.h + 0.1 * tail.h.norm() * torch.randn(WAYPOINTS, tail.h.shape[1], generator=torch.Generator().manual_seed(0))
    metric = OutputPullback(tail, variant_ids)
    fast, fast_s = timed(lambda: metric.jacobian(x), repeats=3)
    ref, ref_s = timed(lambda: output_jacobian_reference(model, layer, ids, variant_ids, x[:REFERENCE_WAYPOINTS]), repeats=1)
    fast_ms, ref_ms = 1e3 * fast_s / WAYPOINTS, 1e3 * ref_s / REFERENCE_WAYPOINTS
    rel = float((fast[:REFERENCE_WAYPOINTS] - ref).abs().max() / ref.abs().max())
    row = {"model": name, "K": K, "layer": layer, "fast_ms_per_waypoint": fast_ms, "reference_ms_per_waypoint": ref_ms}
    return row | {"ratio": ref_ms / fast_ms, "max_rel_diff": rel}


class JacobianOnly:
    """A metric that offers only its factor J: the solver's path before it used Jacobian products."""

    def __init__(self, metric):
        self.metric, self.lam = metric, metric.lam

    def jacobian(self, x: torch.Tensor) -> torch.Tensor:
        return self.metric.jacobian(x)


def lbfgs_case(pairs: int = 64, singles: int = 16, d: int = 256) -> tuple[dict, dict]:
    """Batched against one-at-a-time L-BFGS, and the GeodesicBridge's forward pass against batched L-BFGS."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(d, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 32)).eval()
    metric = EncoderPullback(encoder, lam=1e-3)
    x_a, x_b = torch.randn(pairs, d), torch.randn(pairs, d)
    batched, batched_s = timed(lambda: lbfgs_geodesic(x_a, x_b, metric, n_steps=WAYPOINTS + 1), repeats=1)
    bridge = GeodesicBridge(d, hidden=[256, 256]).eval()  # the default bridge; its weights do not change its cost
    bridge.fit_normalisation(torch.randn(1024, d))
    grid = torch.linspace(0, 1, WAYPOINTS + 2)  # the same T+1 waypoints as the L-BFGS paths
    with torch.no_grad():
        _, bridge_s = timed(lambda: bridge(x_a, x_b, grid), repeats=20)
    start = time.perf_counter()  # one at a time: the first `singles` pairs (each takes about a second)
    single = torch.cat([lbfgs_geodesic(x_a[i : i + 1], x_b[i : i + 1], metric, n_steps=WAYPOINTS + 1) for i in range(singles)])
    single_ms = 1e3 * (time.perf_counter() - start) / singles
    with torch.no_grad():
        e_batched, e_single = path_energy(batched[:singles], metric), path_energy(single, metric)
        vs_chord = path_energy(batched, metric) / path_energy(linear_path(x_a, x_b, WAYPOINTS + 1), metric)
    gap = ((e_batched - e_single).abs() / e_single).max().item()
    batched_ms, bridge_ms = 1e3 * batched_s / pairs, 1e3 * bridge_s / pairs
    # Old against new under the same metric: forming J (k reverse passes) against J·Δ and JᵀJ·Δ (three).
    products = {}
    for k in (32, 99):
        torch.manual_seed(k)
        wide = nn.Sequential(nn.Linear(d, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, k)).eval()
        m = EncoderPullback(wide, lam=1e-3)
        new_path, new_s = timed(lambda: lbfgs_geodesic(x_a, x_b, m, n_steps=WAYPOINTS + 1), repeats=1)
        old_path, old_s = timed(lambda: lbfgs_geodesic(x_a, x_b, JacobianOnly(m), n_steps=WAYPOINTS + 1), repeats=1)
        with torch.no_grad():
            e_new, e_old = path_energy(new_path, m), path_energy(old_path, m)
        products[f"k={k}"] = {"jacobian_ms_per_pair": 1e3 * old_s / pairs, "products_ms_per_pair": 1e3 * new_s / pairs,
                              "ratio": old_s / new_s, "max_rel_energy_gap": float(((e_new - e_old).abs() / e_old).max())}  # fmt: skip
    lbfgs = {
        "pairs": pairs,
        "jacobian_products_vs_jacobian": products,
        "single_pairs_timed": singles,
        "d": d,
        "batched_ms_per_pair": batched_ms,
        "single_ms_per_pair": single_ms,
        "ratio": single_ms / batched_ms,
        "max_rel_energy_gap": gap,
        "mean_energy_vs_chord": vs_chord.mean().item(),
    }
    amortised = {"pairs": pairs, "d": d, "hidden": [256, 256], "bridge_ms_per_pair": bridge_ms,
                 "lbfgs_batched_ms_per_pair": batched_ms, "ratio": batched_ms / bridge_ms,
                 "ratio_vs_single_lbfgs": single_ms / bridge_ms}  # fmt: skip
    return lbfgs, amortised


def evaluation_case(model, tokenizer, prompts, K: int, pairs: int = 16, steer_pairs: int = 24) -> dict:
    """The G_out solve by Jacobian products against by J, and FishBack batched over pairs against pair by pair."""
    tokenizer.padding_side = "left"
    enc = tokenizer([p.text for p in prompts[:16]], padding=True, return_tensors="pt")
    tail = CarrierTail(model, 1, enc.input_ids, enc.attention_mask)
    variant_ids = [[i + 3] for i in range(K)]
    g = torch.Generator().manual_seed(K)
    spread = tail.h.std(0).mean()
    x_a, x_b = tail.h[0] + spread * torch.randn(2, pairs, tail.h.shape[1], generator=g)
    g_out = OutputPullback(tail, variant_ids, carrier=0, lam=1e-3, max_batch=1024)
    # tolerance 0: all 40 iterations (a random LM's q is nearly flat, and its tiny gradients would stop both at once)
    solve = lambda m: lbfgs_geodesic(x_a, x_b, m, n_steps=WAYPOINTS, max_iter=40, tolerance=0.0)  # noqa: E731
    new_path, new_s = timed(lambda: solve(g_out), repeats=1)
    old_path, old_s = timed(lambda: solve(JacobianOnly(g_out)), repeats=1)
    with torch.no_grad():
        e_new, e_old = path_energy(new_path, g_out), path_energy(old_path, g_out)
    row = {"K": K, "pairs": pairs, "jacobian_s": old_s, "products_s": new_s, "ratio": old_s / new_s,
           "median_rel_energy_gap": float(((e_new - e_old).abs() / e_old).median())}  # fmt: skip
    # FishBack: every (pair, carrier) row in one steer call, against one call per pair.
    C, targets = len(tail), torch.arange(steer_pairs) % K
    rows = torch.arange(C).repeat(steer_pairs)
    view = tail.select(rows)
    target = targets.repeat_interleave(C)

    def one_by_one():
        return [steer(tail, torch.arange(C), variant_ids, int(b), fishback_direction(tail, variant_ids, int(b), top_k=32),
                      0.2, threshold=0.5, max_steps=8) for b in targets]  # fmt: skip

    def batched():
        return steer(view, torch.arange(len(view)), variant_ids, target, fishback_direction(view, variant_ids, target, top_k=32),
                     0.2, threshold=0.5, max_steps=8)  # fmt: skip

    alone, alone_s = timed(one_by_one, repeats=1)
    together, together_s = timed(batched, repeats=1)
    gap = max(float((together.h[: len(a.h), i * C : (i + 1) * C] - a.h).abs().max()) for i, a in enumerate(alone))
    row |= {"fishback_pairs": steer_pairs, "fishback_carriers": C, "fishback_pair_by_pair_s": alone_s,
            "fishback_batched_s": together_s, "fishback_ratio": alone_s / together_s, "fishback_max_abs_gap": gap}  # fmt: skip
    return row


def knn_case(points: int = 128 * 31, rows: int = 3780, d: int = 128, k: int = 5) -> dict:
    """The density hinge's kNN distance with its gradient: selected neighbours against the whole distance matrix."""
    g = torch.Generator().manual_seed(0)
    data, x = torch.randn(rows, d, generator=g), torch.randn(points, d, generator=g)

    def whole():  # the replaced form: topk of the distance matrix, differentiated through all of it
        y = x.clone().requires_grad_()
        torch.cdist(y, data).topk(k, dim=1, largest=False).values.mean(1).sum().backward()
        return y.grad

    def selected():
        y = x.clone().requires_grad_()
        knn_mean_distance(y, data, k).sum().backward()
        return y.grad

    old, old_s = timed(whole, repeats=5)
    new, new_s = timed(selected, repeats=5)
    return {"points": points, "rows": rows, "d": d, "k": k, "whole_matrix_ms": 1e3 * old_s, "selected_ms": 1e3 * new_s,
            "ratio": old_s / new_s, "max_rel_grad_gap": float((new - old).abs().max() / old.abs().max())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    prompts = load_task("weekdays", CONFIG_DIR / "task").prompts()
    ages = load_task("ages", CONFIG_DIR / "task").prompts()  # enough words for K = 99 one-token concepts
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts + ages)
    embedded = build_task_lm(tokenizer, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256).eval()
    ids = tokenizer(prompts[0].text, return_tensors="pt").input_ids
    mid_config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16
    )
    mid = LlamaForCausalLM(mid_config).eval()
    mid_ids = torch.randint(3, 32000, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    jac = [
        jacobian_case("embedded (hidden 128, 3 blocks)", embedded, ids, 1, 7),
        jacobian_case("embedded (hidden 128, 3 blocks)", embedded, ids, 1, 99),  # ages' K
        jacobian_case("mid (hidden 1024, 8 blocks, vocab 32k)", mid, mid_ids, 5, 7),
        jacobian_case("mid (hidden 1024, 8 blocks, vocab 32k)", mid, mid_ids, 5, 26),
    ]
    for row in jac:
        print(json.dumps(row))
    geo, bridge = lbfgs_case()
    print(json.dumps(geo))
    print(json.dumps(bridge))
    evaluation = [evaluation_case(embedded, tokenizer, prompts, K) for K in (7, 99)]
    for row in evaluation:
        print(json.dumps(row))
    knn = knn_case()
    print(json.dumps(knn))
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(), "waypoints": WAYPOINTS}
    meta["targets"] = {"jacobian_ratio": 30, "jacobian_max_rel_diff": 1e-5, "lbfgs_ratio": 10, "bridge_ratio": 1000}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "jacobian": jac, "lbfgs": geo, "bridge": bridge, "evaluation": evaluation,
                                  "density_hinge": knn},
                                  indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
