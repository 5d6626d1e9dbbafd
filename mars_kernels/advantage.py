"""Triton kernel of the mono-anchored advantage (docs/advantage.md).

Matches `mars.reference.advantage_dense`; sums and spreads in float64 like the C++ and
CUDA bodies, so the backends agree to the last fp32 bit on hard cases (large offsets,
tiny spreads). Rollouts and anchors are laid out
together, sorted by group (one stable sort of B + K keys, CSR offsets); one program per
group then shifts the pool by the group's first rollout (so identical values give exactly
0), sums, computes the two-pass spread, and writes each rollout's advantage back to its
original row. No atomics: deterministic.
"""
import numpy as np
import torch
import triton
import triton.language as tl


# eps arrives as its float64 bit pattern (an int argument: a Python float argument would be
# typed float32), so the launcher makes no tensor of it; do_not_specialize: a pattern equal
# to 1 must not become a constexpr.
@triton.jit(do_not_specialize=["eps_bits"])
def _advantage_kernel(x_ptr, off_ptr, ord_ptr, adv_ptr, mean_ptr, std_ptr, count_ptr, gain_ptr,
                      B, eps_bits, NORM_BY_STD: tl.constexpr, UNBIASED: tl.constexpr,
                      SINGLETON_RAW: tl.constexpr, BLOCK: tl.constexpr):
    # x = cat(rewards, anchors): element e < B is rollout e, e >= B is anchor e - B.
    g = tl.program_id(0)
    start = tl.load(off_ptr + g)
    end = tl.load(off_ptr + g + 1)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True)
    shift = tl.load(x_ptr + tl.load(ord_ptr + start))  # stable sort: the first rollout
    offs = tl.arange(0, BLOCK)
    acc_r = tl.zeros([BLOCK], dtype=tl.float64)
    acc_a = tl.zeros([BLOCK], dtype=tl.float64)
    cnt_r = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(start, end, BLOCK):  # pass 1: shifted sums, rollouts and anchors apart
        msk = j + offs < end
        e = tl.load(ord_ptr + j + offs, mask=msk, other=0)
        d = tl.load(x_ptr + e, mask=msk, other=0.0) - shift
        row = msk & (e < B)
        acc_r += tl.where(row, d, 0.0)
        acc_a += tl.where(msk & (e >= B), d, 0.0)
        cnt_r += row.to(tl.int32)
    sr = tl.sum(acc_r, axis=0)
    sa = tl.sum(acc_a, axis=0)
    n_int = end - start
    nr = tl.sum(cnt_r, axis=0).to(tl.float64)
    n = n_int.to(tl.float64)
    na = n - nr
    mu = (sr + sa) / n
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(start, end, BLOCK):  # pass 2: squared deviations from the pooled mean
        msk = j + offs < end
        e = tl.load(ord_ptr + j + offs, mask=msk, other=0)
        d = tl.load(x_ptr + e, mask=msk, other=0.0) - shift - mu
        acc += tl.where(msk, d * d, 0.0)
    ss = tl.sum(acc, axis=0)
    if UNBIASED:
        denom = tl.maximum(n - 1.0, 1.0)
    else:
        denom = n
    sigma = tl.where(n > 1.0, tl.sqrt(ss / denom), 0.0)
    for j in range(start, end, BLOCK):  # pass 3: advantages back to the original rows
        msk = j + offs < end
        e = tl.load(ord_ptr + j + offs, mask=msk, other=0)
        row = msk & (e < B)
        x = tl.load(x_ptr + e, mask=msk, other=0.0)
        centred = x - shift - mu
        if NORM_BY_STD:
            scale = sigma + eps
            a = tl.where(scale > 0.0, centred / tl.where(scale > 0.0, scale, 1.0), 0.0)
        else:
            a = centred
        if SINGLETON_RAW:
            single = x
        else:
            single = tl.zeros([BLOCK], dtype=tl.float64)
        a = tl.where(n > 1.0, a, single)
        tl.store(adv_ptr + e, a.to(tl.float32), mask=row)
    tl.store(mean_ptr + g, (shift + mu).to(tl.float32))
    tl.store(std_ptr + g, sigma.to(tl.float32))
    tl.store(count_ptr + g, n_int)
    gain = sr / nr - sa / tl.maximum(na, 1.0)
    tl.store(gain_ptr + g, tl.where(na > 0.0, gain, float("nan")).to(tl.float32))


def group_layout(index: torch.Tensor, num_groups: int):
    """(offsets [G+1] int64, order [n] int64): elements stably sorted by group, CSR offsets
    offsets[g] = first sorted position of a key >= g, by searchsorted: no host sync (a
    bincount would read the keys' maximum on the host), as the CUDA body does."""
    keys, order = torch.sort(index, stable=True)
    offsets = torch.searchsorted(keys, torch.arange(num_groups + 1, device=index.device))
    return offsets, order


def mono_anchored_advantage(rewards, group_index, anchor_rewards, anchor_index, num_groups: int,
                            norm_by_std: bool, eps: float, unbiased: bool, singleton_raw: bool):
    """Launcher. rewards [B], anchor_rewards [K]: float (computed in fp64); group_index [B],
    anchor_index [K]: int64 dense in [0, num_groups), each group with >= 1 rollout.
    Returns (advantages [B] f32, mean [G] f32, std [G] f32, count [G] i64, gain [G] f32)."""
    B, G, device = rewards.numel(), num_groups, rewards.device
    adv = torch.empty(B, dtype=torch.float32, device=device)
    mean, std, gain = (torch.empty(G, dtype=torch.float32, device=device) for _ in range(3))
    count = torch.empty(G, dtype=torch.long, device=device)
    if G == 0:
        return adv, mean, std, count, gain
    values = torch.cat([rewards.reshape(-1), anchor_rewards.reshape(-1)]).double()
    offsets, order = group_layout(torch.cat([group_index, anchor_index]), G)
    eps_bits = int(np.array([eps], dtype=np.float64).view(np.int64)[0])
    _advantage_kernel[(G,)](values, offsets, order, adv, mean, std, count, gain, B, eps_bits,
                            NORM_BY_STD=norm_by_std, UNBIASED=unbiased,
                            SINGLETON_RAW=singleton_raw, BLOCK=32)
    return adv, mean, std, count, gain
