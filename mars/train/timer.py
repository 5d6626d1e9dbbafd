"""``PhaseTimer``: the wall time of an RL step's phases, as the ``time_*`` metrics.

    timer = PhaseTimer()
    with timer("generate"):          # a phase may be entered several times: its times add up
        ...
    timer.stop("step")               # the time since the timer was made, as phase "step"
    timer.as_metrics()               # {"time_generate": s, ..., "time_step": s}, in first-entry order
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["PhaseTimer"]


class PhaseTimer:
    def __init__(self):
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self.seconds.setdefault(phase, 0.0)  # the key's place: the first time the phase is entered
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def stop(self, phase: str) -> float:
        """Record the time since the timer was made as ``phase``; returns it."""
        self.seconds[phase] = time.perf_counter() - self.started
        return self.seconds[phase]

    def as_metrics(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.seconds.items()}
