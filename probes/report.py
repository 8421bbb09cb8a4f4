"""The study report: V-WALT against I-WALT per task, with the intervals that say whether a gap is real.

`write_report(out_dir, results)` turns the study's collected results (a JSON-ready dict, below)
into `report.md`, `results.json` and PNG figures. It only reads numbers; it never trains.

results = {
  "preset": {...}, "environment": {...}, "stages": {stage: {"seconds": s}},
  "main": {task: {feature set: fit result}},       # probes.fit.fit results at the main (t, block)
  "noise_sweep": {task: {model: {t: score}}}, "block_sweep": {task: {model: {block: score}}},
  "budget_sweep": {task: {model: {step: score}}}, "budget_loss": {model: {step: loss}},
  "diffusion_loss": {model: {"trained": x, "untrained": y}}, "tokens_per_step": {model: n},
  "curves": {run: {"step": [...], "loss": [...]}}, "images": {caption: relative path},
}

How a gap is judged (the paper reports neither): per test clip, the primary metric averaged over
readout seeds; V relative to I as V/I for higher-is-better metrics and I/V for errors, in %, with
a 95% paired bootstrap interval over test clips. A gap counts only when that interval excludes
100% *and* the difference of the seed means exceeds the sum of the two seed standard deviations.
"""
from __future__ import annotations

import json
import os

import numpy as np

MODELS = ("iwalt", "vwalt")
LABEL = {"iwalt": "I-WALT", "vwalt": "V-WALT", "random_iwalt": "I untrained", "random_vwalt": "V untrained",
         "latents_iwalt": "I latents", "latents_vwalt": "V latents"}
MOTION_TASKS = ("motion", "point_tracking", "camera_pose")


