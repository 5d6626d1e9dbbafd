"""mars.train.progress: one bar for warm start + RL, whose ETA covers both phases."""

import pytest

from mars.train import progress as prog
from mars.train.progress import RunProgress, format_seconds


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(prog.time, "perf_counter", c)
    return c


def test_eta_covers_the_warm_start_and_the_rl_steps(clock):
    p = RunProgress(10, 5, rl_guess_ratio=4.0)  # drawn on stderr (captured)
    assert p.eta() == (None, False)  # nothing timed yet
    for _ in range(4):
        clock.t += 0.5
        p.warm_step(loss="1")
    left, measured = p.eta()
    # 6 warm steps at 0.5 s, then 5 RL steps guessed at 4 x 0.5 s
    assert left == pytest.approx(6 * 0.5 + 5 * 2.0) and not measured
    for _ in range(6):
        clock.t += 0.5
        p.warm_step()
    clock.t += 7.0  # evaluation of step 0 before the first RL step: part of the RL time
    p.start_rl()
    clock.t += 3.0
    p.rl_step(reward="1")
    left, measured = p.eta()
    assert measured and left == pytest.approx(4 * 3.0)  # the measured RL step replaces the guess
    clock.t += 1.0
    p.rl_step()
    assert p.eta()[0] == pytest.approx(3 * 2.0)
    assert p.bar.n == 12 and p.bar.total == 15 and "eta=0m06s" in str(p.bar)
    p.close()


def test_resumed_run_counts_the_done_steps(clock):
    p = RunProgress(0, 100)
    p.start_rl(rl_done=60)
    assert p.bar.n == 60 and p.eta() == (None, False)
    clock.t += 2.0
    p.rl_step()
    assert p.eta() == (pytest.approx(39 * 2.0), True)
    p.close()


def test_format_seconds():
    assert format_seconds(0) == "0m00s" and format_seconds(61.4) == "1m01s"
    assert format_seconds(3725) == "1h02m" and format_seconds(-3) == "0m00s"
