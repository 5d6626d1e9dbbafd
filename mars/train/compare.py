"""``mars train --compare``: GRPO and GRPO+MARS on the same seeds, one plot, one table.

Every seed runs twice from the same config: rollout.mono = "none" (GRPO: the plain group
z-score) and the config's anchors (GRPO+MARS; "duplicate" when the config says "none").
Both runs of a seed start from the same weights, see the same prompts in the same order
and differ only in the advantage (and in generating the anchors). Output under OUTPUT_DIR:
``{grpo,mars}_seed{S}/`` (each a full run), ``compare.png`` (reward curves, held-out
accuracy multi-source and per single source), ``compare.json`` and ``compare.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass

from .config import TrainConfig, save_config

__all__ = ["run_compare", "CompareResult", "METHODS"]

METHODS = ("grpo", "mars")
PHASES = ("time_generate", "time_reward", "time_advantage", "time_old_logp", "time_update", "time_step")


@dataclass
class CompareResult:
    output_dir: str
    plot_path: str | None
    summary_path: str
    table: str
    summary: dict


def _method_config(cfg: TrainConfig, method: str, seed: int, output_dir: str) -> TrainConfig:
    mono = "none" if method == "grpo" else (cfg.rollout.mono if cfg.rollout.mono != "none" else "duplicate")
    return dataclasses.replace(cfg, seed=seed, output_dir=os.path.join(output_dir, f"{method}_seed{seed}"),
                               rollout=dataclasses.replace(cfg.rollout, mono=mono))


def run_compare(cfg: TrainConfig, output_dir: str | None = None) -> CompareResult:
    """Run both methods on cfg.compare.seeds (seed-major order) and summarise."""
    from .loop import train

    out_dir = output_dir or cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    cache: dict = {}  # the warm start of a seed is shared by both methods
    for seed in cfg.compare.seeds:
        cache.clear()
        for method in METHODS:
            t = time.perf_counter()
            res = train(_method_config(cfg, method, seed, out_dir), warm_start_cache=cache)
            steps = [r for r in res.records if r.get("step", 0) >= 1]
            runs[method].append({"seed": seed, "output_dir": res.output_dir, "wall_time_s": time.perf_counter() - t,
                                 "records": res.records, "final_eval": res.final_eval,
                                 "median_step_time_s": statistics.median(r["time_step"] for r in steps)
                                 if steps else None})
    summary = summarise(runs)
    summary["seeds"] = list(cfg.compare.seeds)
    summary["max_steps"] = cfg.max_steps
    if cfg.data.train == "embedded":
        from .task import SOURCES

        summary["source_names"] = list(SOURCES)
    summary_path = os.path.join(out_dir, "compare.json")
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    table = format_table(summary)
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(f"# mars train --compare\n\nseeds {cfg.compare.seeds}, {cfg.max_steps} RL steps each\n\n{table}\n")
    plot = plot_compare(runs, os.path.join(out_dir, "compare.png"), cfg)
    return CompareResult(out_dir, plot, summary_path, table, summary)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(runs: dict) -> dict:
    """Per method: final held-out accuracies (mean and per seed), reward of the last 20
    steps, median step time; and the MARS - GRPO differences."""
    out: dict = {"methods": {}}
    for method, rs in runs.items():
        keys = sorted({k for r in rs for k in r["final_eval"]})
        m = {"seeds": [r["seed"] for r in rs],
             "final_eval": {k: _mean(r["final_eval"].get(k) for r in rs) for k in keys},
             "final_eval_per_seed": {k: [r["final_eval"].get(k) for r in rs] for k in keys},
             "reward_multi_last20": _mean(_mean(x["reward_multi"] for x in _steps(r)[-20:]) for r in rs),
             "median_step_time_s": _mean(r["median_step_time_s"] for r in rs),
             "median_phase_time_s": {k: _mean(statistics.median(x[k] for x in _steps(r)) if _steps(r) else None
                                              for r in rs) for k in PHASES},
             "wall_time_s": sum(r["wall_time_s"] for r in rs)}
        out["methods"][method] = m
    if all(m in out["methods"] for m in METHODS):
        g, a = out["methods"]["grpo"], out["methods"]["mars"]
        out["mars_minus_grpo"] = {k: a["final_eval"][k] - g["final_eval"][k]
                                  for k in g["final_eval"] if a["final_eval"].get(k) is not None
                                  and g["final_eval"][k] is not None}
        if g["median_step_time_s"] and a["median_step_time_s"]:
            out["step_time_ratio_mars_over_grpo"] = a["median_step_time_s"] / g["median_step_time_s"]
    return out


def _steps(run):
    return [r for r in run["records"] if r.get("step", 0) >= 1]


def format_table(summary: dict) -> str:
    ms = summary["methods"]
    keys = [k for k in next(iter(ms.values()))["final_eval"] if "/" not in k]
    cats = sorted({k.split("/", 1)[1] for m in ms.values() for k in m["final_eval"] if "/" in k})
    head = "| held-out accuracy | " + " | ".join(ms) + (" | MARS - GRPO |" if "mars_minus_grpo" in summary else " |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def row(k, label):
        vals = [ms[m]["final_eval"].get(k) for m in ms]
        cells = [("-" if v is None else f"{v:.3f}") for v in vals]
        per = [ms[m]["final_eval_per_seed"].get(k, []) for m in ms]
        cells = [f"{c} ({', '.join('-' if x is None else f'{x:.2f}' for x in p)})" for c, p in zip(cells, per)]
        d = summary.get("mars_minus_grpo", {}).get(k)
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {d:+.3f} |" if d is not None else " | |"))

    names = summary.get("source_names") or []
    for k in keys:
        label = k.replace("eval_acc_", "")
        if label.startswith("source_"):
            i = int(label.split("_")[1])
            label = f"{names[i] if i < len(names) else f'source {i}'} only"
        row(k, label)
    for c in cats:
        row(f"eval_acc_multi/{c}", f"multi, {c}")
    lines.append("")
    lines.append("| | " + " | ".join(ms) + " |")
    lines.append("|---" * (len(ms) + 1) + "|")
    lines.append("| reward (last 20 steps) | " + " | ".join(f"{ms[m]['reward_multi_last20']:.3f}" for m in ms) + " |")
    lines.append("")
    lines.append("| median time per step (s) | " + " | ".join(ms) + " |")
    lines.append("|---" * (len(ms) + 1) + "|")
    for k in PHASES:
        lines.append(f"| {k[5:]} | " + " | ".join(f"{ms[m]['median_phase_time_s'][k]:.4f}" for m in ms) + " |")
    if "step_time_ratio_mars_over_grpo" in summary:
        lines.append(f"\nMARS / GRPO median step time: {summary['step_time_ratio_mars_over_grpo']:.3f}")
    lines.append("\n(per-seed values in parentheses)")
    return "\n".join(lines)


def plot_compare(runs: dict, path: str, cfg: TrainConfig) -> str | None:
    """Left: multi reward per step (mean over seeds, 10-step mean; band min..max over
    seeds) of each method. Right: final held-out accuracy, multi-source and each single
    source, per method (bars: mean over seeds; dots: seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .logger import rolling
    from .task import SOURCES

    colors = {"grpo": "tab:blue", "mars": "tab:red"}
    labels = {"grpo": "GRPO", "mars": "GRPO+MARS"}
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.3, 1, 1.3]})
    for m, rs in runs.items():
        curves = [rolling([x["reward_multi"] for x in _steps(r)], 10) for r in rs]
        n = min(len(c) for c in curves)
        if not n:
            continue
        x = list(range(1, n + 1))
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        a0.plot(x, mean, color=colors[m], label=f"{labels[m]} (mean of {len(curves)} seeds)")
        a0.fill_between(x, [min(c[i] for c in curves) for i in range(n)],
                        [max(c[i] for c in curves) for i in range(n)], color=colors[m], alpha=0.15)
    a0.set_xlabel("RL step")
    a0.set_title("training reward of the multi-source rollouts (10-step mean)")
    a0.legend()
    names = list(SOURCES) if cfg.data.train == "embedded" else ["source 0", "source 1"]
    keys = ["eval_acc_multi", "eval_acc_source_0", "eval_acc_source_1"]
    xt = ["multi-source", f"{names[0]} only", f"{names[1]} only"]
    width = 0.38
    for j, m in enumerate(runs):
        for i, k in enumerate(keys):
            vals = [r["final_eval"].get(k) for r in runs[m] if r["final_eval"].get(k) is not None]
            if not vals:
                continue
            xpos = i + (j - 0.5) * width
            a1.bar(xpos, sum(vals) / len(vals), width, color=colors[m], alpha=0.7,
                   label=labels[m] if i == 0 else None)
            a1.scatter([xpos] * len(vals), vals, color="k", s=10, zorder=3)
    a1.set_xticks(range(len(keys)), xt)
    a1.set_ylim(0, 1.05)
    a1.set_title("held-out accuracy at the end (greedy)")
    a1.legend()
    cats = sorted({k.split("/", 1)[1] for rs in runs.values() for r in rs for k in r["final_eval"] if "/" in k})
    for j, m in enumerate(runs):
        for i, c in enumerate(cats):
            vals = [r["final_eval"].get(f"eval_acc_multi/{c}") for r in runs[m]]
            vals = [v for v in vals if v is not None]
            if vals:
                xpos = i + (j - 0.5) * width
                a2.bar(xpos, sum(vals) / len(vals), width, color=colors[m], alpha=0.7,
                       label=labels[m] if i == 0 else None)
                a2.scatter([xpos] * len(vals), vals, color="k", s=10, zorder=3)
    if cats:
        a2.set_xticks(range(len(cats)), [c.replace("_", "\n") for c in cats])
        a2.set_ylim(0, 1.05)
        a2.set_title("held-out multi-source accuracy per scene category")
        a2.legend(loc="lower center")
    fig.suptitle(f"GRPO vs GRPO+MARS, seeds {[r['seed'] for r in next(iter(runs.values()))]}, "
                 f"{cfg.max_steps} RL steps, G = {cfg.rollout.n}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
