"""stage=eval: the report on a tiny trained run, evaluation from shipped checkpoints alone, and the statistics."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from scipy import optimize, stats

from geosteer.models.geodesics import linear_path
from geosteer.models.innsteer import InnSteer
from geosteer.models.steering import steering_pairs
from geosteer.pipeline import eval as evaluate
from geosteer.pipeline import report, train
from geosteer.pipeline.methods import METHODS, SCORES, build_methods, described
from tests.conftest import wandb_records

GEOMETRIES = ("gaga_out", "gaga_jac", "gaga_phate", "innsteer", "bridge")
SMALL_EVAL = ["eval.carriers=4", "eval.steps=4", "eval.max_steps=6", "eval.max_iter_cap=10", "eval.lbfgs.max_iter=20",
              "eval.alignment.points=6", "eval.alignment.neighbours=4", "eval.own_point.alphas=[0.0,1.0]",
              "eval.own_point.max_carriers=8"]  # fmt: skip
SMALL_SPLINE = "method.spline.pca=8"  # only where spline is among the methods
SMALL_INNSTEER = ["geometry.innsteer.num_blocks=2", "geometry.innsteer.hidden=16", "geometry.innsteer.steering.carriers=2"]


@pytest.fixture(scope="module")
def evaluated(prepared):
    """Every geometry trained on weekdays of the tiny LM, then evaluated with W&B offline."""
    cfg = prepared("evaluated", *SMALL_INNSTEER, *SMALL_EVAL, SMALL_SPLINE, "logger=wandb", geometries=GEOMETRIES, epochs=2)
    train.run(cfg)
    return cfg, evaluate.run(cfg)


def beside(evaluated, cfg, products=("extract", "geometry")) -> evaluate.Path:
    """A fresh run folder for `cfg` whose `products` are links to the evaluated run's."""
    src, run_dir = evaluate.Path(evaluated[0].paths.run_dir), evaluate.Path(cfg.paths.run_dir)
    run_dir.mkdir()
    for product in products:
        (run_dir / product).symlink_to(src / product)
    return run_dir


def weekdays_results(result: dict) -> dict:
    return json.loads((evaluate.Path(result["dir"]) / "results.json").read_text())["tasks"]["weekdays"]


def test_the_report_links_only_figures_it_drew_and_keeps_no_bookkeeping(evaluated, tmp_path):
    cfg, result = evaluated
    out = evaluate.Path(result["dir"])
    links = re.findall(r"\(([^()\s]+\.png)\)", (out / "report.md").read_text())
    assert "bars.png" in links and all((out / link).is_file() for link in links), links
    assert not (out / evaluate.FINISHED).exists(), "the resume's bookkeeping is not part of the finished evaluation"
    off = cfg.copy()
    with open_dict(off):
        off.eval.figures = False
    per_task = json.loads((out / "results.json").read_text())["tasks"]
    report.write(per_task, off, tmp_path, 1.0, build_methods(off.method), "tiny")
    assert ".png" not in (tmp_path / "report.md").read_text() and not list(tmp_path.glob("*.png"))
    for r in per_task.values():  # as eval records them with g_out off: no geodesic to compare with
        r["agreement"] = r["energy"] = {"reason": "the G_out method is off"}
    report.write(per_task, off, tmp_path, 1.0, build_methods(off.method), "tiny")
    md = (tmp_path / "report.md").read_text()
    assert md.count("Not computed: the G_out method is off.") == 2, "an empty table says why, not a header alone"


def test_the_report_says_what_one_pair_and_a_small_class_leave_out(evaluated, tmp_path):
    """With one pair no best baseline can be picked on one half and tested on the other: claim 2 says so (it read
    "a method it needs is off"); and a class with fewer rows than eval.carriers is reported with the carriers it gave."""
    cfg, result = evaluated
    per_task = json.loads((evaluate.Path(result["dir"]) / "results.json").read_text())["tasks"]
    for r in per_task.values():
        r["pairs"], r["carriers_per_pair"] = r["pairs"][:1], [1]
        for entry in r["methods"].values():
            entry["per_pair"] = {k: v[:1] for k, v in entry.get("per_pair", {}).items()}
        r["agreement"] = r["energy"] = r["own_point"] = {"reason": "left out here"}
    report.write(per_task, cfg, tmp_path, 1.0, build_methods(cfg.method), "tiny")
    md = (tmp_path / "report.md").read_text()
    assert "weekdays: not tested (no best baseline: too few pairs, 1, to pick one" in md, md
    assert "GAGA-Out has lower E_B than the best baseline on weekdays and months: not testable" in md
    assert f"up to {cfg.eval.carriers} seeded carriers (fewer where the class has fewer rows: weekdays 1–1)" in md


