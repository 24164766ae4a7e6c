"""What `pipeline` prints when it is done: a short summary to read. Each stage's full result stays in its
product's `stage.json`; third-party chatter (Lightning's tips, device banners, known warnings) is kept out."""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any

from geosteer.pipeline.products import RunLayout

SHOWN = ("top1_at_end", "E_B")  # the headline metrics: does the target answer win at the end, and how directly


def quiet_third_parties() -> None:
    """Silence what other libraries print on every run that says nothing about this one."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # device banners, tips, "Seed set to", "fit stopped"
    for message in (r".*isinstance\(treespec, LeafSpec\).*", r".*module\(s\) in eval mode.*",
                    r".*smaller than the logging interval.*", r".*does not have many workers.*"):  # fmt: skip
        warnings.filterwarnings("ignore", message=message)


def summary(results: dict[str, dict[str, Any]], run: RunLayout, seconds: dict[str, float] | None = None) -> str:
    """Where the products are, the time per stage (`seconds`: this command's, a stage found current included), the
    trained geometries, the headline table and the verdicts."""
    results = {stage: r for stage, r in results.items() if isinstance(r, dict)}  # launched ranks other than 0 return None
    times = [f"{stage} {s:.0f} s" for stage, s in (seconds or {}).items()]
    lines = [f"geosteer: done ({', '.join(results)}) in {run.root}", *([f"time per stage: {', '.join(times)}"] if times else [])]
    if "train" in results and "summary" in results["train"]:
        lines += [f"geometries, exported to {run.geometries}:"]
        lines += [f"  {task}/{name}: " + ", ".join(f"{k} {'n/a' if v is None or v != v else v}" for k, v in headline.items())  # None as read back, NaN fresh
                  for task, geometries in results["train"]["summary"].items() for name, headline in geometries.items()]  # fmt: skip
    if "eval" in results and (run.eval / "results.json").is_file():
        lines += [f"report: {run.eval / 'report.md'}", *headline_table(run), "verdicts:"]  # where the run is now
        lines += [f"  {claim}: {verdict}" for claim, verdict in results["eval"].get("verdicts", {}).items()]
    return "\n".join(lines)


def headline_table(run: RunLayout) -> list[str]:
    """Methods × tasks of the SHOWN metrics' means, from the evaluation's results.json."""
    rows = json.loads((run.eval / "results.json").read_text())["summary"]
    if not rows:
        return ["no method was scored (every one was skipped; the report says why)"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = {(r["label"], r["task"], r["metric"]): math.nan if r["mean"] is None else r["mean"] for r in rows}  # null: none
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = max(map(len, labels))
    out = [f"{' / '.join(SHOWN)} per method (mean over pairs):", "  " + " " * width + "".join(f"{t:>16}" for t in tasks)]
    for label in labels:
        values = ["/".join(f"{cells.get((label, t, m), float('nan')):.2f}" for m in SHOWN) for t in tasks]
        out.append(f"  {label:<{width}}" + "".join(f"{v:>16}" for v in values))
    return out
