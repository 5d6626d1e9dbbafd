"""`mars check`: every available backend of every op against the reference on random data.

An op joins with one decorated function (like verl's registries):

    @register_check("policy_loss")
    def _(device, backend, rng) -> tuple[float, callable]:
        # returns (max abs error vs mars.reference, a zero-argument callable to time)
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .backends import NAMES, backends

CHECKS: dict[str, Callable] = {}
TOLERANCE = 1e-5  # fp32 contract: max abs error (relative for the loss), docs/README.md


def register_check(op: str):
    def deco(fn):
        CHECKS[op] = fn
        return fn
    return deco


def _median_us(fn, repeats: int = 20) -> float:
    fn()  # warm-up (compiles Triton kernels, allocates)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e6


def run_checks(ops=None, seed: int = 0, repeats: int = 20, out=print) -> bool:
    """Prints a table (op, backend, device, max error, median time); True when all pass."""
    try:  # registers the loss checks
        from . import loss  # noqa: F401
    except ImportError:
        pass
    table = backends()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok = True
    out(f"{'op':<28}{'backend':<11}{'device':<8}{'max error':>12}{'median us':>12}  status")
    for op, check in CHECKS.items():
        if ops and op not in ops:
            continue
        for device in devices:
            for name in NAMES:
                info = table[name]
                runs_here = (name in ("reference", "triton") or name == device.type)
                if not runs_here:
                    continue
                if not info.available:
                    out(f"{op:<28}{name:<11}{device.type:<8}{'-':>12}{'-':>12}  skipped: {info.reason}")
                    continue
                gen = torch.Generator().manual_seed(seed)
                err, fn = check(device, name, gen)
                us = _median_us(fn, repeats if name != "triton" or device.type != "cpu" else 2)
                good = err <= TOLERANCE
                ok &= good
                note = " (Triton interpreter: the time means nothing)" \
                    if name == "triton" and device.type == "cpu" else ""
                out(f"{op:<28}{name:<11}{device.type:<8}{err:>12.2e}{us:>12.1f}  "
                    f"{'ok' if good else 'FAIL'}{note}")
    return ok


@register_check("mono_anchored_advantage")
def _check_advantage(device, backend, gen):
    from . import reference
    from .advantage import mono_anchored_advantage
    prompts, G, K = 1024, 16, 2
    rewards = torch.randint(0, 2, (prompts * G,), generator=gen).float()
    rewards += torch.rand(prompts * G, generator=gen) * 0.1
    labels = torch.randperm(prompts * G, generator=gen) % prompts  # rows of a group anywhere
    anchors = torch.randint(0, 2, (prompts * K,), generator=gen).float()
    anchor_labels = torch.arange(prompts).repeat_interleave(K)
    args = [t.to(device) for t in (rewards, labels, anchors, anchor_labels)]
    ref = reference.mono_anchored_advantage(*args)
    run = lambda: mono_anchored_advantage(*args, backend=backend)  # noqa: E731
    return (run().double() - ref.double()).abs().max().item(), run


@register_check("policy_loss")
def _check_policy_loss(device, backend, gen):
    """fwd + bwd at 64 x 1024 fp32 with KL, dual clip and [B] advantages; error is the max
    over loss, metrics and gradient, relative to the reference's magnitude."""
    from . import reference
    from .loss import policy_loss
    B, T = 64, 1024
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + torch.randn(B, T, generator=gen) * 0.2
    ref = logp + torch.randn(B, T, generator=gen) * 0.2
    adv = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.2
    logp, old, ref, adv, mask = (t.to(device) for t in (logp, old, ref, adv, mask))
    kw = dict(ref_logp=ref, kl_coef=0.01, dual_clip=3.0, clip_high=0.28)

    def fwd_bwd(fn):
        x = logp.clone().requires_grad_()
        out = fn(x, old, adv, mask, **kw)
        out.loss.backward()
        return out, x.grad

    want, want_g = fwd_bwd(reference.policy_loss)
    run = lambda: fwd_bwd(lambda *a, **k: policy_loss(*a, backend=backend, **k))  # noqa: E731
    got, got_g = run()
    rel = lambda a, b: ((a.double() - b.double()).abs().max()  # noqa: E731
                        / b.double().abs().max().clamp(min=1e-30)).item()
    err = max([rel(got.loss, want.loss), rel(got_g, want_g)]
              + [rel(got.metrics[k], want.metrics[k]) for k in want.metrics
                 if want.metrics[k].item() != 0])
    return err, run


@register_check("fused_linear_policy_loss")
def _check_fused_linear_policy_loss(device, backend, gen):
    """fwd + bwd of the fused lm-head loss at 512 tokens x H 64 x V 4099 fp32 (bias,
    temperature 0.8, KL, a quarter of the tokens masked); error is the max over loss and
    the gradients of hidden, weight and bias, relative to the reference's magnitude."""
    from . import reference
    from .fused_linear import fused_linear_policy_loss
    B, T, H, V = 4, 128, 64, 4099
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.1
    bias = torch.randn(V, generator=gen) * 0.1
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.25
    old = -8.3 + torch.randn(B, T, generator=gen) * 0.2
    ref_logp = old + torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, generator=gen)
    hidden, weight, bias, ids, mask, old, ref_logp, adv = (
        t.to(device) for t in (hidden, weight, bias, ids, mask, old, ref_logp, adv))
    kw = dict(bias=None, temperature=0.8, ref_logp=ref_logp, kl_coef=0.01, clip_high=0.28)

    def fwd_bwd(fn):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = fn(leaves[0], leaves[1], ids, old, adv, mask, **dict(kw, bias=leaves[2]))
        return [out.loss] + list(torch.autograd.grad(out.loss, leaves))

    want = fwd_bwd(reference.fused_linear_policy_loss)
    run = lambda: fwd_bwd(lambda *a, **k: fused_linear_policy_loss(*a, backend=backend, **k))  # noqa: E731
    got = run()
    err = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()
              for a, b in zip(got, want))
    return err, run
