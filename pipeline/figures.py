"""The evaluation's figures: each task's paths, behaviour along them and metric alignment, and the bars of the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from geosteer.models.geodesics import PCA
from geosteer.pipeline.methods import SCORES

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def task_figures(data, results: dict[str, Any], figures: dict[str, Any], folder: Path) -> dict[str, str]:
    """The per-task figures; returns {name: file name} (none when every method was skipped)."""
    if not figures["paths"]:
        return {}
    name = data.task.name
    out = {"paths": f"paths_{name}.png", "behaviour": f"behaviour_{name}.png"}
    paths_figure(data, results, figures, folder / out["paths"])
    behaviour_figure(data, results, figures, folder / out["behaviour"])
    if figures.get("alignment"):
        out["alignment"] = f"alignment_{name}.png"
        alignment_figure(data, results, figures["alignment"], figures["metric_labels"], folder / out["alignment"])
    return out


def paths_figure(data, results, figures, path: Path) -> None:
    """Every method's path for one pair on the activations' PC-1/2, over the data cloud."""
    a, b = figures["pair"]
    pca = PCA.fit(data.h.double(), 2)
    xy = pca.project(data.h.double()).numpy()
    cmap = "twilight" if data.task.topology == "cyclic" else "viridis"
    fig, ax = plt.subplots(figsize=(8, 6.5))
    ax.scatter(xy[:, 0], xy[:, 1], c=data.labels, cmap=cmap, s=5, alpha=0.35)
    c = pca.project(data.centroids.double()).numpy()
    ax.scatter(c[:, 0], c[:, 1], c="k", marker="x", s=30)
    for k in (a, b):
        ax.annotate(data.task.concepts[k], c[k], fontsize=11, weight="bold")
    colours = plt.get_cmap("tab10")
    for i, (m, trace) in enumerate(figures["paths"].items()):
        p = pca.project(trace.double()).numpy()
        style = "--" if results["methods"][m]["kind"] == "iterative" else "-"
        ax.plot(p[:, 0], p[:, 1], style, marker=".", ms=4, lw=1.6, color=colours(i % 10), label=results["methods"][m]["label"])
    ax.set(title=f"{data.task.name}: paths {data.task.concepts[a]} → {data.task.concepts[b]} on PC-1/2 of h "
                 f"(dashed: iterative, first carrier)", xlabel="PC 1", ylabel="PC 2")  # fmt: skip
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def behaviour_figure(data, results, figures, path: Path) -> None:
    """Per method, q along the path (mean over carriers) as a heat-map strip: bins × steps."""
    a, b = figures["pair"]
    strips = figures["q"]
    K = len(data.task.concepts)
    fig, axes = plt.subplots(len(strips), 1, figsize=(9, 0.35 * (K + 1) * len(strips) / 2 + 1.5), squeeze=False)
    names = [*data.task.concepts, "other"]
    for ax, (m, q) in zip(axes[:, 0], strips.items()):
        ax.imshow(q.T.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ticks = list(range(K + 1)) if K <= 12 else [a, b, K]
        ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=6)
        ax.set_ylabel(results["methods"][m]["label"], rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0, 0].set_title(f"{data.task.name}: q along each path, {data.task.concepts[a]} → {data.task.concepts[b]} "
                         f"(mean over carriers)")  # fmt: skip
    axes[-1, 0].set_xlabel("waypoint / step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def alignment_figure(data, results, scatter: dict[str, tuple[np.ndarray, np.ndarray]], labels: dict[str, str],
                     path: Path) -> None:  # fmt: skip
    """vᵀG v of each learned metric against vᵀG_out v, over held-out points and their between-class directions."""
    fig, axes = plt.subplots(1, len(scatter), figsize=(4.2 * len(scatter), 4), squeeze=False)
    for ax, (m, (g, out)) in zip(axes[0], scatter.items()):
        ax.scatter(out, g, s=2, alpha=0.3)
        ax.set(xscale="log", yscale="log", xlabel="vᵀ G_out v", ylabel=f"vᵀ G v ({labels[m]})",
               title=f"ρ = {np.nanmean(results['alignment'][m]['spearman']):.2f}, Gram cosine "
                     f"{np.nanmean(results['alignment'][m]['gram_cosine']):.2f} (means per point)")  # fmt: skip
    fig.suptitle(f"{data.task.name}: learned metrics against G_out on held-out points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars_figure(rows: list[dict[str, Any]], per_task: dict[str, Any], path: Path) -> None:
    """E_B and target_prob_end per method and task, with s.e. error bars."""
    tasks = list(per_task)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = {r["method"]: r["label"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    for ax, metric in zip(axes, ("E_B", "target_prob_end")):
        index = {(r["task"], r["method"]): r for r in rows if r["metric"] == metric}
        for i, m in enumerate(methods):
            vals = [index.get((t, m), {}).get("mean", np.nan) for t in tasks]
            errs = [index.get((t, m), {}).get("se", np.nan) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (i - len(methods) / 2 + 0.5) * width, vals, width, yerr=errs, capsize=2,
                   color=colours(i % 10), label=labels[m])  # fmt: skip
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.set_title(SCORES[metric].title.split(" (")[0])
        if not any(np.isfinite(r["mean"]) for r in index.values()):
            ax.text(0.5, 0.5, "no method has a value", transform=ax.transAxes, ha="center", color="grey")
    if any(r["metric"] == "E_B" and np.isfinite(r["mean"]) and r["mean"] > 0 for r in rows):
        axes[0].set_yscale("log")  # energies span decades
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
