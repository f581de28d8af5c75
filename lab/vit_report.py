"""The figure of a train_vit.py (or lab.vit_runs) job, drawn from its results.json: accuracy per task (the
linear probe and each method, mean ± std over seeds), each task's training loss curves, CoTo's p(t).

    python -m lab.vit_report runs/vit   # -> runs/vit/results.png
"""
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from coto import coto_prob
from lab import vit_runs
from lab.utils import seed_bars, seed_values


def plot_results(results: dict, cfg: vit_runs.Config, path) -> dict:
    """Bars of test accuracy per task (the probe, then each method's mean over seeds with one standard deviation
    as error bars), under them each task's training loss curves (mean over seeds of the logged records) above
    CoTo's p(t). Returns what it draws: {"rows", "acc", "err", "curves": {task: {method: (steps, loss)}}, "p"}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, tasks = results["runs"], list(results["probe"])
    methods, seeds = list(dict.fromkeys(r["method"] for r in runs)), sorted({r["seed"] for r in runs})
    rows = tasks + ["mean"] if len(tasks) > 1 else tasks
    probe = [[statistics.fmean(a for task, a in results["probe"].items() if row in ("mean", task))] for row in rows]
    values = {"linear probe": probe, **seed_values(runs, "task", lambda r: r["acc"], rows)}
    values = {name: [[100 * a for a in v] for v in vs] for name, vs in values.items()}  # accuracy in %

    def mean_curve(task, method):  # (logged steps, training loss at each, mean over seeds)
        hs = [r["history"] for r in runs if r["task"] == task and r["method"] == method]
        return [e["step"] for e in hs[0]], [statistics.fmean(e["loss"] for e in step) for step in zip(*hs)]

    curves = {task: {m: mean_curve(task, m) for m in methods} for task in tasks}
    with_coto = any(m.endswith("coto") for m in methods)
    p = (list(range(cfg.steps + 1)), [coto_prob(t, cfg.steps, cfg.p0, cfg.stage1_ratio, cfg.shape)
                                      for t in range(cfg.steps + 1)]) if with_coto else ([], [])
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}: mean ± std"
    fig = plt.figure(figsize=(max(9.0, 3.2 * len(tasks) + 1), 8.5 if with_coto else 7.0))
    grid = fig.add_gridspec(3 if with_coto else 2, len(tasks), height_ratios=[3, 2, 0.8][:3 if with_coto else 2])
    ax = fig.add_subplot(grid[0, :])
    acc, err, low, high = seed_bars(ax, rows, values, "{:.1f}")
    bottom = 5 * math.floor((low - 5) / 5) if low > 25 else 0
    ax.set_ylim(bottom, min(100, high) + 0.12 * (min(100, high) - bottom))
    ax.set_ylabel("test accuracy (%)" + (f"\naxis from {bottom}, not 0" if bottom else ""))
    ax.set_title(f"{cfg.dataset} ViT, LoRA r={cfg.r} on tasks {', '.join(tasks)}; {seed_text}", loc="left")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(acc), frameon=False, fontsize=8)
    for i, task in enumerate(tasks):
        lax = fig.add_subplot(grid[1, i])
        for m, (steps, loss) in curves[task].items():
            lax.plot(steps, loss, ".-", color=f"C{methods.index(m)}", label=m)
        lax.set_title(f"{task}: training loss" + (f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""), fontsize=9)
        lax.set_ylabel("train loss" if i == 0 else None)
        if i == 0:
            lax.legend(fontsize=8)
        if with_coto:
            pax = fig.add_subplot(grid[2, i], sharex=lax)
            pax.plot(*p, color=f"C{next(j for j, m in enumerate(methods) if m.endswith('coto'))}")
            pax.set_ylim(-0.05, 1.05)
            pax.set_ylabel("CoTo p(t)" if i == 0 else None)
            lax.tick_params(labelbottom=False)
            lax = pax
        lax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"rows": rows, "acc": acc, "err": err, "curves": curves, "p": p}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    path = Path(sys.argv[1]) / "results.json"
    try:
        results = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(vit_runs.Config)} - {"backbone"}  # the lab's fields too; a file of
        # train_vit.py's --backbone is refused by vit_runs.Config, and the figure does not need it
        cfg = vit_runs.Config(**{k: v for k, v in results["config"].items() if k in known})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"lab.vit_report: error: {path} is not a train_vit.py results.json ({e})")
    plot_results(results, cfg, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
