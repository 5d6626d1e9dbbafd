"""``mars train --compare``: does MARS help? Paired runs, differences with 95% intervals.

Methods (``compare.methods``), each the config with only these keys changed:

| method      | rollout.mono                      | algorithm.dynamic_sampling | loss.clip_high |
|-------------|-----------------------------------|----------------------------|----------------|
| `grpo`      | none                              | false                      | the config's   |
| `grpo_mars` | the config's (duplicate if none)  | false                      | the config's   |
| `dapo`      | none                              | true (on the group std)    | 0.28           |
| `dapo_mars` | the config's (duplicate if none)  | true (on the pooled std)   | 0.28           |

Every seed of ``compare.seeds`` runs every method from the same warm start (computed once
per seed), on the same prompt stream, with the same hyper-parameters: a pair (``grpo`` vs
``grpo_mars``, ``dapo`` vs ``dapo_mars``) differs only in the anchors. Per pair and seed,
the difference (method with anchors minus baseline) of the final held-out multi-source
accuracy and of the area under its accuracy curve (mean accuracy over the evaluated steps)
is summarised by :func:`mars.train.stats.paired_difference` (mean, t and paired-bootstrap
95% intervals, wins / losses / ties), with the RL steps to reach ``compare.target``.

``compare.workers`` (0: one per ``threads`` CPU cores, 1 on a GPU) runs that many seeds at
once in worker processes (each run keeps ``threads`` torch threads; the numbers of a run do
not depend on where it ran).

Output under OUTPUT_DIR: ``{method}_seed{S}/`` (each a full run), ``compare.json`` (every
number, per seed too), ``compare.md`` (the tables) and ``compare.png`` (curves with 95%
bands, per-category accuracy with per-seed dots, the paired differences with their
intervals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass

from . import stats
from .config import COMPARE_METHODS, TrainConfig, save_config

__all__ = ["run_compare", "CompareResult", "METHODS", "PAIRS", "method_config", "summarise", "format_table",
           "load_runs", "write_report"]

METHODS = COMPARE_METHODS
PAIRS = (("grpo", "grpo_mars"), ("dapo", "dapo_mars"))
LABELS = {"grpo": "GRPO", "grpo_mars": "GRPO+MARS", "dapo": "DAPO", "dapo_mars": "DAPO+MARS"}
DAPO_CLIP_HIGH = 0.28
PHASES = ("time_generate", "time_reward", "time_advantage", "time_old_logp", "time_update", "time_step")


@dataclass
class CompareResult:
    output_dir: str
    plot_path: str | None
    summary_path: str
    table: str
    summary: dict


def method_config(cfg: TrainConfig, method: str, seed: int, output_dir: str) -> TrainConfig:
    """``cfg`` for one run of ``method`` on ``seed`` (the table of the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"compare.methods: unknown method {method!r}; known: {', '.join(METHODS)}")
    anchors = method.endswith("_mars")
    mono = (cfg.rollout.mono if cfg.rollout.mono != "none" else "duplicate") if anchors else "none"
    dapo = method.startswith("dapo")
    return dataclasses.replace(
        cfg, seed=seed, output_dir=os.path.join(output_dir, f"{method}_seed{seed}"),
        rollout=dataclasses.replace(cfg.rollout, mono=mono),
        algorithm=dataclasses.replace(cfg.algorithm, dynamic_sampling=dapo),
        loss=dataclasses.replace(cfg.loss, clip_high=DAPO_CLIP_HIGH if dapo else cfg.loss.clip_high))


def compare_workers(cfg: TrainConfig) -> int:
    """compare.workers, with 0 (auto): one per ``threads`` CPU cores on a CPU run, 1 when
    the model goes to a GPU (the runs would share it)."""
    if cfg.compare.workers:
        return cfg.compare.workers
    from .policy import resolve_device

    if resolve_device(cfg.model.device).type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // max(cfg.threads, 1))