def test_the_report_has_every_cell_and_its_numbers_come_from_the_pairs(evaluated):
    cfg, result = evaluated
    out = evaluate.Path(result["dir"])
    saved = json.loads((out / "results.json").read_text())
    task = saved["tasks"]["weekdays"]
    assert list(task["methods"]) == list(cfg.method), "every selected method, in order"
    assert len(task["pairs"]) == 42, "weekdays has K = 7 ≤ 12: every ordered pair"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(cfg.method) * len(SCORES)
    for row in rows:  # every cell is the mean of its per-pair values, with their standard error
        values = [v for v in task["methods"][row["method"]]["per_pair"][row["metric"]] if v is not None]
        walked = row["metric"] in ("q_b_budget", "top1_budget")  # the Hellinger budget walks path methods only
        if row["metric"] not in ("visit_intermediates", "offtarget_kl") and (
            not walked or task["methods"][row["method"]]["kind"] == "path"
        ):
            no_path = task["methods"][row["method"]].get("no_path_pairs", 0)  # INNSteer: a class without a mean
            assert len(values) == 42 - no_path, f"{row['method']}/{row['metric']} is missing pairs"
        if walked and task["methods"][row["method"]]["kind"] == "iterative":
            assert not values, f"{row['method']} has no path to walk"
        if values:
            assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-12)
            assert float(row["se"]) == pytest.approx(stats.sem(values), rel=1e-9, nan_ok=True)
    for m, entry in task["methods"].items():
        per_pair = entry["per_pair"]
        assert all(0 <= v <= 1 for k in ("legibility", "top1_at_end", "target_prob_end", "reached", "q_b_budget",
                                         "top1_budget") for v in per_pair[k] if v is not None)  # fmt: skip
        assert all(v >= 0 for v in per_pair["E_B"] if v is not None), m
        assert entry.get("no_path_pairs", 0) == (sum(v is None for v in per_pair["E_B"]) if m == "innsteer" else 0), m
    md = (out / "report.md").read_text()
    for entry in task["methods"].values():
        assert f"| {entry['label']} |" in md
    assert "| n/a" not in md and "## Verdicts" in md and md.count("reproduced") + md.count("not tested") >= 3
    e = cfg.eval  # every setting that shapes a path is said: the solver's and λ_reg's
    assert f"L-BFGS of at most {e.lbfgs.max_iter} iterations (history {e.lbfgs.history_size}" in md
    assert f"λ_reg = {e.lam_rel:g} × each pullback metric's eigenvalue scale" in md
    assert (f"G_out’s capped at {e.max_iter_cap}" in md) == (e.max_iter_cap is not None)
    assert f"cut each segment into {e.budget_between} pieces" in md
    for figure in ("bars.png", "paths_weekdays.png", "behaviour_weekdays.png", "alignment_weekdays.png"):
        assert (out / figure).stat().st_size > 10_000, figure
        assert f"({figure})" in md, f"the report links {figure}"
    alignment = task["alignment"]
    assert {"gaga_out", "gaga_jac", "gaga_phate", "innsteer"} <= set(alignment) and "reason" in alignment["bridge"]
    assert len(alignment["ceiling"]) == alignment["points"] and all(-1 <= c <= 1 for c in alignment["ceiling"])
    for m in ("gaga_out", "gaga_jac", "gaga_phate", "innsteer"):
        a = alignment[m]
        assert all(-1 <= r <= 1 for k in ("spearman", "gram_cosine", "floor") for r in a[k])
        assert all(0 <= v <= 1 + 1e-9 for k in ("share_of_G_out", "share_of_G") for v in a[k])
        assert 0 < a["chance_of_G_out"] <= 1 and 0 < a["chance_of_G"] <= 1
    assert all(0 <= v <= 1 for g in ("G_out", "G_F") for v in alignment[g]["spectral_deviation"])
    # G_out's geodesic against itself is the zero of surrogate agreement; the chord is the scale.
    compared = {"linear", "gaga_out", "gaga_jac", "gaga_phate", "bridge", "innsteer"}
    assert set(task["agreement"]) == compared and set(task["energy"]) == compared
    solve = task["methods"]["g_out"]["solve"]
    assert all(b <= g * (1 + 1e-6) for b, g in zip(solve["great_circle"], solve["length_geodesic"])), (
        "the great circle is a lower bound of every path's Hellinger length"
    )
    # INNSteer's protocol: every carrier from its own h; α = 0 moves nothing, for either method.
    own = task["own_point"]
    assert set(own["methods"]) == {"innsteer", "caa"} and own["alphas"] == [0.0, 1.0]
    flow = evaluate.Path(cfg.paths.run_dir) / "geometry" / "weekdays" / "innsteer" / "config.json"
    learned = set(json.loads(flow.read_text())["meta"]["metrics"]["classes_trained"])
    assert own["pairs"] == [p for p in task["pairs"] if set(p) <= learned], "the pairs the flow has both means for"
    for m, entry in own["methods"].items():
        assert len(entry["top1"]) == len(own["pairs"]) and all(0 < n <= 8 for n in entry["carriers"])
        assert all(0 <= k <= n for ks, n in zip(entry["top1"], entry["carriers"]) for k in ks)
        assert all(0 <= v <= 1 for k in ("q_b", "other") for vs in entry[k] for v in vs)
        assert all(kl[0] < 1e-5 for kl in entry["kl"]), f"{m}: α = 0 leaves the distribution as it was"
    q0 = [np.array([vs[0] for vs in own["methods"][m]["q_b"]]) for m in ("innsteer", "caa")]
    np.testing.assert_allclose(*q0, atol=1e-4, err_msg="at α = 0 INNSteer's round trip gives CAA's unmoved h")
    scored = saved["own_point"]["weekdays"]
    for m, row in scored.items():
        assert row["n"] == sum(own["methods"][m]["carriers"]), "every pair is scored once, on the half it was not picked on"
        assert row["wilson"][0] <= row["top1"] / row["n"] <= row["wilson"][1]
    assert "## INNSteer's protocol" in md
    # The tables reach W&B.
    runs = (evaluate.Path(cfg.paths.run_dir) / "wandb").glob("offline-run-*")
    logged = {i.key or "/".join(i.nested_key) for d in runs for r in wandb_records(d) if r.HasField("history")
              for i in r.history.item}  # fmt: skip
    for key in ("eval/results", "eval/table/E_B", "eval/figures/bars"):  # tables and images are logged as nested records
        assert f"{key}/_type" in logged, key


