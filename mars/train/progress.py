"""One progress bar for a whole ``mars train`` run: warm start, then RL, with the ETA of both.

tqdm's own ETA extrapolates one rate, but a warm-start step (one supervised forward and
backward) is several times cheaper than an RL step (generation, old log-probs, update,
evaluations), so the bar counts both kinds of steps and shows its own estimate of the
time left: ``warm steps left x measured warm-step time + RL steps left x RL-step time``.
The RL-step time is the mean of the RL steps timed so far (evaluation included); before
the first one it is a guess, the warm-step time scaled by the ratio of rows each step
pushes through the model (shown as ``eta ~...``), replaced by the measurement at step 1.
"""

from __future__ import annotations

import time

__all__ = ["RunProgress", "format_seconds"]


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunProgress:
    """``warm_steps`` warm-start steps then RL steps ``start..max_steps`` in one bar.
    ``rl_guess_ratio``: RL-step time / warm-step time assumed until an RL step is timed.
    ``enabled`` False (log.progress, ranks other than 0): nothing is drawn; ``write``
    still prints."""

    def __init__(self, warm_steps: int, rl_steps: int, *, rl_guess_ratio: float = 8.0, enabled: bool = True):
        from tqdm.auto import tqdm

        self.warm_total, self.rl_total = warm_steps, rl_steps
        self.warm_done, self.rl_done = 0, 0
        self.ratio = rl_guess_ratio
        self._warm_time = self._rl_time = 0.0
        self._rl_timed = 0
        self._last = time.perf_counter()
        self.bar = tqdm(total=warm_steps + rl_steps, disable=not enabled, dynamic_ncols=True,
                        unit="step", desc="mars train (warm start)" if warm_steps else "mars train (RL)",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def eta(self) -> tuple[float | None, bool]:
        """(seconds left, measured: False while the RL-step time is still the guess)."""
        warm_left = self.warm_total - self.warm_done
        rl_left = self.rl_total - self.rl_done
        t_warm = self._warm_time / self.warm_done if self.warm_done else None
        if self._rl_timed:
            t_rl, measured = self._rl_time / self._rl_timed, True
        elif t_warm is not None:
            t_rl, measured = t_warm * self.ratio, False
        else:
            return None, False
        return warm_left * (t_warm or 0.0) + rl_left * t_rl, measured

    def _tick(self) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        return dt

    def start_rl(self, rl_done: int = 0) -> None:
        """The warm start is over (or skipped): the clock of the first RL step starts now;
        ``rl_done`` RL steps are already done (a resumed run)."""
        self.warm_total = self.warm_done
        self.rl_done = rl_done
        self.bar.total = self.warm_total + self.rl_total
        self.bar.n = self.warm_done + rl_done
        self.bar.set_description_str("mars train (RL)", refresh=False)
        self._tick()

    def warm_step(self, **postfix) -> None:
        self._warm_time += self._tick()
        self.warm_done += 1
        self._update(postfix)

    def rl_step(self, **postfix) -> None:
        self._rl_time += self._tick()
        self._rl_timed += 1
        self.rl_done += 1
        self._update(postfix)

    def _update(self, postfix: dict) -> None:
        left, measured = self.eta()
        if left is not None:
            postfix = {**postfix, "eta": ("" if measured else "~") + format_seconds(left)}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        self.bar.close()
