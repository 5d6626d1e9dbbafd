"""Timing, memory and roofline measurements of `mars bench` (docs/bench.md, "How it measures").

Times are wall-clock per call: on CPU `time.perf_counter` around a block of calls, on a
GPU CUDA events around the block and a synchronize after it, so a kernel's time is
counted, not only its launch. A block repeats the call `inner` times (calibrated so that a
block lasts about `block_s`: sub-millisecond calls are not timed one by one), and the
implementations of one shape are interleaved round by round so that load from other jobs
on a shared machine hits them alike.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Stats:
    """Per-call seconds over `rounds` blocks of `inner` calls each."""
    median: float
    q1: float
    q3: float
    min: float
    rounds: int
    inner: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted values (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times: list[float], inner: int = 1) -> Stats:
    """Median, quartiles and min of per-call times; raises ValueError for none or a
    non-finite / negative time (a broken timer must not turn into a number)."""
    if not times:
        raise ValueError("times is empty: nothing was timed")
    bad = [t for t in times if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ValueError(f"times must be finite and >= 0, got {bad[:3]}")
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner!r}")
    s = sorted(times)
    return Stats(median=quantile(s, 0.5), q1=quantile(s, 0.25), q3=quantile(s, 0.75),
                 min=s[0], rounds=len(s), inner=inner)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable, inner: int, device: torch.device) -> float:
    """Seconds per call of `inner` back-to-back calls of fn (device work included)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


@dataclass(frozen=True)
class Plan:
    """How long to time: at most max_rounds blocks per implementation, at least min_rounds,
    and otherwise as many as fit in budget_s; blocks of about block_s."""
    max_rounds: int = 30
    min_rounds: int = 5
    budget_s: float = 2.0
    block_s: float = 0.005
    max_inner: int = 1000
    warmup: int = 2

    def __post_init__(self):
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {self.min_rounds}, "
                             f"{self.max_rounds}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (the first call compiles), got {self.warmup}")


QUICK = Plan(max_rounds=3, min_rounds=2, budget_s=0.05, block_s=0.001, max_inner=20, warmup=1)
FULL = Plan()


def measure(fns: dict[str, Callable], device: torch.device, plan: Plan = FULL) -> dict[str, Stats]:
    """Times every fn of `fns` (already warmed up by the caller or not: `plan.warmup` calls
    run first), interleaved: round r runs each fn's block once, starting at a rotating
    position; a fn leaves once it has its rounds."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(plan.warmup):
            fn()
        _sync(device)
    inner, rounds = {}, {}
    for name, fn in fns.items():
        t1 = time_block(fn, 1, device)
        inner[name] = max(1, min(plan.max_inner, int(plan.block_s / max(t1, 1e-9))))
        per_round = t1 * inner[name]
        rounds[name] = max(plan.min_rounds,
                           min(plan.max_rounds, int(plan.budget_s / max(per_round, 1e-9))))
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(max(rounds.values(), default=0)):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            if len(times[name]) < rounds[name]:
                times[name].append(time_block(fns[name], inner[name], device))
    return {name: summarize(times[name], inner[name]) for name in fns}


def count_syncs(fn: Callable) -> int:
    """Host-device synchronisations during one call of fn on a GPU, as CUDA's sync debug
    mode reports them (cudaStreamSynchronize, blocking device-to-host copies: .item(),
    nonzero, bincount ...)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    return sum("synchronizing" in str(w.message) for w in caught)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes per second of a device-to-device copy of a large tensor, read + write counted:
    the memory roof of the roofline."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    per_call = min(time_block(lambda: y.copy_(x), 10, device) for _ in range(3))
    del x, y
    return 2 * nbytes / per_call


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """FLOP per second of an n x n x n matmul in `dtype`: the compute roof for the lm-head ops."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    per_call = min(time_block(lambda: a @ b, 5, device) for _ in range(3))
    return 2 * n ** 3 / per_call