def strict(text: str):
    """Standard JSON, as a browser or jq reads it: Python's bare NaN and Infinity are refused."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))


def test_every_json_the_run_writes_is_standard_json_with_null_for_no_value(evaluated):
    cfg, result = evaluated
    run_dir = evaluate.Path(cfg.paths.run_dir)
    written = [p for p in run_dir.rglob("*.json") if "wandb" not in p.parts]
    assert {"results.json", "weekdays.json", "config.json", "stage.json"} <= {p.name for p in written}
    for path in written:
        strict(path.read_text())
    rows = strict((run_dir / "eval" / "results.json").read_text())["summary"]
    assert any(r["p"] is None for r in rows), "the best baseline's p (no test against itself) has no value: null"


def test_the_printed_summary_reads_a_number_with_no_value_as_such(tmp_path):
    """A method that scored no pair has a null mean in results.json, and a geometry a null headline metric."""
    from geosteer.pipeline.products import RunLayout
    from geosteer.pipeline.summary import summary

    (tmp_path / "eval").mkdir()
    rows = [{"task": "weekdays", "label": label, "metric": metric, "mean": mean}
            for label, mean in (("linear", 0.5), ("INNSteer", None)) for metric in ("top1_at_end", "E_B")]  # fmt: skip
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"summary": rows}))
    headline = {"steering_success_mean": None, "steering_success_min": math.nan}  # as read back, and fresh
    train_result = {"summary": {"weekdays": {"innsteer": headline}}, "seconds": 1.0}
    text = summary({"train": train_result, "eval": {"verdicts": {}, "seconds": 1.0}}, RunLayout(tmp_path))
    assert "weekdays/innsteer: steering_success_mean n/a, steering_success_min n/a" in text
    assert "time per stage" not in summary({"steer": {"generated": "x"}}, RunLayout(tmp_path)), "no stage timed, no line"
    timed = summary({"train": train_result}, RunLayout(tmp_path), {"train": 0.2})
    assert "time per stage: train 0 s" in timed, "this command's time, not the one recorded when it was made"
    assert re.search(r"linear\s+0\.50/0\.50", text) and re.search(r"INNSteer\s+nan/nan", text), text


def test_a_method_with_no_path_for_any_pair_reads_not_evaluated_and_one_with_some_is_scored():
    pairs = [[0, 1], [1, 2], [2, 3]]
    for lost, cell in ((3, "n/a¹"), (2, "–²")):
        per_task = {"weekdays": {"pairs": pairs, "methods": {"innsteer": {"label": "INNSteer", "no_path_pairs": lost}}}}
        assert report.metric_table([], per_task, "top1_at_end", 1).splitlines()[-1] == f"| INNSteer | {cell} |", lost


def test_the_bar_figure_is_drawn_when_no_method_has_a_value(tmp_path):
    """INNSteer alone, with no path for any pair: every mean is NaN, and the log axis of E_B has nothing to scale."""
    from geosteer.pipeline.figures import bars_figure

    rows = [{"task": "weekdays", "method": "innsteer", "label": "INNSteer", "metric": metric, "mean": math.nan,
             "se": math.nan} for metric in ("E_B", "target_prob_end")]  # fmt: skip
    bars_figure(rows, {"weekdays": {}}, tmp_path / "bars.png")
    assert (tmp_path / "bars.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_from_shipped_checkpoints_alone_in_a_fresh_process(evaluated, tmp_path):
    """Copy only the exported geometries and the LM; eval extracts the activations itself and gets the same numbers."""
    cfg, result = evaluated
    shipped = tmp_path / "shipped"
    shutil.copytree(evaluate.Path(cfg.paths.run_dir) / "geometry", shipped / "geometry",
                    ignore=shutil.ignore_patterns("stage.json"))  # fmt: skip
    shutil.copytree(cfg.model.pretrained, shipped / "lm")
    args = [f"paths.outputs={tmp_path}", "run_name=fresh", "logger=none", "stage=eval", "tasks=[weekdays]",
            f"model.pretrained={shipped / 'lm'}", "model.embedded=false", "model.layer=1",
            f"eval.geometry_dir={shipped / 'geometry'}", *SMALL_EVAL, SMALL_SPLINE]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "geosteer.pipeline", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads((tmp_path / "fresh" / "eval" / "results.json").read_text())["tasks"]["weekdays"]
    original = json.loads((evaluate.Path(result["dir"]) / "results.json").read_text())["tasks"]["weekdays"]
    for m, entry in original["methods"].items():
        assert fresh["methods"][m]["per_pair"] == entry["per_pair"], f"{m} differs from the run it was shipped from"
    assert fresh["alignment"]["gaga_out"] == original["alignment"]["gaga_out"]


def test_a_missing_geometry_is_an_explained_empty_cell(prepared, evaluated):
    cfg = prepared("evaluated", *SMALL_INNSTEER, *SMALL_EVAL, "method=[linear,bridge]",
                   "method.bridge.geometry=no_such_bridge", "paths.run_dir=${paths.outputs}/eval_missing",
                   geometries=GEOMETRIES)  # fmt: skip
    beside(evaluated, cfg, ("extract",))
    result = evaluate.run(cfg)
    md = evaluate.Path(result["report"]).read_text()
    assert "| GeodesicBridge (export no_such_bridge) | n/a¹ |" in md and "stage=train" in md


def test_innsteer_pairs_with_a_class_its_flow_learned_no_mean_for_are_left_out_and_named(prepared, evaluated):
    """A class no training point had has no learned mean in the flow: INNSteer's pairs to or from it are not scored
    (its untrained mean would steer somewhere), its other pairs are, and the report says which and why."""
    from geosteer.models.hub import seal

    cfg = prepared("evaluated", *SMALL_INNSTEER, *SMALL_EVAL, "method=[linear,innsteer]", "eval.all_pairs_max_k=0",
                   "eval.max_pairs=6", "paths.run_dir=${paths.outputs}/eval_unlearned", geometries=GEOMETRIES)  # fmt: skip
    run_dir = beside(evaluated, cfg, ("extract",))
    folder = run_dir / "geometry" / "weekdays" / "innsteer"
    shutil.copytree(evaluate.Path(evaluated[0].paths.run_dir) / "geometry" / "weekdays" / "innsteer", folder)
    (folder / "stage.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    pairs = steering_pairs(list(range(7)), 6, cfg.seed, 0)
    lost = pairs[0][1]  # a class of the first pair
    config["meta"]["metrics"]["classes_trained"] = [k for k in range(7) if k != lost]
    (folder / "config.json").write_text(json.dumps(config))
    seal(folder)
    result = evaluate.run(cfg)
    res = weekdays_results(result)
    assert [tuple(p) for p in res["pairs"]] == pairs, "the pairs this test reasons about"
    scored = [v is not None for v in res["methods"]["innsteer"]["per_pair"]["top1_at_end"]]
    assert scored == [lost not in p for p in pairs] and any(scored), scored
    assert res["methods"]["innsteer"]["no_path_pairs"] == sum(not s for s in scored)
    assert all(lost not in p for p in res["own_point"]["pairs"]), "own h leaves them out too"
    md = evaluate.Path(result["report"]).read_text()
    day = res["concepts"][lost]
    assert re.search(rf"weekdays/innsteer: \d of 6 pairs have no path and are left out: the flow learned no latent mean "
                     rf"for \['{day}'\]", md), md  # fmt: skip


def test_a_crashed_eval_resumes_with_the_tasks_it_finished(prepared, evaluated, monkeypatch):
    cfg = prepared("evaluated", *SMALL_EVAL, SMALL_SPLINE, "paths.run_dir=${paths.outputs}/eval_crashed")
    run_dir = beside(evaluated, cfg)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the report")

    monkeypatch.setattr(report, "write", crash)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate.run(cfg)
    (partial,) = run_dir.glob(".eval.partial-*")
    assert (partial / "weekdays.json").is_file() and not (run_dir / "eval").exists()
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "evaluate_task", lambda *a, **k: pytest.fail("a finished task was evaluated again"))
    result = evaluate.run(cfg)
    resumed, original = weekdays_results(result), weekdays_results(evaluated[1])
    assert all(resumed["methods"][m]["per_pair"] == e["per_pair"] for m, e in original["methods"].items())
    assert not list(run_dir.glob(".eval.partial-*"))


def edit_results(saved: evaluate.Path) -> None:
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "methods": []}))


def delete_a_figure(saved: evaluate.Path) -> None:
    saved.with_name(min(json.loads(saved.read_text())["figures"].values())).unlink()


def empty_a_figure(saved: evaluate.Path) -> None:
    saved.with_name(max(json.loads(saved.read_text())["figures"].values())).write_bytes(b"")


@pytest.mark.parametrize("spoil", [edit_results, delete_a_figure, empty_a_figure])
def test_a_crashed_eval_evaluates_again_a_task_it_did_not_leave_whole(prepared, evaluated, monkeypatch, spoil):
    """An unfinished evaluation's task file or one of its figures changed after it was written (edited, deleted,
    emptied, or another task's copied over it): the task is evaluated again and its figures drawn again."""
    cfg = prepared("evaluated", *SMALL_EVAL, SMALL_SPLINE, f"paths.run_dir=${{paths.outputs}}/eval_{spoil.__name__}")
    run_dir = beside(evaluated, cfg)
    monkeypatch.setattr(report, "write", lambda *a, **k: pytest.fail("stop before the report"))
    with pytest.raises(pytest.fail.Exception):
        evaluate.run(cfg)
    (saved,) = run_dir.glob(".eval.partial-*/weekdays.json")
    spoil(saved)
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(evaluate, "evaluate_task", lambda *a, **k: calls.append(1) or original_evaluate(*a, **k))
    result = evaluate.run(cfg)
    assert calls == [1], "the task whose saved results were changed is evaluated again"
    resumed, original = weekdays_results(result), weekdays_results(evaluated[1])
    assert all(resumed["methods"][m]["per_pair"] == e["per_pair"] for m, e in original["methods"].items())
    figures = [run_dir / "eval" / f for f in resumed["figures"].values()]
    assert figures and all(f.stat().st_size > 0 for f in figures)


