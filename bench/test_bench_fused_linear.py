"""Fused lm-head + policy loss (forward + backward) and token log-probs (forward): the cases
of `mars bench --op fused_lm_head --op token_logprobs` (mars/bench/cases.py) under
pytest-benchmark, peak memory in extra_info: mars, the materialised-logits reference,
torch.compile of it, Liger, Cut Cross-Entropy and verl where they run on the device.

    pytest bench/test_bench_fused_linear.py --benchmark-only --benchmark-json=out.json
"""
import pytest

from conftest import cases_for, run_case


@pytest.mark.parametrize("device,size,impl", cases_for("fused_lm_head"))
def test_fused_lm_head(benchmark, device, size, impl):
    run_case(benchmark, "fused_lm_head", device, size, impl)


@pytest.mark.parametrize("device,size,impl", cases_for("token_logprobs"))
def test_token_logprobs(benchmark, device, size, impl):
    run_case(benchmark, "token_logprobs", device, size, impl)