def relative_gap(v_clip, i_clip, higher_is_better: bool, n_boot: int = 2000, seed: int = 0):
    """(V relative to I in %, 2.5th and 97.5th percentile of a paired bootstrap over clips).

    v_clip, i_clip: (N,) per-clip values of the same test clips. Ratio of means: V/I when higher
    is better, I/V for errors, so > 100% always means V-WALT is better."""
    v, i = np.asarray(v_clip, np.float64), np.asarray(i_clip, np.float64)
    keep = np.isfinite(v) & np.isfinite(i)
    v, i = v[keep], i[keep]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")

    def ratio(a, b):
        num, den = (a, b) if higher_is_better else (b, a)
        return 100.0 * num / den if den != 0 else float("nan")

    point = ratio(v.mean(), i.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    boots = np.array([ratio(a, b) for a, b in zip(v[idx].mean(1), i[idx].mean(1))])
    boots = boots[np.isfinite(boots)]
    if len(boots) == 0:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def per_clip_mean(fit_result) -> np.ndarray:
    """The primary metric per test clip, averaged over readout seeds."""
    rows = np.array([fit_result["test_per_clip"][s] for s in sorted(fit_result["test_per_clip"])], np.float64)
    with np.errstate(invalid="ignore"):
        return np.nanmean(rows, axis=0) if rows.size else rows


def seed_stats(fit_result):
    """(mean, std) of the primary metric over readout seeds."""
    p = fit_result["primary"]
    vals = [fit_result["test"]["per_seed"][s][p] for s in fit_result["test"]["per_seed"]]
    return float(np.mean(vals)), float(np.std(vals))


def verdict(v_fit, i_fit):
    """The comparison row of one task: scores, the gap and its interval, and whether it counts."""
    hib = v_fit["higher_is_better"]
    (vm, vs), (im, is_) = seed_stats(v_fit), seed_stats(i_fit)
    point, lo, hi = relative_gap(per_clip_mean(v_fit), per_clip_mean(i_fit), hib)
    beats_seeds = abs(vm - im) > vs + is_
    if np.isfinite(lo) and lo > 100 and beats_seeds:
        call = "V-WALT better"
    elif np.isfinite(hi) and hi < 100 and beats_seeds:
        call = "I-WALT better"
    else:
        call = "no clear difference"
    return {"metric": v_fit["primary"], "higher_is_better": hib, "iwalt": im, "iwalt_std": is_, "vwalt": vm,
            "vwalt_std": vs, "v_rel_i": point, "ci_low": lo, "ci_high": hi, "beats_seed_spread": bool(beats_seeds),
            "verdict": call}


def _fmt(x, std=None):
    if x is None or not np.isfinite(x):
        return "–"
    s = f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return s if std is None else f"{s} ± {std:.3f}"


def _yn(x):
    return "–" if x is None else "yes" if x else "no"


def _pct(x):
    return f"{x:.1f}%" if x is not None and np.isfinite(x) else "–"


def beats_controls(fits, model):
    """Whether `model`'s score beats both of its controls (its untrained network and its autoencoder
    latents) by more than the seed spreads: None when a control is missing."""
    controls = [fits.get(f"{kind}_{model}") for kind in ("random", "latents")]
    if any(c is None for c in controls) or model not in fits:
        return None
    m, s = seed_stats(fits[model])
    sign = 1.0 if fits[model]["higher_is_better"] else -1.0
    return all(sign * (m - cm) > s + cs for cm, cs in (seed_stats(c) for c in controls))


def compare(results):
    """{task: verdict row} for the tasks both models were probed on."""
    rows = {}
    for task, fits in results["main"].items():
        if all(m in fits for m in MODELS):
            rows[task] = verdict(fits["vwalt"], fits["iwalt"])
            rows[task].update({f"{m}_beats_controls": beats_controls(fits, m) for m in MODELS})
    return rows


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(rows, path):
    plt = _plt()
    tasks = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks)), 3.6))
    x = np.arange(len(tasks))
    ax.bar(x - 0.2, [100] * len(tasks), 0.4, label="I-WALT", color="#9aa7b8")
    vals = np.array([rows[t]["v_rel_i"] for t in tasks])
    err = np.array([[rows[t]["v_rel_i"] - rows[t]["ci_low"], rows[t]["ci_high"] - rows[t]["v_rel_i"]] for t in tasks]).T
    ax.bar(x + 0.2, vals, 0.4, yerr=np.nan_to_num(err), capsize=3, label="V-WALT (95% bootstrap CI)", color="#d2691e")
    ax.axhline(100, color="k", lw=0.8)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("relative to I-WALT (%)")
    ax.set_title("V-WALT vs I-WALT (higher is better; error metrics inverted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_plot(sweep, xlabel, path, title):
    plt = _plt()
    tasks = list(sweep)
    cols = 3
    rows_ = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(4 * cols, 2.8 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for model, color in (("iwalt", "#5b6f8a"), ("vwalt", "#d2691e")):
            pts = sorted((float(k), v) for k, v in sweep[task].get(model, {}).items())
            if pts:
                ax.plot(*zip(*pts), "o-", color=color, label=LABEL[model])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_plot(curves, path):
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 2.8), squeeze=False)
    for ax, (run, c) in zip(axes.flat, curves.items()):
        ax.plot(c["step"], c["loss"], lw=1)
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report
def write_report(out_dir: str, results: dict) -> str:
    figs = os.path.join(out_dir, "figures")
    os.makedirs(figs, exist_ok=True)
    rows = compare(results)
    results = {**results, "comparison": rows}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    if rows:
        bar_chart(rows, os.path.join(figs, "v_vs_i.png"))
    for name, xlabel, title in (("noise_sweep", "timestep t", "probe quality vs noise level (main block)"),
                                ("block_sweep", "block (0-based)", "probe quality vs depth (t = main)"),
                                ("budget_sweep", "training step", "probe quality vs training budget")):
        if results.get(name):
            sweep_plot(results[name], xlabel, os.path.join(figs, f"{name}.png"), title)
    if results.get("curves"):
        curves_plot(results["curves"], os.path.join(figs, "training_curves.png"))

    p, env = results["preset"], results.get("environment", {})
    lines = [f"# V-WALT vs I-WALT: the `{p['name']}` study", ""]
    lines += [f"{p['about']}.", ""]
    lines += _summary(rows)
    lines += ["## Per task (test split, main block %d, t = %d)" % (p["main_block"], p["main_t"]), ""]
    lines += ["| task | metric | I-WALT | V-WALT | V rel. I | 95% CI | beats seed spread | verdict | above controls (I / V) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for task, r in rows.items():
        arrow = "↑" if r["higher_is_better"] else "↓"
        lines.append(f"| {task} | {r['metric']} {arrow} | {_fmt(r['iwalt'], r['iwalt_std'])} | "
                     f"{_fmt(r['vwalt'], r['vwalt_std'])} | {_pct(r['v_rel_i'])} | "
                     f"{_pct(r['ci_low'])} – {_pct(r['ci_high'])} | {'yes' if r['beats_seed_spread'] else 'no'} | "
                     f"{r['verdict']} | {_yn(r.get('iwalt_beats_controls'))} / {_yn(r.get('vwalt_beats_controls'))} |")
    lines += ["", "Scores are the mean ± standard deviation over %d readout seeds; V rel. I is V/I for "
              "higher-is-better metrics and I/V for errors (above 100%% = V-WALT better), with a 95%% paired "
              "bootstrap interval over test clips. A gap counts only when the interval excludes 100%% and the "
              "difference exceeds the two seed spreads together. Above controls: the model's score beats both its "
              "untrained network and its autoencoder latents by more than the seed spreads." % len(p["seeds"]), ""]
    if rows:
        lines += ["![V-WALT relative to I-WALT](figures/v_vs_i.png)", ""]
    lines += _controls(results)
    for name, caption in (("noise_sweep", "Noise sweep"), ("block_sweep", "Block sweep"),
                          ("budget_sweep", "Training-budget sweep")):
        if results.get(name):
            lines += [f"## {caption}", "", f"![{caption}](figures/{name}.png)", ""]
            if name == "budget_sweep" and results.get("budget_loss"):
                lines += ["Diffusion loss on val clips (fixed noise) of the kept snapshots: " + "; ".join(
                    f"{LABEL[m]}: " + ", ".join(f"step {s}: {v:.4f}" for s, v in sorted(d.items(), key=lambda kv: int(kv[0])))
                    for m, d in results["budget_loss"].items()), ""]
    lines += _training(results)
    for caption, rel in results.get("images", {}).items():
        lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]
    lines += ["## Environment and wall time", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- stage `{k}`: {v['seconds']:.0f} s" for k, v in results.get("stages", {}).items()]
    total = sum(v["seconds"] for v in results.get("stages", {}).values())
    lines += [f"- total: {total / 60:.1f} min", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _summary(rows):
    if not rows:
        return ["No task was probed on both models.", ""]
    better = [t for t, r in rows.items() if r["verdict"] == "V-WALT better"]
    worse = [t for t, r in rows.items() if r["verdict"] == "I-WALT better"]
    unclear = [t for t, r in rows.items() if r["verdict"] == "no clear difference"]
    out = ["## Answer", ""]
    out.append(f"- V-WALT's features are better on: {', '.join(better) or 'no task'}.")
    out.append(f"- I-WALT's features are better on: {', '.join(worse) or 'no task'}.")
    out.append(f"- No difference beyond seed spread and the bootstrap interval: {', '.join(unclear) or 'no task'}.")
    idle = [t for t, r in rows.items() if r.get("vwalt_beats_controls") is False and r.get("iwalt_beats_controls") is False]
    if idle:
        out.append(f"- Neither model's features beat its own untrained network and autoencoder latents on: "
                   f"{', '.join(idle)}. There the readout finds nothing diffusion training added, so a V-vs-I "
                   "verdict on these tasks says nothing about what diffusion learned.")
    motion = [t for t in MOTION_TASKS if t in rows]
    lost = [t for t in motion if rows[t]["verdict"] != "V-WALT better"]
    if lost:
        out.append(f"- On the motion-centred tasks the paper's gap is **not reproduced** here for: {', '.join(lost)}.")
    out.append("")
    return out


def _controls(results):
    main = results["main"]
    sets = [s for s in ("iwalt", "vwalt", "random_iwalt", "random_vwalt", "latents_iwalt", "latents_vwalt")
            if any(s in fits for fits in main.values())]
    if not any(s.startswith(("random", "latents")) for s in sets):
        return []
    out = ["## Controls: what diffusion training added", "",
           "| task | metric | " + " | ".join(LABEL[s] for s in sets) + " |", "|---|---|" + "---|" * len(sets)]
    for task, fits in main.items():
        metric = next(iter(fits.values()))["primary"]
        cells = [_fmt(*seed_stats(fits[s])) if s in fits else "–" for s in sets]
        out.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    out += ["", "Untrained: the same architecture with the run's initial weights (same block and t). "
            "Latents: the autoencoder's latents as each mode sees the clip.", ""]
    return out


def _training(results):
    out = ["## Training", ""]
    loss = results.get("diffusion_loss", {})
    for m, d in loss.items():
        out.append(f"- {LABEL[m]}: diffusion loss on val clips {d['trained']:.4f} trained vs {d['untrained']:.4f} "
                   f"untrained ({100 * (1 - d['trained'] / d['untrained']):.0f}% lower).")
    for m, n in results.get("tokens_per_step", {}).items():
        out.append(f"- {LABEL[m]}: {n} latent tokens per step.")
    if results.get("curves"):
        out += ["", "![training curves](figures/training_curves.png)"]
    out.append("")
    return out