def _run_seed(cfg: TrainConfig, seed: int, methods, out_dir: str, quiet: bool, overwrite: bool = False) -> list[dict]:
    """Every method on one seed (sharing the seed's warm start); the runs' summaries. In a
    worker process (quiet) a stop signal ends the seed with {"interrupted": signum,
    "output_dir": ...} instead of an exception (Interrupted does not cross processes)."""
    from .faults import Interrupted
    from .loop import train

    cache: dict = {}
    out = []
    for method in methods:
        c = method_config(cfg, method, seed, out_dir)
        if quiet:
            c = dataclasses.replace(c, log=dataclasses.replace(c.log, progress=False))
            if _WORKER_STOP:  # signalled between runs: start nothing more
                return [{"interrupted": _WORKER_STOP[0], "output_dir": c.output_dir}]
        t = time.perf_counter()
        try:
            res = train(c, warm_start_cache=cache, overwrite=overwrite)
        except Interrupted as exc:
            if not quiet:
                raise
            _WORKER_STOP.append(exc.signum)  # a seed queued to this worker will not start
            return [{"interrupted": exc.signum, "output_dir": c.output_dir}]
        out.append(_run_summary(method, seed, res, time.perf_counter() - t))
    return out


_WORKER_STOP: list[int] = []  # in a worker process: the stop signals received outside a run


