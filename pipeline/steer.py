"""stage=steer: steer one prompt's generation with a trained geometry, and show what it changes.

    pipeline stage=steer steer.prompt="Q: What day is two days after Monday?\nA:" steer.target=Thursday \
        steer.geometry=gaga_out steer.alpha=1

prints the unsteered and steered generations and the concept distribution q before and after,
and writes `<run>/steer/<task>-<geometry>-<target>.png`: q along α ∈ [0, 1].
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig

from geosteer.data.store import put_in_place
from geosteer.models.hub import REPO_ID, CheckpointError, geometry_source, load_geometry, read_config, strict_json
from geosteer.models.lm import SKETCH_TOLERANCE, read_last_token, sketch_distance, weight_sketch
from geosteer.models.steer import Steering
from geosteer.pipeline.common import CONFIG_DIR, SAFE_NAME, StageError, atomic_write_text, load_lm, log, to_plain
from geosteer.pipeline.products import (
    STAMP,
    RunLayout,
    check_inside,
    check_product,
    fingerprint,
    in_run,
    lm_fingerprint,
    lm_source,
    warn_lm_config,
    warn_stale_needs,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def geometry_folder(cfg: DictConfig) -> Path:
    """`steer.geometry` as an export folder: a path as given, `<task>/<name>` of this run's geometries, a Hub repo
    id (owner/name), or a plain name under this run's `geometry/<task>/` (the task whose values hold `steer.target`)."""
    target, text = str(cfg.steer.target), str(cfg.steer.geometry)
    given = Path(text).expanduser()
    explicit = text.startswith(("/", "./", "../", "~")) or text in (".", "..")  # written as a path: a path alone
    if explicit or len(given.parts) != 1 or not SAFE_NAME.fullmatch(given.name):  # a path, <task>/<name>, a repo
        own = RunLayout.of(cfg).geometries / given
        if not explicit and (own / "config.json").is_file():  # <task>/<name> of this run, before a folder of the
            return trained_as(own, given.name)  # working directory
        if (given / "config.json").is_file():
            return given.resolve()
        if not explicit and len(given.parts) == 2 and own.parent.is_dir():
            names = sorted(p.parent.name for p in own.parent.glob("*/config.json"))
            raise StageError(f"steer.geometry={given}: this run has no export {given.name!r} of task "
                             f"{given.parts[0]!r} ({own} holds no config.json); its exports of that task are {names}. "
                             f"Give one of them, or train it (`pipeline stage=train`).")  # fmt: skip
        if not explicit and REPO_ID.fullmatch(text) and not given.exists():  # owner/name on the Hub: cached, or downloaded
            try:
                return geometry_source(text)
            except CheckpointError as e:
                exports = sorted(f"{p.parent.parent.name}/{p.parent.name}"
                                 for p in RunLayout.of(cfg).geometries.glob("*/*/config.json"))  # fmt: skip
                if not exports:
                    raise
                raise StageError(f"steer.geometry={text} is not one of this run's exports ({exports}: give one as "
                                 f"<task>/<name>), and as a Hub repo: {e}") from e  # fmt: skip
        raise StageError(f"steer.geometry={given} holds no exported geometry (no config.json); give an export's "
                         f"folder, a Hub repo id (owner/name), or one of this run's geometries by name (e.g. gaga_out) "
                         f"or by task and name (e.g. weekdays/gaga_out).")  # fmt: skip
    geometries = RunLayout.of(cfg).geometries
    found = {p.parent: read_config(p.parent).get("meta") or {} for p in sorted(geometries.glob(f"*/{given.name}/config.json"))}
    holding = [f for f, meta in found.items() if target in ((meta.get("concepts") or {}).get("values") or [])]
    if len(holding) != 1:
        where = f"{len(holding)} of {[str(f) for f in found]}" if found else f"none under {geometries}"
        values = [v for meta in found.values() for v in (meta.get("concepts") or {}).get("values") or []]
        raise StageError(
            f"steer.geometry={given.name}, a geometry name of this run, names {where} with the concept {target!r}"
            + (f" (their tasks' values: {values[:24]})" if values and not holding else "")
            + ". Give an export's folder, a target of one of its tasks, or train it (`pipeline stage=train`)."
        )
    return trained_as(holding[0], given.name)


def trained_as(folder: Path, name: str) -> Path:
    """`folder`, a run's export asked for by its geometry `name`, when it holds the geometry trained as that name."""
    if (trained := (read_config(folder).get("meta") or {}).get("geometry")) != name:
        raise StageError(
            f"steer.geometry={name}: {folder} holds the geometry trained as '{trained}' (its config.json): export "
            f"folders were renamed or swapped. Move each export to the folder of the name it was trained as, or give "
            f"the export's folder as steer.geometry."
        )
    return folder


