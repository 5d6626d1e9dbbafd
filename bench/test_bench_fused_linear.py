"""Fused lm-head + log-softmax + policy loss: forward + backward time and peak memory of
mars vs the materialised-logits reference, Liger's chunked LigerFusedLinearGRPOLoss and the
same RL loss built on Cut Cross-Entropy's per-token -log p.

    pytest bench/test_bench_fused_linear.py --benchmark-only \\
        --benchmark-json=bench/results/fused_linear_cpu.json
    python bench/test_bench_fused_linear.py bench/results/fused_linear_cpu.json \\
        > bench/results/fused_linear_cpu.md

Every impl computes the same loss (token-mean = Liger's "dapo", clip 0.2/0.2, no KL) on the
same batch and returns grads for hidden and weight. Peak memory: CPU, the torch profiler's
running total of allocator bytes above the level at the start of the call (inputs
excluded, gradients and everything the call allocates included; BLAS scratch outside the
torch allocator is not seen); GPU, torch.cuda.max_memory_allocated above the start.
On CPU, CCE's Triton kernel does not run: its `torch_compile` impl is timed instead (it
materialises the logits: a CPU stand-in, not CCE's algorithm).
"""
import json
import os
import sys

import pytest
import torch

from conftest import HAS_GPU
from mars.memory import peak_allocated_bytes

SIZES = {
    "cpu": dict(B=4, T=512, H=256, V=32000, dtype=torch.float32, device="cpu"),
    "gpu": dict(B=8, T=2048, H=2048, V=151936, dtype=torch.bfloat16, device="cuda"),
}
IMPLS = ["mars", "reference", "liger", "cce", "mars-chunk128", "mars-chunk512", "mars-chunk1024"]


def make(B, T, H, V, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    old = (torch.randn(B, T, generator=g) * 0.1 - 10.4).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return hidden, weight, ids, mask, old, adv


def step_fn(impl, hidden, weight, ids, mask, old, adv):
    """One forward + backward; grads land in hidden.grad / weight.grad."""
    import mars
    from mars.fused_linear import fused_linear_policy_loss
    if impl.startswith("mars"):
        chunk = int(impl[len("mars-chunk"):]) if impl.startswith("mars-chunk") else None
        return lambda: fused_linear_policy_loss(hidden, weight, ids, old, adv, mask,
                                                chunk_size=chunk).loss.backward()
    if impl == "reference":
        return lambda: mars.reference.fused_linear_policy_loss(
            hidden, weight, ids, old, adv, mask).loss.backward()
    if impl == "liger":
        liger = pytest.importorskip("liger_kernel.chunked_loss")
        crit = liger.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                              compiled=hidden.is_cuda)

        def run():
            loss, _ = crit(hidden, weight, ids, mask, adv, old_per_token_logps=old)
            loss.backward()
        return run
    if impl == "cce":
        cce = pytest.importorskip("cut_cross_entropy")
        impl_name = "cce" if hidden.is_cuda else "torch_compile"

        def run():
            B, T, H = hidden.shape
            nll = cce.linear_cross_entropy(hidden.reshape(B * T, H), weight, ids.reshape(-1),
                                           reduction="none", impl=impl_name)
            mars.loss.policy_loss(-nll.reshape(B, T).float(), old, adv, mask).loss.backward()
        return run
    raise ValueError(impl)


def peak_bytes(fn, device):
    return peak_allocated_bytes(fn, device)


CASES = [("cpu", i) for i in IMPLS] + [("gpu", i) for i in IMPLS[:4]]


@pytest.mark.parametrize("size,impl", CASES)
def test_fused_linear(benchmark, size, impl):
    cfg = SIZES[size]
    if cfg["device"] == "cuda" and not HAS_GPU:
        pytest.skip("needs a CUDA device")
    hidden, weight, ids, mask, old, adv = make(**cfg)
    fn = step_fn(impl, hidden, weight, ids, mask, old, adv)
    sync = torch.cuda.synchronize if cfg["device"] == "cuda" else (lambda: None)

    def run():
        hidden.grad = weight.grad = None
        fn()
        sync()

    try:
        run()  # warm-up: compiles, allocates; also checks the impl runs here
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run on this device
        pytest.skip(f"{impl} does not run here: {type(exc).__name__}: {str(exc)[:200]}")
    hidden.grad = weight.grad = None
    peak = peak_bytes(fn, cfg["device"])
    B, T, H, V = cfg["B"], cfg["T"], cfg["H"], cfg["V"]
    benchmark.group = f"fused_linear {size} tokens={B * T} H={H} V={V} {cfg['dtype']}".replace("torch.", "")
    benchmark.extra_info.update(peak_MiB=round(peak / 2**20, 1),
                                logits_fp32_MiB=round(B * T * V * 4 / 2**20, 1),
                                device=torch.cuda.get_device_name() if cfg["device"] == "cuda"
                                else f"cpu x{torch.get_num_threads()} threads",
                                loadavg_1min=round(os.getloadavg()[0], 2))
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=0)