original_evaluate = evaluate.evaluate_task


def test_gaga_phate_steering_with_a_gaga_without_pca_is_gaga_outs(prepared, evaluated):
    """GAGA-PHATE's method on an export with no PCA (`pca_dim: null`) steers in h itself: GAGA-Out's geodesics."""
    cfg = prepared("evaluated", *SMALL_EVAL, "method=[gaga_out,gaga_phate]", "method.gaga_phate.geometry=gaga_out",
                   "eval.all_pairs_max_k=0", "eval.max_pairs=4", "paths.run_dir=${paths.outputs}/eval_nopca")  # fmt: skip
    beside(evaluated, cfg)
    methods = weekdays_results(evaluate.run(cfg))["methods"]
    assert methods["gaga_phate"]["per_pair"] == methods["gaga_out"]["per_pair"]
    assert all(v is not None for v in methods["gaga_phate"]["per_pair"]["top1_at_end"])


def test_an_unknown_method_is_refused_by_name(prepared, evaluated):
    """A method YAML whose name no class registered is refused before any work, naming the choices."""
    cfg = prepared("evaluated", *SMALL_EVAL, "method=[linear]", "paths.run_dir=${paths.outputs}/eval_unknown")
    with open_dict(cfg):
        cfg.method.geodesic_magic = {}
    run_dir = beside(evaluated, cfg, ("extract",))
    with pytest.raises(evaluate.StageError, match="geodesic_magic.*linear"):
        evaluate.run(cfg)
    assert not (run_dir / "eval").exists() and not list(run_dir.glob(".eval.partial-*")), "refused before any work"