def _worker_init() -> None:
    """Worker processes: a stop signal between runs is remembered (a run installs its own
    handlers, faults.StopSignals), so an idle worker is never killed mid-task."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: _WORKER_STOP.append(signum))


def _run_parallel(cfg: TrainConfig, seeds, methods, out_dir: str, workers: int, bar, overwrite: bool) -> list[dict]:
    """The seeds in ``workers`` spawned processes. SIGTERM to this process is passed on to
    the workers (SIGINT from a terminal reaches them by itself): each finishes its step,
    checkpoints and stops, seeds not started are cancelled, and :class:`Interrupted` is
    raised here naming the first stopped run."""
    import multiprocessing
    import signal
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .faults import Interrupted

    runs: list[dict] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = [pool.submit(_run_seed, cfg, s, methods, out_dir, True, overwrite) for s in seeds]

        def stop(signum, frame):
            for f in futures:
                f.cancel()
            if signum == signal.SIGTERM:
                for proc in list(getattr(pool, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)

        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            stopped = None
            for f in as_completed(futures):
                if f.cancelled():
                    continue
                rs = f.result()
                if "interrupted" in rs[0]:
                    stopped = stopped or rs[0]
                    continue
                runs += rs
                bar.update(len(rs))
                bar.write(f"seed {rs[0]['seed']}: " + ", ".join(
                    f"{LABELS[r['method']]} {r['final_eval'].get('eval_acc_multi', float('nan')):.3f}"
                    for r in rs) + " (final held-out multi-source accuracy)")
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        if stopped is not None or any(f.cancelled() for f in futures):
            if stopped is None:
                stopped = {"interrupted": signal.SIGTERM, "output_dir": out_dir}
            raise Interrupted(stopped["interrupted"], stopped["output_dir"])
    return runs


def _run_summary(method: str, seed: int, res, wall: float) -> dict:
    steps = [r for r in res.records if r.get("step", 0) >= 1]
    keep = ("step", "reward_multi", "frac_zero_std", "frac_zero_std_multi", "groups_drawn", "time_step")
    return {"method": method, "seed": seed, "output_dir": res.output_dir, "wall_time_s": wall,
            "final_eval": res.final_eval,
            "eval_curve": [(r["step"], r["eval_acc_multi"]) for r in res.records if r.get("eval_acc_multi") is not None],
            "steps": [{k: r.get(k) for k in keep} for r in steps],
            "median_phase_time_s": {k: statistics.median(r[k] for r in steps) if steps else None for k in PHASES}}


def run_compare(cfg: TrainConfig, output_dir: str | None = None, overwrite: bool = False) -> CompareResult:
    """Run ``cfg.compare.methods`` on ``cfg.compare.seeds`` and summarise (module docstring).
    A run directory that holds an earlier run's checkpoints makes it refuse before any run
    starts (ConfigError), unless ``overwrite``."""
    from .checkpoint import earlier_checkpoints
    from .config import ConfigError
    from .loop import _tqdm

    out_dir = output_dir or cfg.output_dir
    methods = [m for m in METHODS if m in cfg.compare.methods]
    seeds = list(cfg.compare.seeds)
    taken = [f"{m}_seed{s}" for s in seeds for m in methods if earlier_checkpoints(os.path.join(out_dir, f"{m}_seed{s}"))]
    if taken and not overwrite:
        raise ConfigError(f"output_dir: {out_dir} holds runs of an earlier --compare ({', '.join(taken[:4])}"
                          f"{' ...' if len(taken) > 4 else ''}); replace them with --overwrite or choose another "
                          "output_dir")
    os.makedirs(out_dir, exist_ok=True)
    save_config(cfg, os.path.join(out_dir, "config.yaml"))
    workers = min(compare_workers(cfg), len(seeds))
    t0 = time.perf_counter()
    runs: list[dict] = []
    bar = _tqdm(cfg, total=len(seeds) * len(methods), desc="mars train --compare", unit="run")
    try:
        if workers <= 1:
            for seed in seeds:
                for r in _run_seed(cfg, seed, methods, out_dir, quiet=False, overwrite=overwrite):
                    runs.append(r)
                    bar.update(1)
        else:  # seeds in worker processes; their bars would interleave, so only this one is drawn
            runs = _run_parallel(cfg, seeds, methods, out_dir, workers, bar, overwrite)
    finally:
        bar.close()
    return write_report(cfg, runs, out_dir, wall_time_s=time.perf_counter() - t0, workers=workers)


def load_runs(cfg: TrainConfig, out_dir: str) -> list[dict]:
    """The summaries of the finished runs of a --compare directory, read back from each run's
    metrics.jsonl and summary.json (a run without summary.json is left out): a report can be
    written again, e.g. after an interrupted compare, with :func:`write_report`."""
    from .logger import read_metrics

    runs = []
    for seed in cfg.compare.seeds:
        for method in [m for m in METHODS if m in cfg.compare.methods]:
            d = os.path.join(out_dir, f"{method}_seed{seed}")
            if not os.path.isfile(os.path.join(d, "summary.json")):
                continue
            with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
                s = json.load(f)
            res = types.SimpleNamespace(records=read_metrics(os.path.join(d, "metrics.jsonl")),
                                        final_eval=s["final_eval"], output_dir=d)
            runs.append(_run_summary(method, seed, res, s["wall_time_s"]))
    return runs


def write_report(cfg: TrainConfig, runs: list[dict], out_dir: str, *, wall_time_s: float | None = None,
                 workers: int | None = None) -> CompareResult:
    """compare.json, compare.md and compare.png of ``runs`` in ``out_dir``."""
    seeds = list(cfg.compare.seeds)
    methods = [m for m in METHODS if m in cfg.compare.methods]
    runs = sorted(runs, key=lambda r: (seeds.index(r["seed"]), methods.index(r["method"])))
    summary = summarise(runs, target=cfg.compare.target)
    summary.update(seeds=sorted({r["seed"] for r in runs}, key=seeds.index), max_steps=cfg.max_steps,
                   eval_every=cfg.eval.every, G=cfg.rollout.n, wall_time_s=wall_time_s, workers=workers)
    if cfg.data.train == "embedded":
        from .task import SOURCES

        summary["source_names"] = list(SOURCES)
    summary_path = os.path.join(out_dir, "compare.json")
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    table = format_table(summary)
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(f"# mars train --compare\n\n{table}\n")
    plot = plot_compare(runs, summary, os.path.join(out_dir, "compare.png"))
    return CompareResult(out_dir, plot, summary_path, table, summary)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _area(run) -> float | None:
    c = run["eval_curve"]
    return stats.curve_area([s for s, _ in c], [a for _, a in c]) if c else None


def summarise(runs: list[dict], target: float = 0.95) -> dict:
    """Per method: final held-out accuracies (mean, per seed), accuracy-curve area, steps to
    ``target``, zero-signal share, reward of the last 20 steps, phase times. Per pair present:
    paired differences (anchors minus baseline) of the final multi-source accuracy and of the
    area, by seed, with 95% intervals."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    out: dict = {"target": target, "methods": {}, "pairs": {}}
    for method, rs in by_method.items():
        keys = sorted({k for r in rs for k in r["final_eval"]})
        reach = [stats.steps_to_reach([s for s, _ in r["eval_curve"]], [a for _, a in r["eval_curve"]], target)
                 for r in rs]
        out["methods"][method] = {
            "seeds": [r["seed"] for r in rs],
            "final_eval": {k: _mean(r["final_eval"].get(k) for r in rs) for k in keys},
            "final_eval_per_seed": {k: [r["final_eval"].get(k) for r in rs] for k in keys},
            "area_per_seed": [_area(r) for r in rs],
            "steps_to_target_per_seed": reach,
            "reached_target": sum(x is not None for x in reach),
            "final_at_target": sum((r["final_eval"].get("eval_acc_multi") or 0) >= target for r in rs),
            "frac_zero_signal": _mean(_mean(x["frac_zero_std"] for x in r["steps"]) for r in rs),
            "frac_zero_std_multi": _mean(_mean(x["frac_zero_std_multi"] for x in r["steps"]) for r in rs),
            "groups_drawn_per_step": _mean(_mean(x["groups_drawn"] for x in r["steps"]) for r in rs),
            "reward_multi_last20": _mean(_mean(x["reward_multi"] for x in r["steps"][-20:]) for r in rs),
            "median_phase_time_s": {k: _mean(r["median_phase_time_s"][k] for r in rs) for k in PHASES},
            "wall_time_s": sum(r["wall_time_s"] for r in rs)}
        out["methods"][method]["area"] = _mean(out["methods"][method]["area_per_seed"])
    for base, anchored in PAIRS:
        if base not in by_method or anchored not in by_method:
            continue
        b = {r["seed"]: r for r in by_method[base]}
        a = {r["seed"]: r for r in by_method[anchored]}
        seeds = [s for s in b if s in a]
        pair: dict = {"seeds": seeds}
        for name, get in (("final_acc", lambda r: r["final_eval"].get("eval_acc_multi")), ("area", _area)):
            xa, xb = [get(a[s]) for s in seeds], [get(b[s]) for s in seeds]
            if all(x is not None for x in xa + xb) and seeds:
                pair[name] = stats.paired_difference(xa, xb)
        steps_b = out["methods"][base]["steps_to_target_per_seed"]
        steps_a = out["methods"][anchored]["steps_to_target_per_seed"]
        pair["steps_to_target"] = {"baseline": steps_b, "anchored": steps_a}
        t_a, t_b = out["methods"][anchored]["median_phase_time_s"]["time_step"], \
            out["methods"][base]["median_phase_time_s"]["time_step"]
        if t_a and t_b:
            pair["step_time_ratio"] = t_a / t_b
        out["pairs"][f"{anchored}_vs_{base}"] = pair
    return out


