"""Metrics of a run: one JSON line per RL step in OUTPUT_DIR/metrics.jsonl, and a PNG of
the main curves (OUTPUT_DIR/metrics.png) redrawn during the run. docs/train.md lists the
metrics."""

from __future__ import annotations

import json
import math
import os

__all__ = ["MetricsLogger", "read_metrics", "plot_metrics", "rolling", "truncate_jsonl", "make_summary_writer", "NullLogger"]


_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _clean(v):
    """Plain Python values: one-element tensors to numbers (NaN / inf kept: a non-finite
    metric is a finding, unlike a missing one, which is None)."""
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _to_json(v):
    """For metrics.jsonl (strict JSON): a non-finite float as the string "nan", "inf" or "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_json(x) for x in v]
    return v


def _from_json(v):
    """The inverse of :func:`_to_json` on a record read back."""
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, dict):
        return {k: _from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def make_summary_writer(log_dir: str, purge_step: int | None = None):
    """``torch.utils.tensorboard.SummaryWriter(log_dir, purge_step=...)``; a clear
    ImportError without the tensorboard package. (The seam the tests replace.)"""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("log.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          f"({exc})") from None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step)


def truncate_jsonl(path: str, step: int) -> list[dict]:
    """Keep the lines of ``path`` whose ``step`` is <= ``step`` (a line cut short by a
    killed writer is dropped), rewritten atomically; returns them. No file: []."""
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                kept.append(rec)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return [_from_json(r) for r in kept]


class MetricsLogger:
    """Appends step records to ``directory/metrics.jsonl`` (flushed at once) and keeps them
    for plotting. resume_step: go on after that step (the file's records up to it are
    kept, later ones dropped). tensorboard: also ``add_scalar`` every number of a record
    at its step, to ``directory/tensorboard``."""

    def __init__(self, directory: str, *, title: str = "", source_names=None, resume_step: int | None = None,
                 tensorboard: bool = False):
        self.directory = directory
        self.path = os.path.join(directory, "metrics.jsonl")
        self.plot_path = os.path.join(directory, "metrics.png")
        self.title = title
        self.source_names = source_names
        self.tb = None
        if tensorboard:
            self.tb = make_summary_writer(os.path.join(directory, "tensorboard"),
                                          purge_step=None if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.records: list[dict] = []
            self._f = open(self.path, "w", encoding="utf-8")
        else:
            self.records = truncate_jsonl(self.path, resume_step)
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: dict) -> dict:
        rec = _clean(record)
        self.records.append(rec)
        self._f.write(json.dumps(_to_json(rec), allow_nan=False) + "\n")
        self._f.flush()
        if self.tb is not None:
            step = rec.get("step", 0)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        return rec

    def sync(self) -> None:
        """fsync metrics.jsonl (before a checkpoint that covers its records)."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def plot(self) -> str | None:
        return plot_metrics(self.records, self.plot_path, title=self.title, source_names=self.source_names)

    def close(self):
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (non-finite values as floats again)."""
    with open(path, encoding="utf-8") as f:
        return [_from_json(json.loads(line)) for line in f if line.strip()]


def rolling(xs, k: int = 5):
    """Trailing mean over up to k values (None skipped)."""
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1):i + 1] if x is not None]
        out.append(sum(w) / len(w) if w else None)
    return out


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(records, path: str, *, title: str = "", source_names=None) -> str | None:
    """Six panels: rewards (multi, mono), held-out accuracy (multi, per source), gain and
    pooled std, loss and clip fraction, response length, time per phase. Written to a
    temporary file and renamed, so a viewer never sees half a PNG. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r for r in records if "step" in r]
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    ax = ax.ravel()
    for key, label in (("reward_multi", "multi-source rollouts"), ("reward_mono", "mono anchors")):
        x, y = _series(steps, key)
        if x:
            ax[0].plot(x, y, alpha=0.3)
            ax[0].plot(x, rolling(y, 10), label=label, color=ax[0].lines[-1].get_color())
    ax[0].set_title("reward (mean; line: 10-step mean)")
    evals = [r for r in steps if r.get("eval_acc_multi") is not None]
    if evals:
        x = [r["step"] for r in evals]
        ax[1].plot(x, [r["eval_acc_multi"] for r in evals], "o-", label="multi-source")
        k = 0
        while any(r.get(f"eval_acc_source_{k}") is not None for r in evals):
            name = source_names[k] if source_names and k < len(source_names) else f"source {k}"
            ax[1].plot(x, [r.get(f"eval_acc_source_{k}") for r in evals], "s--", label=f"{name} only")
            k += 1
        ax[1].set_ylim(-0.02, 1.02)
    ax[1].set_title("held-out accuracy (greedy)")
    for key, label in (("gain", "gain = mean(r) - mean(m)"), ("pooled_std", "pooled std"),
                       ("frac_zero_std_multi", "groups with equal multi rewards")):
        x, y = _series(steps, key)
        if x:
            ax[2].plot(x, rolling(y, 5), label=label)
    ax[2].axhline(0, color="grey", lw=0.5)
    ax[2].set_title("advantage statistics (5-step mean)")
    x, y = _series(steps, "loss")
    if x:
        ax[3].plot(x, y, label="loss")
    x, y = _series(steps, "clip_frac_high")
    if x:
        ax[3].plot(x, y, label="clip fraction (high)")
    ax[3].set_title("policy loss")
    for key, label in (("response_length", "multi rollouts"), ("anchor_response_length", "anchors")):
        x, y = _series(steps, key)
        if x:
            ax[4].plot(x, y, label=label)
    ax[4].set_title("response length (tokens)")
    phases = [k for k in ("time_generate", "time_reward", "time_advantage", "time_old_logp", "time_update")
              if any(r.get(k) is not None for r in steps)]
    if phases:
        x = [r["step"] for r in steps]
        ax[5].stackplot(x, *[[r.get(k) or 0.0 for r in steps] for k in phases],
                        labels=[k[5:] for k in phases])
    ax[5].set_title("time per step and phase (s)")
    for a in ax:
        a.set_xlabel("RL step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class NullLogger:
    """What ranks > 0 log to: ``MetricsLogger``'s interface (log / sync / plot / close,
    ``records``, ``path``), writing nothing; only rank 0 writes files."""

    def __init__(self, directory: str, **_):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.plot_path = None
        self.records: list[dict] = []

    def log(self, record: dict) -> dict:
        rec = _clean(record)
        self.records.append(rec)
        return rec

    def sync(self) -> None:
        pass

    def plot(self):
        return None

    def close(self) -> None:
        pass