def test_summary_picks_the_best_baseline_on_one_half_and_tests_on_the_other():
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(5) for b in range(5) if a != b]  # 20 ordered pairs of 5 classes
    per_pair = {m: rng.normal(loc, 1, 20).tolist() for m, loc in (("linear", 0.0), ("spline", 1.0), ("gaga_out", 3.0))}
    per_pair["gaga_out"][3] = None  # an undefined pair drops out of its own mean and of the paired test
    roles = {"linear": "baseline", "spline": "baseline", "gaga_out": "learned"}
    per_task = {"toy": {"pairs": [list(p) for p in pairs],
                        "methods": {m: {"label": m, "role": roles[m], "per_pair": {"E_B": v, "top1_at_end": v}}
                                    for m, v in per_pair.items()}}}  # fmt: skip
    rows = report.summarise(per_task, {"E_B": -1, "top1_at_end": 1})
    row = {(r["metric"], r["method"]): r for r in rows}
    pick, test = report.halves(20)
    assert len(pick) == 10 and len(np.intersect1d(pick, test)) == 0 and len(np.union1d(pick, test)) == 20
    on_pick = {m: np.mean([per_pair[m][i] for i in pick]) for m in ("linear", "spline")}
    assert row[("E_B", "gaga_out")]["best_baseline"] == min(on_pick, key=on_pick.get), "lower E_B is better"
    assert row[("top1_at_end", "gaga_out")]["best_baseline"] == max(on_pick, key=on_pick.get), "higher is better"
    g = np.array([v for v in per_pair["gaga_out"] if v is not None])
    r = row[("top1_at_end", "gaga_out")]
    assert r["mean"] == pytest.approx(g.mean()) and r["n"] == 19 and r["se"] == pytest.approx(stats.sem(g))
    assert r["lo"] < r["mean"] < r["hi"]
    best = r["best_baseline"]
    kept = [i for i in test if per_pair["gaga_out"][i] is not None]
    assert r["diff"] == pytest.approx(np.mean([per_pair["gaga_out"][i] - per_pair[best][i] for i in kept]))
    assert math.isnan(row[("top1_at_end", best)]["p"]), "the best baseline is not tested against itself"
    tested = [r for r in rows if r["metric"] == "top1_at_end" and not math.isnan(r["p"])]  # this table's comparisons
    assert [r["p_holm"] for r in tested] == pytest.approx(list(report.holm([r["p"] for r in tested])))


