"""Time per RL step and per phase of ``mars train`` (the embedded default) with 1 and with
N CPU processes (``torchrun --nproc_per_node N``, gloo), one torch thread per process.

    python bench/train_distributed.py                      # 1, 2, 1, 2 processes, 8 RL steps each
    python bench/train_distributed.py --steps 12 --nprocs 1 2 4 --repeats 3

Writes ``bench/results/train_distributed.json`` (device, versions, threads, load average at
the start and the end, per run the medians of every ``time_*`` key of metrics.jsonl over
steps 2..N: step 1 pays one-off costs) and ``train_distributed.md`` (the same as tables).
Under torchrun the logged times are the slowest rank's (``reduce_metrics``: max). The
process counts are run ``--repeats`` times, interleaved (1, 2, 1, 2, ...), so that a
change of the machine's load shows up as a spread between repeats instead of as a
difference between process counts; each run records the 1-minute load at its start / end.

The run is the embedded default (``mars train`` with no arguments: warm start of 300
steps, 16 prompts x (8 rollouts + 2 anchors) a step) cut to ``--steps`` RL steps, without
the held-out evaluation (``data.eval=null``: it is not part of a step's time) and with the
plot drawn once. The prompts of a step are split over the processes, so each rank
generates and trains on 16 / N of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("time_generate", "time_reward", "time_advantage", "time_old_logp", "time_update", "time_step")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def _device() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "cuda": torch.cuda.is_available()}


def _versions() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "mars"]).returncode != 0
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mars_commit": commit or None,
            "mars_uncommitted_changes": dirty}


def run(nproc: int, steps: int, out_dir: str, extra: list[str]) -> dict:
    """One ``mars train`` run with ``nproc`` processes; its medians per phase."""
    args = [f"output_dir={out_dir}", f"max_steps={steps}", "data.eval=null", "log.progress=false",
            "log.plot_every=0", "model.device=cpu", "threads=1", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "mars", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "mars", "train", *args]
    load_start = os.getloadavg()
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    rl = [r for r in recs if r["step"] >= 2]
    med = {k: statistics.median(r[k] for r in rl) for k in PHASES if all(k in r for r in rl)}
    shown = ["output_dir=OUT", *args[1:]]  # the run directory is a temporary one
    return {"processes": nproc, "command": " ".join(["mars train" if nproc == 1 else
                                                     f"torchrun --nproc_per_node {nproc} -m mars train", *shown]),
            "wall_time_s": wall, "warmup_time_s": recs[0].get("warmup_time_s"), "rl_steps": len(recs) - 1,
            "steps_in_median": [r["step"] for r in rl], "median_s": med,
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rl),
            "rollouts_per_step": rl[0]["rollouts"], "anchors_per_step": rl[0]["anchors"],
            "load_1min_start": load_start[0], "load_1min_end": os.getloadavg()[0]}


def _spread(runs: list, n: int) -> float:
    t = [r["median_s"]["time_step"] for r in runs if r["processes"] == n]
    return max(t) / min(t)


def markdown(res: dict) -> str:
    runs = res["runs"]
    lines = ["# `mars train` data parallel on CPU: 1 vs N processes (gloo)", "",
             f"Produced by `python bench/train_distributed.py` (mars {res['versions']['mars_commit']}, torch "
             f"{res['versions']['torch']}, transformers {res['versions']['transformers']}, Python "
             f"{res['versions']['python']}) on {res['device']['cpu']} ({res['device']['logical_cpus']} logical "
             f"CPUs), `OMP_NUM_THREADS=1` and `threads=1`: one torch thread per process.", "",
             f"Load (`uptime`) at the start: `{res['load_start']}`; at the end: `{res['load_end']}`. "
             "The CPU is shared with other jobs: the numbers are what this machine gave at that load, not a "
             "clean scaling measurement.", "",
             "The embedded default (16 prompts x (8 rollouts + 2 anchors) per step, warm start of 300 steps), "
             f"{runs[0]['rl_steps']} RL steps, no held-out evaluation. Median over steps "
             f"{runs[0]['steps_in_median'][0]}-{runs[0]['steps_in_median'][-1]} (step 1 pays one-off costs); "
             "under torchrun each phase is the slowest rank's time.", "",
             "| processes | repeat | generate | reward | advantage | old_logp | update | step | tokens/s | "
             "rollouts/s | warm start | wall | load 1 min (start / end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["median_s"]
        lines.append(f"| {r['processes']} | {r['repeat']} | "
                     + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in PHASES)
                     + f" | {r['median_tokens_per_s']:.0f} | {r['rollouts_per_step'] / m['time_step']:.0f} | "
                       f"{r['warmup_time_s']:.1f} s | {r['wall_time_s']:.1f} s | "
                       f"{r['load_1min_start']:.2f} / {r['load_1min_end']:.2f} |")
    step = res["median_step_s"]
    n0 = runs[0]["processes"]
    lines += ["", "Median step time over the repeats: " + ", ".join(
        f"{n} process(es) {t:.3f} s ({t / step[str(n0)]:.2f}x)" for n, t in step.items()) + ". Spread between "
        "the repeats of one process count (slowest / fastest step time): " + ", ".join(
        f"{n}: {_spread(runs, int(n)):.2f}x" for n in step) + "; a difference between process counts smaller "
        "than that spread is the machine's load, not data parallelism.", "",
        "Reading the table: under torchrun `reward` also holds the wait at the step's first collective "
        "(rank 0 gathering the other ranks' reward errors), so it absorbs the ranks' generation imbalance; "
        "`update` holds the gradient all-reduce. The warm start is not data parallel: every rank runs the "
        "same one, so with more processes than free cores it takes longer. With N processes on N busy cores "
        "no speed-up is possible; what the table shows is the cost of the collectives and of sharing.", "",
        "Commands:", ""] + [f"    {c}" for c in dict.fromkeys(r["command"] for r in runs)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="RL steps per run (the median skips step 1)")
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2], help="process counts (the first: baseline)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each process count, interleaved")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "train_distributed"),
                    help="output path without extension (.json and .md are written)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides of mars train")
    a = ap.parse_args(argv)
    res = {"device": _device(), "versions": _versions(), "torch_threads_per_process": 1,
           "omp_num_threads": 1, "load_start": _uptime(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for n in a.nprocs:
                r = run(n, a.steps, os.path.join(tmp, f"np{n}_r{i}"), a.overrides)
                res["runs"].append({"repeat": i + 1, **r})
                print(f"{n} process(es), repeat {i + 1}: median step {r['median_s']['time_step']:.3f} s", flush=True)
    res["load_end"] = _uptime()
    res["median_step_s"] = {str(n): statistics.median(r["median_s"]["time_step"] for r in res["runs"]
                                                      if r["processes"] == n) for n in a.nprocs}
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
