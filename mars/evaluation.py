"""``mars eval`` / ``mars.evaluate``: run a model over an evaluation file and score it.

For every sample the model answers the multi-source input; with ``mono=True`` it also
answers each mono variant (source k alone, :meth:`mars.data.Sample.mono`). Scores use the
task metric of :mod:`mars.rewards.metrics`:

* grounding: accuracy = share of samples whose Hungarian-matched mIoU > 0.5 (unparsable
  outputs count as 0, never dropped), and the mean mIoU;
* vqa / mcq: accuracy of the ``<answer>`` content only.

Information gain (with ``mono``): per sample, score(multi) - mean_k score(source k),
averaged over samples (= multi accuracy - mean single-source accuracy when all samples
have the same number of sources); also reported against the best single source.

Writes ``<output_dir>/predictions.jsonl`` (one line per sample and input variant, written
as it goes), ``summary.json`` and ``summary.md`` (the table that is also printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, Sequence

__all__ = ["EvalResult", "evaluate", "cli_main", "summarise", "format_table"]


@dataclass
class EvalResult:
    """summary: nested dict (see :func:`summarise`); records: one dict per generated
    output; table: the printed summary; output_dir: where files were written (or None)."""

    summary: dict
    records: list
    table: str
    output_dir: str | None = None


def _check_ground_truths(samples, path) -> None:
    from mars.data.sample import raise_problems
    from mars.rewards.boxes import parse_gt_boxes
    from mars.rewards.metrics import TASKS
    from mars.rewards.vqa import _gt_text

    problems = []
    for s in samples:
        if s.task not in TASKS:
            problems.append((s.id, f"task {s.task!r} has no evaluation metric (known: {', '.join(TASKS)})"))
            continue
        try:
            parse_gt_boxes(s.ground_truth) if s.task == "grounding" else _gt_text(s.ground_truth)
        except ValueError as exc:
            problems.append((s.id, f"bad ground truth for task {s.task!r}: {exc}"))
    raise_problems(path, problems)


def _jobs(samples, mono: bool, mono_mode: str) -> list:
    jobs = []
    for s in samples:
        jobs.append(s)
        if mono:
            jobs.extend(s.mono_variants(mono_mode))
    return jobs


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarise(records: Sequence[dict]) -> dict:
    """Per-task summary of evaluation records.

    ``{task: {"n": N, "multi": {"accuracy", "miou"?, "unparsable"}, "mono": {k: {...}},
    "gain": ..., "gain_vs_best": ...}}``; accuracies and mIoU are fractions in [0, 1];
    "mono", "gain" and "gain_vs_best" appear only when mono records exist.
    """
    out: dict[str, Any] = {}
    by_task: dict[str, list] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)

    def stats(rs):
        d = {"n": len(rs), "accuracy": _mean([r["correct"] for r in rs]),
             "unparsable": sum(r["parse_status"] != "ok" for r in rs)}
        if rs and "miou" in rs[0]:
            d["miou"] = _mean([r["miou"] for r in rs])
        return d

    for task, rs in sorted(by_task.items()):
        multi = [r for r in rs if r["variant"] == "multi"]
        entry: dict[str, Any] = {"n": len(multi), "multi": stats(multi)}
        mono = [r for r in rs if r["variant"] != "multi"]
        if mono:
            sources = sorted({r["source"] for r in mono})
            entry["mono"] = {str(k): stats([r for r in mono if r["source"] == k]) for k in sources}
            per_sample: dict[str, list] = {}
            for r in mono:
                per_sample.setdefault(r["id"], []).append(r["correct"])
            gains = [m["correct"] - _mean(per_sample[m["id"]]) for m in multi if m["id"] in per_sample]
            entry["gain"] = _mean(gains)
            best = max(v["accuracy"] for v in entry["mono"].values())
            entry["gain_vs_best"] = entry["multi"]["accuracy"] - best
        out[task] = entry
    return out


def format_table(summary: dict) -> str:
    """Plain-text table of :func:`summarise`'s output (accuracy in %, mIoU as a fraction)."""
    head = f"{'task':<10} {'input':<10} {'n':>5} {'accuracy %':>10} {'mIoU':>7} {'unparsable':>10}"
    lines = [head, "-" * len(head)]

    def row(task, name, d):
        miou = f"{d['miou']:.4f}" if d.get("miou") is not None else "-"
        acc = f"{100 * d['accuracy']:.2f}" if d["accuracy"] is not None else "-"
        lines.append(f"{task:<10} {name:<10} {d['n']:>5} {acc:>10} {miou:>7} {d['unparsable']:>10}")

    for task, entry in summary.items():
        row(task, "multi", entry["multi"])
        for k, d in entry.get("mono", {}).items():
            row(task, f"source {k}", d)
        if "gain" in entry:
            lines.append(
                f"{task:<10} information gain: {100 * entry['gain']:+.2f} pts vs mean single source, "
                f"{100 * entry['gain_vs_best']:+.2f} pts vs best single source"
            )
    return "\n".join(lines)


def _engine_kwargs(backend: str, batch_size: int, device: str | None) -> dict:
    import importlib.util

    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    kw = {"batch_size": batch_size}
    if backend == "hf" and device is not None:
        kw["device"] = device
    return kw