def test_the_class_clustered_bootstrap_resamples_classes_not_pairs():
    """Values set by the source class alone, u_a on every pair a → b: the pairs carry only K independent numbers, so
    the mean's bootstrap spread is that of K class values, sd(u)/√K, not the sd(u)/√(K(K−1)) of independent pairs."""
    K = 40
    u = np.random.default_rng(1).normal(0, 1, K)
    pairs = [(a, b) for a in range(K) for b in range(K) if a != b]
    means = report.cluster_bootstrap([u[a] for a, _ in pairs], pairs)
    expected = u.std() / np.sqrt(K)
    assert abs(means.std() / expected - 1) < 0.1
    assert means.std() > 5 * u.std() / np.sqrt(len(pairs))
    lo, hi = report.interval([2.5] * len(pairs), pairs)
    assert lo == hi == 2.5, "a constant has no spread"


@pytest.mark.parametrize("K", [2, 3, 4])
def test_fewer_than_five_classes_give_no_interval_no_p_and_an_untestable_verdict(K):
    """Over 2 classes every usable class draw is the same pair set (and over 3 nearly so): the bootstrap's spread and
    p-value would be artefacts, so there are none, and a claim resting on them is not testable, not refuted."""
    pairs = [(a, b) for a in range(K) for b in range(K) if a != b]
    x = np.random.default_rng(K).normal(0, 1, len(pairs))
    assert all(math.isnan(v) for v in report.interval(x.tolist(), pairs))
    diff, p, n = report.paired_difference((x + 0.5).tolist(), x.tolist(), pairs)
    assert diff == pytest.approx(0.5) and math.isnan(p) and n == len(pairs)
    agreement = {"gaga_out": (x * 0 + 0.1).tolist(), "linear": (x * 0 + 0.3 + 0.01 * x).tolist()}
    claims = report.verdicts({"toy": {"pairs": [list(q) for q in pairs], "methods": {}, "agreement": agreement}}, [])
    assert claims[2]["verdict"].startswith("not testable: too few pairs or classes"), claims[2]


def test_a_constant_paired_difference_is_significant_at_the_bootstraps_resolution():
    pairs = [(a, b) for a in range(5) for b in range(5) if a != b]
    x = np.random.default_rng(2).normal(0, 1, len(pairs))
    diff, p, n = report.paired_difference((x + 0.5).tolist(), x.tolist(), pairs)
    finite = np.isfinite(report.cluster_bootstrap(x.tolist(), pairs)).sum()  # a draw of one class only has no pair
    assert diff == pytest.approx(0.5) and n == len(pairs) and p == pytest.approx(2 / (finite + 1))
    assert report.paired_difference(x.tolist(), x.tolist(), pairs)[1] == 1.0


def test_the_wilson_interval_inverts_the_score_test():
    """Its ends are the p where the score statistic |k/n − p| / √(p(1 − p)/n) equals z, found here by root finding;
    at k = 0 the upper end is z²/(n + z²)."""
    z = stats.norm.ppf(0.975)
    for k, n in ((0, 10), (3, 10), (10, 10), (17, 40), (499, 1000)):
        lo, hi = report.wilson(k, n)
        score = lambda p: abs(k / n - p) / math.sqrt(p * (1 - p) / n) - z  # noqa: E731
        if k > 0:
            assert lo == pytest.approx(optimize.brentq(score, 1e-12, min(k / n, 1 - 1e-12)), abs=1e-9)
        if k < n:
            assert hi == pytest.approx(optimize.brentq(score, max(k / n, 1e-12), 1 - 1e-12), abs=1e-9)
    assert report.wilson(0, 10) == pytest.approx((0.0, z**2 / (10 + z**2)), abs=1e-12)
    assert all(math.isnan(v) for v in report.wilson(0, 0))


