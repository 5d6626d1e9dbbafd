"""Clipped-ratio token loss, forward + backward: mars kernels vs the eager reference, verl's
functions and torch.compile of the reference, on the same batch (paper's GRPO setting:
clip 0.2 / 0.28, dual clip 3, k3 KL with beta 0.001, token-mean, [B] advantages).

    pytest bench/test_bench_policy_loss.py --benchmark-only --benchmark-json=out.json
    python bench/summarize.py out.json > summary.md      # ratios within one run

verl: compute_policy_loss_vanilla + agg_loss(kl_penalty(..., "low_var_kl")) on [B, T]
advantages (verl's layout; the broadcast is not timed). On a GPU each mars case also
records the bytes it must move and the measured device copy bandwidth (roofline).
"""
import pytest
import torch

import mars
from mars import reference
from conftest import HAS_GPU

SIZES = {"256x4096": (256, 4096), "64x1024": (64, 1024)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTS = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=1e-3, kl_type="k3",
            agg="token-mean")


def make(B, T, dtype, device):
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + torch.randn(B, T, generator=gen) * 0.1
    ref = logp + torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]           # right padding
    logp = torch.where(mask, logp, float("-inf"))                 # padding as a model gives it
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(logp), cast(old), cast(adv), mask.to(device), cast(ref)


def impls(device):
    out = ["reference", "verl", "compile-reference"]
    if device == "cpu":
        out.append("mars-cpu")
    else:
        out += ["mars-cuda", "mars-triton"]
    return out


CASES = [(s, d, dev, impl) for s in SIZES for d in DTYPES
         for dev in ["cpu"] + (["cuda"] if HAS_GPU else []) for impl in impls(dev)]


def copy_bandwidth(device):
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3)


@pytest.mark.parametrize("size,dtype,device,impl", CASES)
def test_policy_loss(benchmark, size, dtype, device, impl):
    B, T = SIZES[size]
    dt = DTYPES[dtype]
    logp, old, adv, mask, ref = make(B, T, dt, device)
    benchmark.group = f"policy_loss fwd+bwd {size} {dtype} {device}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if impl == "verl":
        core = pytest.importorskip("verl.trainer.ppo.core_algos")

        class Cfg(dict):
            __getattr__ = dict.__getitem__
        cfg = Cfg(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                  global_batch_info={})
        adv_bt = adv[:, None].expand(B, T).contiguous()
        maskf = mask.to(dt)
        logp = torch.where(mask, logp, 0.0)  # verl multiplies by the mask: -inf would give NaN

        def loss_fn(x):
            pg, _ = core.compute_policy_loss_vanilla(old, x, adv_bt, maskf, "token-mean", cfg)
            kl = core.agg_loss(core.kl_penalty(x, ref, "low_var_kl"), maskf, "token-mean")
            return pg + OPTS["kl_coef"] * kl
    elif impl == "reference":
        loss_fn = lambda x: reference.policy_loss(x, old, adv, mask, ref_logp=ref, **OPTS).loss  # noqa: E731
    elif impl == "compile-reference":
        compiled = torch.compile(reference.policy_loss, dynamic=False)
        loss_fn = lambda x: compiled(x, old, adv, mask, ref_logp=ref, **OPTS).loss  # noqa: E731
    else:
        backend = impl.split("-")[1]
        if not mars.backends()[backend].available:
            pytest.skip(mars.backends()[backend].reason)
        loss_fn = lambda x: mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref,  # noqa: E731
                                                   backend=backend, **OPTS).loss
        if device == "cuda":
            e = dt.itemsize
            moved = B * T * (3 * e + 1 + 4 + 4 + e) + B * e   # fwd reads 3 + mask, grad out/in, dlogp
            benchmark.extra_info["bytes_moved"] = moved
            benchmark.extra_info["copy_bandwidth_GBps"] = round(copy_bandwidth(device) / 1e9, 1)

    x = logp.clone().requires_grad_()

    def step():
        x.grad = None
        loss_fn(x).backward()
        sync()

    step()  # warm-up: compiles (Triton, torch.compile), allocates
    step()
    assert torch.isfinite(x.grad).all()
    benchmark.pedantic(step, rounds=12 if B * T > 10**5 else 40, warmup_rounds=1)