def _ci(d: dict | None) -> str:
    if not d:
        return "-"
    t = d["ci_t"]
    tt = f"[{t[0]:+.3f}, {t[1]:+.3f}]" if t else "n/a"
    b = d["ci_boot"]
    return f"{d['mean']:+.3f} | {tt} | [{b[0]:+.3f}, {b[1]:+.3f}] | {d['wins']}/{d['losses']}/{d['ties']}"


def _verdict(d: dict | None) -> str:
    if not d or d["ci_t"] is None:
        return "too few seeds to tell"
    lo, hi = d["ci_t"]
    if lo > 0:
        return "helps (the interval is above 0)"
    if hi < 0:
        return "hurts (the interval is below 0)"
    return "no difference shown (the interval contains 0)"


def format_table(summary: dict) -> str:
    """The Markdown report: the paired differences first, then per-method tables."""
    ms = summary["methods"]
    names = summary.get("source_names") or []
    lines = [f"seeds {summary.get('seeds')}, {summary.get('max_steps')} RL steps per run, G = {summary.get('G')}, "
             f"held-out accuracy evaluated every {summary.get('eval_every')} steps (greedy); "
             f"{len(summary.get('seeds') or [])} paired seeds per comparison", ""]
    if len(summary.get("seeds") or []) < 10:
        lines += [f"Only {len(summary.get('seeds') or [])} seed(s): the intervals below are wide and a verdict is "
                  "unlikely (the default keeps --compare short); compare.seeds with 10 or more answers the question "
                  "(bench/results/train_compare.md ran 10).", ""]
    if summary["pairs"]:
        lines += ["## Paired differences (with anchors minus without, same seeds)", "",
                  "| comparison | metric | mean difference | 95% CI (t) | 95% CI (paired bootstrap) | "
                  "wins/losses/ties | verdict |", "|---|---|---|---|---|---|---|"]
        for key, p in summary["pairs"].items():
            a, b = key.split("_vs_")
            for metric, label in (("final_acc", "final multi-source accuracy"),
                                  ("area", "area under the accuracy curve")):
                lines.append(f"| {LABELS[a]} vs {LABELS[b]} | {label} | {_ci(p.get(metric))} | "
                             f"{_verdict(p.get(metric))} |")
        lines += ["", f"RL steps to reach held-out multi-source accuracy {summary['target']} "
                      "(per seed; '-': not reached):", ""]
        for key, p in summary["pairs"].items():
            a, b = key.split("_vs_")
            fmt = lambda xs: ", ".join("-" if x is None else str(x) for x in xs)  # noqa: E731
            lines.append(f"- {LABELS[b]}: {fmt(p['steps_to_target']['baseline'])}; "
                         f"{LABELS[a]}: {fmt(p['steps_to_target']['anchored'])}")
        lines.append("")
    cols = list(ms)
    lines += ["## Per method", "", "| | " + " | ".join(LABELS.get(m, m) for m in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]

    def row(label, get, fmt="{:.3f}"):
        lines.append(f"| {label} | " + " | ".join("-" if get(ms[m]) is None else fmt.format(get(ms[m]))
                                                 for m in cols) + " |")

    keys = [k for k in ms[cols[0]]["final_eval"] if "/" not in k]
    for k in keys:
        label = k.replace("eval_acc_", "")
        if label.startswith("source_"):
            i = int(label.split("_")[1])
            label = f"{names[i] if i < len(names) else f'source {i}'} only"
        row(f"final accuracy, {label}", lambda m, k=k: m["final_eval"].get(k))
    cats = sorted({k.split("/", 1)[1] for m in ms.values() for k in m["final_eval"] if k.startswith("eval_acc_multi/")})
    for c in cats:
        row(f"final accuracy, multi, {c}", lambda m, c=c: m["final_eval"].get(f"eval_acc_multi/{c}"))
    row("area under the accuracy curve", lambda m: m["area"])
    lines.append(f"| seeds reaching {summary['target']} at an evaluation | " + " | ".join(
        f"{ms[m]['reached_target']}/{len(ms[m]['seeds'])}" for m in cols) + " |")
    lines.append(f"| seeds at {summary['target']} or above at the end | " + " | ".join(
        f"{ms[m]['final_at_target']}/{len(ms[m]['seeds'])}" for m in cols) + " |")
    row("groups with zero advantage signal (per step)", lambda m: m["frac_zero_signal"])
    row("groups with equal multi rewards (per step)", lambda m: m["frac_zero_std_multi"])
    row("prompts generated per step", lambda m: m["groups_drawn_per_step"], "{:.1f}")
    row("training reward, last 20 steps", lambda m: m["reward_multi_last20"])
    row("median step time (s)", lambda m: m["median_phase_time_s"]["time_step"])
    lines += ["", "Final multi-source accuracy per seed:", ""]
    for m in cols:
        lines.append(f"- {LABELS.get(m, m)}: " + ", ".join(
            f"{x:.2f}" for x in ms[m]["final_eval_per_seed"].get("eval_acc_multi", []) if x is not None))
    return "\n".join(lines)


def plot_compare(runs: list[dict], summary: dict, path: str) -> str | None:
    """Held-out accuracy and training reward per step (mean over seeds with its 95% t band),
    the share of groups without signal per step, final per-category accuracy (bars: mean,
    dots: seeds) and the paired differences with their intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("mars train --compare: matplotlib is not installed, no compare.png (pip install matplotlib)",
              file=sys.stderr)
        return None
    from .logger import rolling

    colors = {"grpo": "tab:blue", "grpo_mars": "tab:red", "dapo": "tab:green", "dapo_mars": "tab:purple"}
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    by = {m: [r for r in runs if r["method"] == m] for m in methods}
    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    (a_acc, a_rew, a_zero), (a_cat, a_diff, a_dots) = axes

    def band(ax, m, xs, curves, label):
        mean, lo, hi = stats.mean_band(curves)
        ax.plot(xs[:len(mean)], mean, color=colors[m], label=label)
        ax.fill_between(xs[:len(mean)], lo, hi, color=colors[m], alpha=0.15)

    for m in methods:
        rs = by[m]
        if all(r["eval_curve"] for r in rs):
            band(a_acc, m, [s for s, _ in rs[0]["eval_curve"]], [[a for _, a in r["eval_curve"]] for r in rs],
                 f"{LABELS[m]} ({len(rs)} seeds)")
        if all(r["steps"] for r in rs):
            xs = [x["step"] for x in rs[0]["steps"]]
            band(a_rew, m, xs, [rolling([x["reward_multi"] for x in r["steps"]], 10) for r in rs], LABELS[m])
            band(a_zero, m, xs, [rolling([x["frac_zero_std"] for x in r["steps"]], 10) for r in rs], LABELS[m])
    a_acc.axhline(summary["target"], color="grey", lw=0.8, ls="--")
    a_acc.set(title="held-out multi-source accuracy (mean, 95% band)", xlabel="RL step", ylim=(0, 1.02))
    a_rew.set(title="training reward of the multi-source rollouts (10-step mean)", xlabel="RL step")
    a_zero.set(title="groups with zero advantage signal (10-step mean)", xlabel="RL step", ylim=(-0.02, 1.02))
    for ax in (a_acc, a_rew, a_zero):
        ax.legend(fontsize=8)
    cats = sorted({k.split("/", 1)[1] for r in runs for k in r["final_eval"] if k.startswith("eval_acc_multi/")})
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        for i, c in enumerate(cats):
            vals = [r["final_eval"].get(f"eval_acc_multi/{c}") for r in by[m]]
            vals = [v for v in vals if v is not None]
            if vals:
                x = i + (j - (len(methods) - 1) / 2) * width
                a_cat.bar(x, sum(vals) / len(vals), width, color=colors[m], alpha=0.7, label=LABELS[m] if i == 0 else None)
                a_cat.scatter([x] * len(vals), vals, color="k", s=6, zorder=3)
    a_cat.set_xticks(range(len(cats)), [c.replace("_", "\n") for c in cats])
    a_cat.set(title="final multi-source accuracy per scene category", ylim=(0, 1.05))
    a_cat.legend(fontsize=8, loc="lower left")
    rows = [(f"{LABELS[k.split('_vs_')[0]]} - {LABELS[k.split('_vs_')[1]]}\n{lab}", p[metric])
            for k, p in summary["pairs"].items() for metric, lab in (("final_acc", "final acc."), ("area", "area"))
            if metric in p]
    for i, (lab, d) in enumerate(rows):
        lo, hi = d["ci_t"] or d["ci_boot"]
        a_diff.errorbar(d["mean"], i, xerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o", color="k", capsize=4)
    a_diff.axvline(0, color="grey", lw=0.8)
    a_diff.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    a_diff.set(title="paired difference, mean and 95% t interval", xlabel="with anchors - without")
    for j, m in enumerate(methods):
        vals = summary["methods"][m]["final_eval_per_seed"].get("eval_acc_multi", [])
        a_dots.scatter([j] * len(vals), vals, color=colors[m], s=18, alpha=0.7)
        a_dots.plot([j - 0.25, j + 0.25], [summary["methods"][m]["final_eval"].get("eval_acc_multi")] * 2, color="k")
    a_dots.set_xticks(range(len(methods)), [LABELS[m] for m in methods])
    a_dots.set(title="final held-out multi-source accuracy, per seed", ylim=(0, 1.02))
    fig.suptitle(f"mars train --compare: seeds {summary.get('seeds')}, {summary.get('max_steps')} RL steps, "
                 f"G = {summary.get('G')}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    os.replace(tmp, path)
    return path