def test_alpha_is_the_smallest_reaching_the_threshold_on_its_half():
    entry = {"carriers": [10, 30], "q_b": [[0.1, 0.4, 0.9], [0.3, 0.6, 0.7]]}  # 2 pairs × 3 α
    alphas = [0.5, 1.0, 2.0]
    assert report.pick_alpha(entry, np.array([0]), 0.5, alphas) == 2
    assert report.pick_alpha(entry, np.array([1]), 0.5, alphas) == 1
    assert report.pick_alpha(entry, np.array([0, 1]), 0.5, alphas) == 1, "carrier-weighted: (0.4·10 + 0.6·30)/40 = 0.55"
    assert report.pick_alpha(entry, np.array([0]), 0.95, alphas) == 2, "none reaches it: the α of the largest q_b"
    backwards = {"carriers": [10, 30], "q_b": [row[::-1] for row in entry["q_b"]]}  # the same α listed from the largest
    assert report.pick_alpha(backwards, np.array([1]), 0.5, alphas[::-1]) == 1, "the smallest α, not the first listed"
    assert report.pick_alpha(backwards, np.array([0, 1]), 0.5, alphas[::-1]) == 1


def test_an_alpha_that_reaches_no_threshold_is_marked_and_a_claim_on_two_tasks_says_which_was_not_run():
    entry = {"label": "CAA", "carriers": [10, 10], "q_b": [[0.1, 0.2], [0.1, 0.6]], "top1": [[0, 0], [0, 1]],
             "other": [[0.0, 0.0]] * 2, "kl": [[0.1, 0.2]] * 2, "distance": [[1, 1], [1, 0]], "top1_at_1": 0.5}  # fmt: skip
    (row,) = report.own_point_rows({"alphas": [0.5, 1.0], "methods": {"caa": entry}}, 0.5).values()
    one, two = report.halves(2)
    assert row["reached"] == [bool(entry["q_b"][one[0]][1] >= 0.5), bool(entry["q_b"][two[0]][1] >= 0.5)]
    assert sorted(row["reached"]) == [False, True], "one pair never reaches 0.5: its α is the largest q_b's, marked"
    rows = [{"task": "weekdays", "method": m, "label": m, "metric": "E_B", "mean": v, "lo": v, "hi": v,
             "best_baseline": "linear", "diff": -0.5 if m == "gaga_out" else math.nan,
             "p": 0.001 if m == "gaga_out" else math.nan, "p_holm": 0.001} for m, v in (("gaga_out", 1.0), ("linear", 1.5))]  # fmt: skip
    claims = report.verdicts({"weekdays": {"pairs": [], "methods": {}}}, rows)
    assert claims[1]["verdict"] == "reproduced, on weekdays only: months was not evaluated", claims[1]
    off = report.verdicts({"weekdays": {"pairs": [], "methods": {}}}, rows[1:])[1]["verdict"]  # GAGA-Out not evaluated
    assert off == "not tested (a method it needs is off; months was not evaluated)", off
    assert report.verdicts({"toy": {"pairs": [], "methods": {}}}, [])[1]["verdict"].startswith("not tested: this run "
                                                                                             "evaluated neither")  # fmt: skip


def test_one_pair_gives_no_out_of_sample_alpha():
    """With one pair a half is empty: no α can be picked on pairs it is not scored on, so there is no row."""
    entry = {"label": "CAA", "carriers": [10], "q_b": [[0.1, 0.9]], "top1": [[0, 1]], "other": [[0.0, 0.0]],
             "kl": [[0.1, 0.2]], "distance": [[1, 0]], "top1_at_1": 1.0}  # fmt: skip
    assert report.own_point_rows({"alphas": [0.5, 1.0], "methods": {"caa": entry}}, 0.5) == {}


def holm_rejects(p: np.ndarray, alpha: float) -> set[int]:
    """Holm's procedure as stated: walk the p-values upwards, reject while p_(i) < alpha / (m − i), stop at the first that is not."""
    rejected = set()
    for i, j in enumerate(np.argsort(p, kind="stable")):
        if p[j] >= alpha / (len(p) - i):
            break
        rejected.add(int(j))
    return rejected


def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_procedure_rejects():
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 17):
        for _ in range(50):
            p = rng.uniform(0, 0.2, m) ** rng.uniform(1, 3)
            adjusted = report.holm(p)
            assert (adjusted >= p).all() and (adjusted <= 1).all()
            order = np.argsort(p, kind="stable")
            assert (np.diff(adjusted[order]) >= 0).all(), "adjusted p-values keep the raw order"
            for alpha in (0.01, 0.05, 0.1):
                assert set(np.flatnonzero(adjusted < alpha).tolist()) == holm_rejects(p, alpha)
    assert report.holm(np.array([0.04]))[0] == 0.04, "one comparison needs no correction"