def evaluate(
    model,
    data,
    *,
    task: str | None = None,
    mono: bool = False,
    mono_mode: str = "duplicate",
    output_dir: str | os.PathLike | None = None,
    backend: str = "auto",
    max_new_tokens: int = 2048,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 1,
    limit: int | None = None,
    image_root: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on ``data``.

    model: a checkpoint path (loaded with ``backend``: "auto" = vLLM if installed else HF)
        or a :class:`mars.rollout.RolloutEngine`.
    data: an evaluation JSON/JSONL or training parquet path, or a list of Samples.
    task: force "grounding" / "vqa" / "mcq" (default: inferred per sample).
    mono / mono_mode: also score each single source ("duplicate" or "single" variant).
    output_dir: where predictions.jsonl, summary.json and summary.md go (None: not written).
    max_new_tokens, temperature (0 = greedy), top_p, seed: decoding.
    batch_size, device: for a path loaded with the HF backend (device default: cuda if any).
    limit, image_root: passed to the loader.
    Returns an EvalResult. Malformed data or ground truths raise a DataFormatError naming
    the samples before anything is generated.
    """
    from mars.data import MONO_MODES, check_limit, load_samples
    from mars.rewards import get_reward
    from mars.rewards.metrics import sample_metric
    from mars.rollout import SamplingConfig, build_engine

    if mono_mode not in MONO_MODES:
        raise ValueError(f"mono_mode must be one of {MONO_MODES}, got {mono_mode!r}")
    limit = check_limit(limit)  # a negative limit would slice off the last samples silently
    config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=1, seed=seed)
    if isinstance(data, (str, os.PathLike)):
        data_name = os.fspath(data)
        samples = load_samples(data, image_root=image_root, task=task, limit=limit)
    else:
        data_name = "<samples>"
        samples = list(data)[:limit] if limit is not None else list(data)
        if task is not None:
            samples = [replace(s, task=task) for s in samples]
    if not samples:
        raise ValueError(f"{data_name}: no samples to evaluate")
    _check_ground_truths(samples, data_name)

    engine = build_engine(model, backend, **_engine_kwargs(backend, batch_size, device))
    jobs = _jobs(samples, mono, mono_mode)

    writer = None
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        writer = open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8")
    from tqdm.auto import tqdm

    records = []
    try:
        with tqdm(total=len(jobs), desc="mars eval", unit="input", disable=not progress) as bar:
            step = max(1, int(getattr(engine, "batch_size", 1)))
            for b in range(0, len(jobs), step):
                chunk = jobs[b:b + step]
                outputs = engine.generate(chunk, config)
                if len(outputs) != len(chunk):
                    raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(chunk)} inputs")
                for s, outs in zip(chunk, outputs):
                    text = outs[0]
                    metric = sample_metric(s.task, text, s.ground_truth)
                    reward = get_reward(s.task).breakdown(text, s.ground_truth)
                    rec = {"id": s.id, "task": s.task, "variant": s.variant, "source": s.source_index,
                           "output": text, "ground_truth": s.ground_truth, **metric,
                           "reward": reward.total, "reward_format": reward.format,
                           "reward_accuracy": reward.accuracy}
                    records.append(rec)
                    if writer is not None:
                        writer.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
                        writer.flush()
                bar.update(len(chunk))
    finally:
        if writer is not None:
            writer.close()

    per_task = summarise(records)
    summary = {"data": data_name, "model": model if isinstance(model, str) else type(model).__name__,
               "n_samples": len(samples), "mono": mono, "mono_mode": mono_mode if mono else None,
               "max_new_tokens": max_new_tokens, "temperature": temperature, "tasks": per_task}
    table = format_table(per_task)
    if output_dir is not None:
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(output_dir, "summary.md"), "w", encoding="utf-8") as f:
            f.write(f"# mars eval: {data_name}\n\nmodel: {summary['model']}\n\n```\n{table}\n```\n")
    return EvalResult(summary, records, table, output_dir)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mars eval",
        description="Evaluate a VLM on a MARS evaluation file (multi-source score, and with --mono "
                    "each single source's score and the information gain).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (local; nothing is downloaded)")
    p.add_argument("--data", required=True, help="evaluation .json/.jsonl or training .parquet file")
    p.add_argument("--task", choices=("grounding", "vqa", "mcq"), help="force the task (default: inferred)")
    p.add_argument("--mono", action="store_true", help="also score each single source")
    p.add_argument("--mono-mode", choices=("duplicate", "single"), default="duplicate",
                   help="duplicate: source k in every image slot (paper); single: one image")
    p.add_argument("--output", help="output directory (default: mars_eval/<data file stem>)")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, default=1, help="samples per generate call (HF backend)")
    p.add_argument("--limit", type=int, help="evaluate only the first N samples")
    p.add_argument("--image-root", help="base directory of relative image paths (default: the data file's)")
    p.add_argument("--device", help="HF backend device (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: list[str]) -> int:
    """Entry point of ``mars eval``; returns the exit status (0 ok, 1 error, 2 usage)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error
        return int(exc.code or 0)
    output = args.output or os.path.join("mars_eval", os.path.splitext(os.path.basename(args.data))[0])
    try:
        result = evaluate(
            args.model, args.data, task=args.task, mono=args.mono, mono_mode=args.mono_mode,
            output_dir=output, backend=args.backend, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
            limit=args.limit, image_root=args.image_root, device=args.device, progress=not args.no_progress,
        )
    except (ValueError, ImportError, OSError, RuntimeError) as exc:
        print(f"mars eval: error: {exc}", file=sys.stderr)
        return 1
    print(result.table)
    print(f"\nwrote {os.path.join(output, 'predictions.jsonl')}, summary.json, summary.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main(sys.argv[1:]))
