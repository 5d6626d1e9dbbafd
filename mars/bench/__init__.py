"""`mars bench`: the benchmark suite, runnable from an installed package (docs/bench.md).

    mars bench [--op NAME] [--device cpu|cuda] [--quick] [--output DIR]
    python -m mars.bench ...             # the same, without the `mars` script

Times each op (advantage, policy loss forward + backward, fused lm-head loss, token
log-probs) at small, paper-sized and large shapes: every mars backend side by side with
the reference, torch.compile of the reference, verl's, Liger's and Cut Cross-Entropy's
functions where they are installed and run on the device, and for the advantage a
per-group Python loop. Writes DIR/results.json (medians, IQR, min, rounds, peak memory,
ratios, the goals), DIR/results.md and DIR/plots/<op>_<device>.png. Both files are
rewritten after every shape (marked ``incomplete``), and SIGINT / SIGTERM stop the run
with what was measured written (plots too) and exit status 130 / 143.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time

from .cases import OPS, build, get_op  # noqa: F401
from .peers import Skip  # noqa: F401

__all__ = ["main", "run", "OPS", "build", "Skip"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mars bench", description=(
        "Benchmark the mars ops against the reference and the peers (verl, Liger, Cut "
        "Cross-Entropy, a per-group Python loop); writes results.json, results.md and "
        "plots/ to --output (docs/bench.md)."))
    p.add_argument("--op", action="append", choices=sorted(OPS),
                   help="only this op (repeatable; default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="smallest shapes, few rounds, no torch.compile: a smoke test, not a timing")
    p.add_argument("--output", default="mars-bench", help="directory for the results "
                   "(default: ./mars-bench)")
    p.add_argument("--impl", action="append", help="only this implementation (repeatable)")
    p.add_argument("--size", action="append", help="only the shape of this name, e.g. "
                   "'1024x8192 bf16' (repeatable; names in results.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's). On a "
                   "CPU that other jobs share, 1 avoids OpenMP threads waiting on each other")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the suite; 0 when every mars implementation ran and matched the reference,
    1 when one failed or differed (the results are written all the same), 2 for bad
    arguments or a device that is not here."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("mars bench: --device cuda, but no GPU is visible (torch.cuda.is_available() "
              "is False)", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"mars bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return _run(args, args_list, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, args_list: list[str], device: str) -> int:
    ops = args.op or list(OPS)
    if args.impl:
        known = {i.name for o in ops for i in OPS[o].impls}
        bad = [i for i in args.impl if i not in known]
        if bad:
            print(f"mars bench: --impl {bad[0]!r} is not an implementation of "
                  f"{', '.join(ops)}; known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
    if args.size:
        known = {s.name for o in ops for s in OPS[o].sizes(device, args.quick)}
        bad = [s for s in args.size if s not in known]
        if bad:
            print(f"mars bench: --size {bad[0]!r} is not a {'quick ' if args.quick else ''}"
                  f"shape of {', '.join(ops)} on {device}; known: {', '.join(sorted(known))}",
                  file=sys.stderr)
            return 2
    from .run import run as run_suite
    os.makedirs(args.output, exist_ok=True)
    log = (lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr,
                                                                      flush=True))
    t0 = time.perf_counter()
    so_far: dict = {}

    def progress(doc):  # after every shape: the files as they stand, without plots (fast)
        so_far["doc"] = doc
        _write(doc, args.output, plots=False)

    try:
        with _sigterm_as_interrupt():
            doc = run_suite(ops, device, args.quick, args.impl, size_filter=args.size,
                            command="mars bench " + shlex.join(args_list), log=log,
                            progress=progress)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args else signal.SIGINT
        doc = so_far.get("doc")
        name = signal.Signals(signum).name
        if doc is None:
            print(f"mars bench: stopped by {name} before the first shape; nothing written",
                  file=sys.stderr)
        else:
            doc["interrupted"] = f"{name}, {doc.get('incomplete', '')}"
            _write(doc, args.output, plots=not args.no_plots)
            print(f"mars bench: stopped by {name} ({doc.get('incomplete', '')}); written to "
                  f"{args.output}/results.json, results.md", file=sys.stderr)
        return 128 + int(signum)
    plots, why = _write(doc, args.output, plots=not args.no_plots)
    errors = [(op, g["size"], impl, msg) for op, e in doc["ops"].items() for g in e["groups"]
              for impl, msg in g.get("errors", {}).items()]
    log(f"wrote {args.output}/results.json, results.md"
        + (f", {len(plots)} plots" if plots else f" ({why})") + f" in {time.perf_counter() - t0:.1f} s")
    for op, size, impl, msg in errors:
        print(f"mars bench: ERROR {op} {size} {impl}: {msg}", file=sys.stderr)
    return 1 if errors else 0


def _write(doc: dict, output: str, plots: bool):
    """results.json and results.md of ``doc`` (the goals evaluated on what it holds), and the
    plots when ``plots``; returns (plots, why there are none)."""
    from . import goals as G
    from . import report
    goals = G.evaluate_all(doc)
    doc["goals"] = goals
    made, why = report.plot(doc, output) if plots else ({}, "--no-plots")
    if why:
        doc["plots_note"] = why
    else:
        doc.pop("plots_note", None)
    doc["plots"] = made
    report.write_json(doc, os.path.join(output, "results.json"))
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(report.markdown(doc, goals, made))
    return made, why


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (``timeout``, a job scheduler) raises KeyboardInterrupt(SIGTERM) like SIGINT
    does, so the run stops the same clean way; SIGINT carries its number too. Only in the
    main thread (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(*args, **kwargs):
    """`mars.bench.run.run`: the suite as a function returning the results document."""
    from .run import run as run_suite
    return run_suite(*args, **kwargs)