def safe(part: Any, most: int = 40) -> str:
    """A piece of a file name: what a folder name may hold, anything else replaced; one longer than `most` characters
    is cut, with a short hash of the whole, so that the name stays within the file system's 255 bytes."""
    text = re.sub(r"[^A-Za-z0-9_.=+-]", "_", str(part)).lstrip(".") or "_"
    return text if len(text) <= most else f"{text[: most - 9]}~{fingerprint(str(part))[:8]}"


def run(cfg: DictConfig) -> dict:
    """Steer `steer.prompt` toward `steer.target`; print and return the generations and q before and after."""
    s, target = cfg.steer, str(cfg.steer.target)
    prompt = str(s.prompt).replace("\\n", "\n")  # a typed \n is a newline: the task prompts end "?\nA:"
    if not prompt.strip():
        raise StageError('steer.prompt is empty; give the prompt to steer, e.g. steer.prompt="Q: What day is two '
                         'days after Monday?\\nA:".')  # fmt: skip
    folder = geometry_folder(cfg)
    check_product(folder, "Train it again (`pipeline stage=train`), or copy it again.")
    geometry = load_geometry(folder)
    warn_stale_needs(folder, geometry.meta, "stage=steer")
    if cfg.model.embedded:
        if not Path(cfg.model.pretrained).is_dir():
            raise StageError(
                f"the embedded LM {cfg.model.pretrained} is missing (moved, renamed or deleted), and {folder} was "
                f"trained on it. Put it back, or point model.pretrained at it."
            )
        check_product(Path(cfg.model.pretrained), "Train it again with `pipeline stage=lm overwrite=true`.")
    recorded, now = geometry.meta.get("lm_fingerprint") or "", lm_fingerprint(cfg.model) or ""
    if recorded and not now and (Path(str(cfg.model.pretrained)) / STAMP).is_file():
        as_embedded = lm_fingerprint({"pretrained": cfg.model.pretrained, "embedded": True})
        if as_embedded == recorded:
            raise StageError(
                f"{folder} was trained on the embedded LM at {cfg.model.pretrained}, which model.embedded=false reads as "
                f"an outside LM (one without a training record to check). Pass model.embedded=true."
            )
    warn_lm_config(cfg, "stage=steer")
    lm, tokenizer = load_lm(cfg.model)
    sketch = geometry.meta.get("lm_sketch")  # exports made before it was recorded carry none
    distance = None if sketch is None else sketch_distance(weight_sketch(lm), sketch)
    if recorded != now:  # another training of the LM, unless its weights are the ones the geometry was trained on
        if distance is None or distance > SKETCH_TOLERANCE:
            trained = geometry.meta.get("lm")
            if trained != cfg.model.name:  # another model altogether
                choice = f"model={trained}" if (CONFIG_DIR / "model" / f"{trained}.yaml").is_file() else "model=..."
                raise StageError(
                    f"{folder} was trained on the LM {trained!r} (from "
                    f"{lm_source(geometry.meta.get('lm_pretrained'), geometry.meta.get('lm_revision'))}), and this "
                    f"config steers {cfg.model.name!r} (from {lm_source(cfg.model.pretrained, cfg.model.revision)}). "
                    f"Steer the LM it was trained on ({choice}), or train a geometry on this one (`pipeline stage=all`)."
                )
            apart = "" if distance is None else f"; their weight sketches {distance:.2f} apart"
            raise StageError(
                f"{folder} was trained on another training of the LM (its fingerprint {recorded or 'none'}, the LM "
                f"at {cfg.model.pretrained} is {now or 'none'}{apart}): steering this LM with it would use another "
                f"LM's geometry. Train the geometry on this LM (`pipeline stage=all`), or point model.pretrained at "
                f"the LM it was trained on."
            )
        log.info("%s was trained on the LM of training record %s; the LM at %s (%s) has its weights (weight sketch "
                 "%.4f apart): steering it", folder, recorded or "none", cfg.model.pretrained,
                 f"training record {now}" if now else "no training record", distance)  # fmt: skip
    if (layer := geometry.meta.get("layer")) != cfg.model.layer:
        log.warning("%s was trained at block %s and steers there; model.layer=%s is not applied (train a geometry at "
                    "that block to steer it)", folder, layer, cfg.model.layer)  # fmt: skip
    if geometry.meta.get("lm") != cfg.model.name:
        log.warning("%s was trained on %r; steering %r (of the same shape)", folder, geometry.meta.get("lm"),
                    cfg.model.name)  # fmt: skip
    elif (
        distance is None
        and not now
        and (trained := lm_source(geometry.meta.get("lm_pretrained"), geometry.meta.get("lm_revision")))
        != (used := lm_source(cfg.model.pretrained, cfg.model.revision))
    ):  # with a sketch, Steering checks the weights
        log.warning("%s was trained on the LM from %s; steering the one from %s (same name and shape: check that they "
                    "are one model)", folder, trained, used)  # fmt: skip
    enc = tokenizer([prompt], return_tensors="pt")
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in enc.input_ids[0].tolist():
        words = [w for w in prompt.split() if tokenizer.unk_token_id in tokenizer.encode(w, add_special_tokens=False)]
        raise StageError(
            f"steer.prompt={prompt!r} has words the LM ({cfg.model.name}) has no token for ({words[:3]}): it would read them "
            f'all as one unknown token. Use the words of the tasks it was trained on (e.g. steer.prompt="Q: What '
            f'day is two days after Monday?\\nA:").'
        )
    limit, n = getattr(lm.config, "max_position_embeddings", None), enc.input_ids.shape[1]
    if limit and n + s.max_new_tokens > limit:
        raise StageError(
            f"steer.prompt ({n} tokens) and steer.max_new_tokens={s.max_new_tokens} need {n + s.max_new_tokens} "
            f"positions, but the LM ({cfg.model.name}) reads at most {limit} (its max_position_embeddings): "
            + (f"lower steer.max_new_tokens to {limit - n} or less." if n < limit else "shorten steer.prompt.")
        )

    def generate() -> str:
        out = lm.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)

    e = cfg.eval  # a GAGA's geodesic is the one stage=eval scores: solved with its settings (no other path has any)
    solver = {"steps": e.steps, "lam_rel": e.lam_rel, "max_iter": e.lbfgs.max_iter, "history_size": e.lbfgs.history_size}
    solver = solver if s.method == "geometry" and getattr(geometry, "family", None) == "gaga" else {}

    def steering(alpha: float) -> Steering:
        return Steering(lm, geometry, target, alpha, s.method, s.every_token, **solver)

    alpha = float(s.alpha)
    alphas = np.union1d(np.linspace(0.0, 1.0, s.figure_points), [alpha])  # the figure's grid, with α itself
    with torch.no_grad():
        plain = generate()
        with steering(alpha) as steered:
            moved = generate()
        q = []
        for a in alphas:
            with steering(float(a)):
                q.append(read_last_token(lm, enc.input_ids, enc.attention_mask, steered.layer,
                                         steered.concepts.variant_ids).q[0])  # fmt: skip
    q = torch.stack(q).numpy()  # (A, K+1)
    values = [*steered.concepts.values, "other"]
    at = int(np.flatnonzero(alphas == alpha)[0])
    task = (geometry.meta.get("task") or {}).get("name", folder.parent.name)
    root = RunLayout.of(cfg).root
    # all that makes the result, the parts the name shows too (`safe` maps several texts to one: Grün, Grön), as a
    # short hash, so names stay short: every steer setting, the solver's, the export (however named) and the model
    settings = {k: v for k, v in to_plain(s).items() if k != "geometry"}
    made_of = fingerprint({"steer": settings, "solver": solver, "geometry": str(folder.resolve()),
                           "model": cfg.model})[:8]  # fmt: skip
    trained_as = str(geometry.meta.get("geometry") or folder.name)
    name = "-".join(safe(p) for p in (task, trained_as, s.method, target, f"a{alpha!r}", made_of))
    top = lambda row: f"{values[int(row.argmax())]} {row.max():.2f}"  # noqa: E731
    log.info("steer %s toward %s with %s (α = %g):\n  unsteered: %r   q top %s\n  steered:   %r   q top %s, q[%s] %.2f → %.2f",
             folder, target, s.method, alpha, plain, top(q[0]), moved, top(q[at]), target,
             q[0][steered.target], q[at][steered.target])  # fmt: skip
    out = root / "steer"
    check_inside(root, out)
    figure(q, alphas, values, steered.target, f"{task}: {s.method} path of {trained_as} toward {target}",
           out / f"{name}.png")  # fmt: skip
    result = {
        "geometry": str(folder.resolve()), "method": s.method, "target": target, "alpha": alpha, "dtype": str(cfg.model.dtype),
        "solver": solver, "every_token": s.every_token, "max_new_tokens": s.max_new_tokens, "prompt": prompt,
        "unsteered": plain, "steered": moved,
        "q_before": dict(zip(values, q[0].round(4).tolist())), "q_after": dict(zip(values, q[at].round(4).tolist())),
        "figure": str(out / f"{name}.png"),
    }  # fmt: skip
    kept = {**result, "geometry": in_run(result["geometry"], root), "figure": in_run(result["figure"], root)}  # as a copy reads
    atomic_write_text(out / f"{name}.json", strict_json(kept, indent=1))
    return result


def figure(q: np.ndarray, alphas: np.ndarray, values: list[str], target: int, title: str, path: Path) -> None:
    """q of every concept (and "other") along α; the target's line is drawn bold."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
    for k, v in enumerate(values):
        ax.plot(alphas, q[:, k], lw=2.5 if k == target else 1, color="0.5" if v == "other" and k != target
                else colours(k % colours.N), label=v)  # fmt: skip
    ax.set(xlabel="α (fraction of the path)", ylabel="q", ylim=(0, 1), title=title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    put_in_place(tmp, path)
