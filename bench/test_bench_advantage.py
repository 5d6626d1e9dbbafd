"""Mono-anchored advantage: the cases of `mars bench --op advantage` (mars/bench/cases.py)
under pytest-benchmark: mars with int and uid-string labels, with and without anchors,
the reference, torch.compile of it, verl's functions and a per-group Python loop.

    pytest bench/test_bench_advantage.py --benchmark-only --benchmark-json=out.json
"""
import pytest

from conftest import cases_for, run_case


@pytest.mark.parametrize("device,size,impl", cases_for("advantage"))
def test_advantage(benchmark, device, size, impl):
    run_case(benchmark, "advantage", device, size, impl)
