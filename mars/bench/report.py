"""Writes the results of `mars bench`: compact JSON, a Markdown table, PNG plots (docs/bench.md)."""
from __future__ import annotations

import json
import math
import os


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def _x(r: float | None) -> str:
    return "-" if r is None else (f"{r:.3g}x" if r < 1000 else f"{r:.0f}x")


def _clean(obj):
    """JSON-safe: non-finite floats become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1, allow_nan=False)
        f.write("\n")


def header_lines(doc: dict) -> list[str]:
    d, v = doc["device"], doc["versions"]
    if d["type"] == "cuda":
        dev = (f"{d.get('name')} (compute capability {d.get('capability')}, "
               f"{d.get('memory_GiB')} GiB, {d.get('sms')} SMs)")
    else:
        dev = (f"CPU: {d.get('name')}, {d.get('cores')} cores, torch threads "
               f"{d.get('torch_threads')}" + (f", MARS_CPU_ISA={d['mars_cpu_isa']}"
                                              if d.get("mars_cpu_isa") else ""))
    vers = ", ".join(f"{k} {val}" if val else f"{k} not installed" for k, val in v.items())
    lines = [f"- device: {dev}", f"- versions: {vers}",
             f"- mode: {doc['mode']}; date {doc['date']}; {doc.get('seconds', '?')} s; "
             f"load average (1, 5, 15 min) at start {doc.get('load_avg_start')}, "
             f"at end {doc.get('load_avg_end')}",
             f"- timing: median over rounds; a round is a block of calls (about "
             f"{doc['plan']['block_s'] * 1e3:g} ms), the implementations of a shape interleaved "
             f"round by round; {doc['plan']['min_rounds']}-{doc['plan']['max_rounds']} rounds, "
             f"{doc['plan']['warmup']} warm-up calls"]
    if doc.get("filters"):
        lines.append("- only: " + "; ".join(f"{k} {', '.join(v)}" for k, v in doc["filters"].items())
                     + " (the other cases of the suite were not run)")
    if doc.get("interrupted"):
        lines.append(f"- **interrupted** ({doc['interrupted']}): the shapes below are those measured")
    elif doc.get("incomplete"):
        lines.append(f"- **incomplete** ({doc['incomplete']}): the run was still going when this "
                     "was written (or was killed)")
    if doc.get("command"):
        lines.insert(0, f"- command: `{doc['command']}`")
    if doc.get("roofs"):
        r = doc["roofs"]
        lines.append(f"- roofs: device copy {r['copy_GBps']} GB/s (read + write of 1 GiB), "
                     f"bf16 matmul {r['bf16_matmul_TFLOPs']} TFLOP/s (8192^3)")
    return lines


def _goal_rows(goals: list[dict]) -> list[str]:
    rows = ["| goal | measured | status | why / note |", "|---|---|---|---|"]
    for g in goals:
        m = g["measured"]
        if m is None:
            meas = "-"
        elif "time (s)" in g["goal"]:
            meas = _t(m)
        elif "syncs" in g["goal"]:
            meas = f"{m:g}"
        elif "roofline" in g["goal"]:
            meas = f"{m:.0%}"
        else:
            meas = f"{m:.3g}"
        if g["status"] == "met":
            st = "met" + (f" by {g['margin']:.2f}x" if g["margin"] and math.isfinite(g["margin"])
                          else "")
        elif g["status"] == "not met":
            st = f"**not met**: {g['margin']:.2f} of the target" if g["margin"] is not None \
                else "**not met**"
        else:
            st = "not measured"
        note = "; ".join(x for x in (g.get("why"), g.get("note")) if x)
        rows.append(f"| {g['goal']} | {meas} | {st} | {note} |")
    return rows


def markdown(doc: dict, goals: list[dict], plots: dict[str, str] | None = None) -> str:
    dev = doc["device"]["type"]
    lines = [f"# mars bench: {doc['device'].get('name', dev)} ({dev}, {doc['mode']} run)", ""]
    lines += header_lines(doc) + [""]
    lines += ["Ratios are within this one run. `time / <baseline>`: this implementation's median "
              "over the mars baseline's (> 1: mars is faster); `reference / time`: speed-up over "
              "the reference; `err`: max relative error of the output (loss and gradients) "
              "against the reference's.", ""]
    if goals:
        lines += ["## Goals", ""] + _goal_rows(goals) + [""]
    for name, op in doc["ops"].items():
        base = op["baseline"]
        lines += [f"## {op['title']} (`{name}`)", "", op["what"], ""]
        if plots and name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
        for g in op["groups"]:
            res = g["results"]
            mem = any("peak_bytes" in r for r in res.values())
            roof = any("roofline_share" in r for r in res.values())
            flops = any("tflops" in r for r in res.values())
            syncs = any("host_syncs" in r for r in res.values())
            lines += [f"### {g['size']} ({g['label']})", ""]
            head = ["impl", "median", "IQR", "min", "rounds x calls"]
            head += ["peak memory", "memory / " + base] if mem else []
            head += ["roofline share"] if roof else []
            head += ["TFLOP/s"] if flops else []
            head += ["host syncs"] if syncs else []
            head += [f"time / {base}", "reference / time", "err"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            order = sorted(res, key=lambda k: res[k].get("median_s") or math.inf)
            for impl in order:
                r = res[impl]
                row = [impl, _t(r.get("median_s")), _t(r.get("iqr_s")), _t(r.get("min_s")),
                       f"{r.get('rounds', '-')} x {r.get('calls_per_round', '-')}"]
                if mem:
                    row += [_mib(r.get("peak_bytes")), _x(r.get("memory_vs_mars"))]
                if roof:
                    row += ["-" if r.get("roofline_share") is None else f"{r['roofline_share']:.1%}"]
                if flops:
                    row += ["-" if r.get("tflops") is None else f"{r['tflops']:.3g}"]
                if syncs:
                    row += [str(r.get("host_syncs", "-"))]
                row += [_x(r.get("time_vs_mars")), _x(r.get("speedup_vs_reference")),
                        "-" if r.get("err") is None else f"{r['err']:.1e}"]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
            for k, label in (("errors", "ERROR"), ("skipped", "skipped")):
                for impl, note in g.get(k, {}).items():
                    lines.append(f"- {label} `{impl}`: {note}")
            if g.get("errors") or g.get("skipped"):
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(doc: dict, out_dir: str) -> tuple[dict[str, str], str | None]:
    """One PNG per op: median time (and peak memory where measured) vs size, one line per
    implementation, a panel per dtype. Returns ({op: relative path}, why none were made)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "matplotlib is not installed (pip install matplotlib): no plots"
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    made = {}
    dev = doc["device"]["type"]
    for name, op in doc["ops"].items():
        if not op["groups"]:  # filtered out, or not reached before an interruption
            continue
        series = sorted({g["series"] for g in op["groups"]})
        mem = any("peak_bytes" in r for g in op["groups"] for r in g["results"].values())
        rows = 2 if mem else 1
        fig, axes = plt.subplots(rows, len(series), figsize=(5.5 * len(series), 3.6 * rows),
                                 squeeze=False)
        for j, s in enumerate(series):
            groups = sorted((g for g in op["groups"] if g["series"] == s), key=lambda g: g["x"])
            impls = sorted({i for g in groups for i in g["results"]})
            for impl in impls:
                pts = [(g["x"], g["results"][impl]) for g in groups if impl in g["results"]]
                t = [(x, r["median_s"]) for x, r in pts if r.get("median_s")]
                style = dict(marker="o", lw=2.2 if impl.startswith("mars") else 1.2,
                             ls="-" if impl.startswith("mars") else "--")
                if t:
                    axes[0][j].plot(*zip(*t), label=impl, **style)
                m = [(x, r["peak_bytes"] / 2**20) for x, r in pts if r.get("peak_bytes")]
                if mem and m:
                    axes[1][j].plot(*zip(*m), label=impl, **style)
            xlabel = "rows" if name == "advantage" else "tokens"
            titles = [("median time (s)", 0)] + ([("peak memory (MiB)", 1)] if mem else [])
            for ylabel, i in titles:
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{name} {s} ({dev})".replace("  ", " "))
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        rel = f"plots/{name}_{dev}.png"
        fig.savefig(os.path.join(out_dir, rel), dpi=80)
        plt.close(fig)
        made[name] = rel
    return made, None