INTERLEAVED_ROUNDS = 5


def test_fused_linear_interleaved(benchmark):
    """CPU: every impl once per round, round after round, so that load from other jobs on
    this shared machine hits all impls alike; medians per impl go to extra_info (the timed
    benchmark itself is one round of all impls)."""
    import time
    cfg = SIZES["cpu"]
    args = make(**cfg)
    fns = {}
    for impl in IMPLS:
        try:
            fn = step_fn(impl, *args)
            args[0].grad = args[1].grad = None
            fn()  # warm-up
            fns[impl] = fn
        except Exception:  # noqa: BLE001 - a peer that cannot run here is left out
            continue
    times = {impl: [] for impl in fns}

    def one_round():
        for impl, fn in fns.items():
            args[0].grad = args[1].grad = None
            t0 = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t0)

    benchmark.group = "fused_linear cpu interleaved"
    benchmark.pedantic(one_round, rounds=INTERLEAVED_ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        median_ms={k: round(sorted(v)[len(v) // 2] * 1e3, 1) for k, v in times.items()},
        min_ms={k: round(min(v) * 1e3, 1) for k, v in times.items()},
        rounds=INTERLEAVED_ROUNDS, loadavg_1min=round(os.getloadavg()[0], 2))


def summarize(path):
    """Markdown: per group, median time, peak memory, ratios vs the reference and Liger."""
    data = json.load(open(path))
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    info = data.get("machine_info", {})
    lines = [f"# Fused lm-head + policy loss: fwd + bwd ({os.path.basename(path)})", "",
             f"machine: {info.get('cpu', {}).get('brand_raw', '?')}, "
             f"{info.get('cpu', {}).get('count', '?')} cores; torch {torch.__version__}; "
             f"date {data.get('datetime', '?')}", ""]
    for b in groups.pop("fused_linear cpu interleaved", []):
        med, mn = b["extra_info"]["median_ms"], b["extra_info"]["min_ms"]
        lines += ["## Interleaved (CPU): each round runs every impl once; medians over "
                  f"{b['extra_info']['rounds']} rounds", "",
                  "Robust to the load of other jobs on this shared machine (it hits every impl "
                  "alike); the per-impl groups below ran one impl after another.", "",
                  "| impl | median | min | time / reference | time / liger |", "|---|---|---|---|---|"]
        for k in sorted(med, key=med.get):
            rr = lambda o: f"{med[k] / med[o]:.2f}" if o in med else "-"  # noqa: E731
            lines.append(f"| {k} | {med[k]:.0f} ms | {mn[k]:.0f} ms | {rr('reference')} | {rr('liger')} |")
        lines.append("")
    for group, rows in sorted(groups.items()):
        name = lambda b: b["param"].split("-", 1)[1]  # noqa: E731
        by = {name(b): b for b in rows}
        ref, lig = by.get("reference"), by.get("liger")
        lines += [f"## {group}", "",
                  f"one [tokens, V] fp32 logits buffer: {rows[0]['extra_info']['logits_fp32_MiB']} MiB; "
                  f"device: {rows[0]['extra_info']['device']}; 1-min load average when each "
                  "impl started (other jobs share this machine): "
                  + ", ".join(f"{name(b)} {b['extra_info'].get('loadavg_1min', '?')}" for b in rows), "",
                  "| impl | median fwd+bwd | min | peak memory | time / reference | time / liger "
                  "| memory / reference | memory / liger |", "|---|---|---|---|---|---|---|---|"]
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            s, pk = b["stats"], b["extra_info"]["peak_MiB"]
            r = lambda o, k: "-" if o is None else (  # noqa: E731
                f"{s['median'] / o['stats']['median']:.2f}" if k == "t"
                else f"{pk / o['extra_info']['peak_MiB']:.3f}")
            lines.append(f"| {name(b)} | {s['median'] * 1e3:.0f} ms | {s['min'] * 1e3:.0f} ms | "
                         f"{pk:.1f} MiB | {r(ref, 't')} | {r(lig, 't')} | {r(ref, 'm')} | "
                         f"{r(lig, 'm')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