def test_the_innsteer_geodesic_is_a_latent_straight_line_between_the_endpoints():
    torch.manual_seed(0)
    flow = InnSteer(input_dim=6, num_classes=3, pca_dim=None, block="all_in_one", num_blocks=3, hidden=16, depth=1,
                    clamp=2.0, seed=0).double().eval()  # fmt: skip
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if "w_perm" not in name:  # the fixed permutation and its inverse stay a pair
                p.add_(0.1 * torch.randn_like(p))  # a non-trivial φ
    x_a, x_b = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    path = flow.geodesic(x_a, x_b, steps=8)  # (P, W, d)
    torch.testing.assert_close(path[:, 0], x_a, rtol=0, atol=1e-9)
    torch.testing.assert_close(path[:, -1], x_b, rtol=0, atol=1e-9)
    z = flow.encode(path.flatten(0, 1)).view(2, 9, 6)
    t = torch.linspace(0, 1, 9, dtype=torch.float64)[:, None]
    torch.testing.assert_close(z, (1 - t) * z[:, :1] + t * z[:, -1:], rtol=0, atol=1e-9)
    assert (path - linear_path(x_a, x_b, 8)).abs().max() > 1e-3, "a curved φ must bend the path"


def test_outputs_that_overflow_are_left_out_and_named_not_scored(tmp_path, tiny_lm_dir, caplog):
    """In float16 FishBack's Fisher solve overflows: its pairs' outputs are NaN. They get no score (not legibility 1.0
    from an arg-max of NaN), a warning and a line in the report that name the cause."""
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path, f"model.pretrained={tiny_lm_dir}", "model.embedded=false", "model.layer=1",
                   "tasks=[weekdays]", "model.dtype=float16", "method=[linear,caa,fishback]", "eval.max_pairs=3",
                   "eval.all_pairs_max_k=0", *SMALL_EVAL)  # fmt: skip
    from geosteer.pipeline import extract, targets

    extract.run(cfg)
    targets.run(cfg)
    with caplog.at_level("WARNING"):
        result = evaluate.run(cfg)
    saved = json.loads((evaluate.Path(result["dir"]) / "results.json").read_text())["tasks"]["weekdays"]["methods"]
    broken = saved["fishback"].get("non_finite_pairs", 0)
    scored = [v for v in saved["fishback"]["per_pair"]["legibility"] if v is not None]
    assert broken + len(scored) == 3 and broken > 0, saved["fishback"]["per_pair"]
    assert f"{broken} of 3 pairs gave non-finite output probabilities" in caplog.text
    report_md = (evaluate.Path(result["dir"]) / "report.md").read_text()
    assert "weekdays/fishback: " in report_md and "model.dtype=float16" in report_md


def test_a_method_steering_with_another_export_says_so_in_every_label():
    """method.gaga_out.geometry=gaga_phate steers with GAGA-PHATE's export: no table may read plain GAGA-Out. (A
    method registered without a YAML names its export as it likes: test_extending.)"""
    built = build_methods({"gaga_out": {"geometry": "gaga_phate"}, "gaga_phate": {"geometry": "gaga_phate"}})
    for label in (built["gaga_out"].label, built["gaga_out"].metric_label):
        assert "gaga_phate" in label and "GAGA-Out" in label, label
    assert built["gaga_phate"].label == METHODS["gaga_phate"].label, "its namesake's export: the label as registered"
    again = build_methods({"gaga_out": {"geometry": "gaga_out"}})["gaga_out"]
    assert (again.label, again.metric_label) == (METHODS["gaga_out"].label, METHODS["gaga_out"].metric_label)


def test_a_top_k_above_the_vocabulary_is_run_and_described_as_the_whole_vocabulary(caplog):
    caplog.set_level("WARNING", logger="geosteer")
    methods = build_methods({"fishback": {"step_length": 0.2, "lam": 1e-4, "top_k": 10**6},
                             "dual": {"alpha": 1e-3, "top_k": 64}})  # fmt: skip
    evaluate.fit_top_k(methods, vocab=64)
    assert methods["fishback"].top_k == 64 and "top_k = 64" in described(methods["fishback"])
    assert "method.fishback.top_k=1000000 is more tokens than the LM has (64)" in caplog.text
    assert methods["dual"].top_k == 64 and "dual" not in caplog.text, "a top_k the vocabulary holds is as given"
    whole = build_methods({"fishback": {"step_length": 0.2, "lam": 1e-4, "top_k": None}})
    evaluate.fit_top_k(whole, vocab=64)
    assert whole["fishback"].top_k is None
