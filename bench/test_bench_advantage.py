"""Mono-anchored advantage: mars kernels vs the reference, a per-group Python loop (the
reference implementation's style) and verl's GRPO functions, on the same batch.

    pytest bench/test_bench_advantage.py --benchmark-only --benchmark-json=out.json
    python bench/summarize.py out.json > summary.md      # ratios within one run

verl takes no anchors: it gets the same B rollouts (K = 0); mars is timed with and
without anchors. Labels are what each trainer passes: verl a numpy array of uid strings
(and, for its vectorised function, also int labels); mars the same strings and, as
TRL/plain loops have them, an int tensor.
"""
from collections import defaultdict

import numpy as np
import pytest
import torch

import mars
from conftest import HAS_GPU

SIZES = {"1024x(16+2)": (1024, 16, 2), "64x(8+2)": (64, 8, 2)}


def make(prompts, G, K, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (prompts * G,), generator=gen).float()
    labels = torch.randperm(prompts * G, generator=gen) % prompts
    anchors = torch.randint(0, 2, (prompts * K,), generator=gen).float()
    alabels = torch.arange(prompts).repeat_interleave(K)
    uid = np.array([f"uid-{i:08d}" for i in labels.tolist()], dtype=object)
    auid = np.array([f"uid-{i:08d}" for i in alabels.tolist()], dtype=object)
    return rewards.to(device), labels.to(device), anchors.to(device), alabels.to(device), uid, auid


def python_loop(rewards, uid, anchors, auid, eps=1e-6):
    """The reference implementation's shape: dict of lists per uid, torch per group."""
    scores = rewards.clone()
    pools = defaultdict(list)
    for i in range(len(scores)):
        pools[uid[i]].append(scores[i])
    for k in range(len(anchors)):
        pools[auid[k]].append(anchors[k])
    mean, std = {}, {}
    for key, pool in pools.items():
        t = torch.stack(pool)
        mean[key], std[key] = t.mean(), t.std()
    for i in range(len(scores)):
        scores[i] = (scores[i] - mean[uid[i]]) / (std[uid[i]] + eps)
    return scores


def _devices():
    return ["cpu"] + (["cuda"] if HAS_GPU else [])


CASES = [(size, dev, impl) for size in SIZES for dev in _devices()
         for impl in ("reference", "mars-int", "mars-noanchor-int", "mars-str",
                      "mars-noanchor-str", "verl",
                      "verl-vectorized", "verl-vectorized-int")
         + (("mars-cuda-int", "mars-triton-int") if dev == "cuda" else ("loop",))]


@pytest.mark.parametrize("size,device,impl", CASES)
def test_advantage(benchmark, size, device, impl):
    r, g, a, ag, uid, auid = make(*SIZES[size], device=device)
    benchmark.group = f"advantage {size} {device}"
    backend = {"mars-cuda-int": "cuda", "mars-triton-int": "triton"}.get(impl, "auto")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn):
        def run():
            out = fn()
            sync()
            return out
        return run

    if impl == "reference":
        fn = lambda: mars.reference.mono_anchored_advantage(r, g, a, ag)  # noqa: E731
    elif impl.startswith("mars") and impl.endswith("-int"):
        fn = lambda: mars.mono_anchored_advantage(r, g, a, ag, backend=backend)  # noqa: E731
    elif impl == "mars-str":
        fn = lambda: mars.mono_anchored_advantage(r, uid, a, auid)  # noqa: E731
    elif impl == "mars-noanchor-int":
        fn = lambda: mars.mono_anchored_advantage(r, g, singleton="raw")  # noqa: E731
    elif impl == "mars-noanchor-str":
        fn = lambda: mars.mono_anchored_advantage(r, uid, singleton="raw")  # noqa: E731
    elif impl == "loop":
        fn = lambda: python_loop(r, uid, a, auid)  # noqa: E731
    else:
        core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
        f = (core_algos.compute_grpo_outcome_advantage if impl == "verl"
             else core_algos.compute_grpo_vectorized_outcome_advantage)
        tok, mask = r[:, None], torch.ones_like(r)[:, None]  # T = 1: verl's cheapest case
        index = g.cpu().numpy() if impl.endswith("-int") else uid
        fn = lambda: f(tok, mask, index)  # noqa: E731
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                torch=torch.__version__, rows=len(r), anchors=len(a))
    rounds = 3 if impl == "loop" else None
    if rounds:
        benchmark.pedantic(timed(fn), rounds=rounds, iterations=1, warmup_rounds=1)
    else:
        benchmark(timed(fn))
