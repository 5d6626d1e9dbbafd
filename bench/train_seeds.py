"""The embedded default over seeds, from a `mars train --compare` directory.

    python bench/train_seeds.py COMPARE_DIR [--method grpo_mars] > bench/results/train_default.md

The `grpo_mars` runs of `--compare` are `mars train seed=S` runs (the default config, the
seed's own warm start): this prints, per seed, the held-out multi-source accuracy after the
warm start and at the end, the first evaluated step at >= 0.95, the per-category accuracy
at the end and the run's wall time, then the mean, standard deviation and range over the
seeds. Machine facts (CPU model, torch version, threads) come from this machine and the
runs' config.yaml: run it where the runs ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_dir")
    ap.add_argument("--method", default="grpo_mars")
    args = ap.parse_args()
    import torch
    import yaml

    from mars.bench.run import _cpu_name

    with open(os.path.join(args.compare_dir, "compare.json")) as f:
        summary = json.load(f)
    m = summary["methods"][args.method]
    rows, finals, starts, walls = [], [], [], []
    for seed in m["seeds"]:
        run = os.path.join(args.compare_dir, f"{args.method}_seed{seed}")
        with open(os.path.join(run, "metrics.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        with open(os.path.join(run, "summary.json")) as f:
            s = json.load(f)
        ev = [r for r in recs if "eval_acc_multi" in r]
        first = next((r["step"] for r in ev if r["eval_acc_multi"] >= summary["target"]), None)
        cats = {k.split("/", 1)[1]: v for k, v in s["final_eval"].items() if k.startswith("eval_acc_multi/")}
        finals.append(s["final_eval"]["eval_acc_multi"])
        starts.append(ev[0]["eval_acc_multi"])
        walls.append(s["wall_time_s"])
        rows.append(f"| {seed} | {ev[0]['eval_acc_multi']:.3f} | {finals[-1]:.3f} | {first if first is not None else '-'} | "
                    + ", ".join(f"{c} {v:.2f}" for c, v in sorted(cats.items())) + f" | {walls[-1]:.0f} |")
    with open(os.path.join(args.compare_dir, f"{args.method}_seed{m['seeds'][0]}", "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    n = len(finals)
    reached = sum(x >= summary["target"] for x in finals)
    sd = statistics.stdev(finals) if n > 1 else 0.0
    print(f"# `mars train` (the embedded default) over {n} seeds\n")
    print(f"The `{args.method}` runs of `mars train --compare compare.seeds={m['seeds']}` (each is `mars train "
          f"seed=S` with the default config). Machine: {_cpu_name()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {cfg['threads']} per run, {summary.get('workers', 1)} runs at a time; "
          f"{cfg['max_steps']} RL steps, held-out set of {cfg['task']['eval_per_category']} prompts per category, "
          f"greedy.\n")
    print(f"**{reached} of {n} seeds** end at held-out multi-source accuracy >= {summary['target']}; final accuracy "
          f"mean {statistics.mean(finals):.3f}, sd {sd:.3f}, range {min(finals):.3f}-{max(finals):.3f} "
          f"(after the warm start: mean {statistics.mean(starts):.3f}). Wall time per run (two runs sharing the "
          f"2 cores): median {statistics.median(walls):.0f} s.\n")
    print("| seed | held-out multi acc. after the warm start | at the end | first step >= "
          f"{summary['target']} | per category at the end | wall (s) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
