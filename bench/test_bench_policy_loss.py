"""Clipped-ratio token loss, forward + backward: the cases of `mars bench --op policy_loss`
(mars/bench/cases.py) under pytest-benchmark: each mars backend, the eager reference,
torch.compile of it and verl's functions, fp32 and bf16.

    pytest bench/test_bench_policy_loss.py --benchmark-only --benchmark-json=out.json
"""
import pytest

from conftest import cases_for, run_case


@pytest.mark.parametrize("device,size,impl", cases_for("policy_loss"))
def test_policy_loss(benchmark, device, size, impl):
    run_case(benchmark, "policy_loss", device, size, impl)
