"""mars.loss.policy_loss: the reference (gradcheck, hand formulas), every kernel backend vs
the reference in float64 (each option, each aggregation, [B] / [B, T] advantages, empty
rows, shapes 1x1 .. 64x3000), poisoned outputs, bf16/fp16, grad accumulation, bad input,
determinism, torch.compile. Peer parity (verl, TRL, Liger): tests/test_policy_loss_peers.py."""
import itertools

import pytest
import torch

import mars
from mars import reference
from mars.reference import LOSS_AGGS, LOSS_METRICS
from conftest import HAS_GPU, gpu

KERNELS = [b for b in ("cpu", "triton") if mars.backends()[b].available]
DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def kernel_cases():
    """(backend, device) pairs that run here: cpu on CPU, triton anywhere, cuda on GPU."""
    out = [("cpu", "cpu")] if mars.backends()["cpu"].available else []
    if mars.backends()["triton"].available:
        out.append(("triton", "cuda" if HAS_GPU else "cpu"))
    if mars.backends()["cuda"].available:
        out.append(("cuda", "cuda"))
    return out


CASES = kernel_cases()
CASE_IDS = [f"{b}-{d}" for b, d in CASES]


def batch(B, T, *, seed=0, dtype=torch.float64, adv_2d=False, p_mask=0.3, empty_rows=True,
          poison_masked=True, spread=0.3, device="cpu"):
    """Random rollout tensors. Masked positions hold -inf / NaN / garbage (they must not
    matter); some rows are empty; advantages include exact zeros."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn((B, T) if adv_2d else (B,), generator=g, dtype=torch.float64)
    adv[torch.rand(adv.shape, generator=g) < 0.1] = 0.0
    mask = torch.rand(B, T, generator=g) > p_mask
    if empty_rows and B > 2:
        mask[torch.randperm(B, generator=g)[: max(1, B // 5)]] = False
    if poison_masked:
        junk = torch.tensor([float("-inf"), float("nan"), 1e30, float("inf")], dtype=torch.float64)
        fill = junk[torch.randint(0, 4, (B, T), generator=g)]
        logp = torch.where(mask, logp, fill)
        old = torch.where(mask, old, fill.flip(0) if B > 1 else fill)
        ref = torch.where(mask, ref, fill)
        if adv_2d:
            adv = torch.where(mask, adv, fill)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(logp).requires_grad_(), cast(old), cast(adv), mask.to(device), cast(ref))


def run(backend, logp, old, adv, mask, **kw):
    out = mars.loss.policy_loss(logp, old, adv, mask, backend=backend, **kw)
    grad, = torch.autograd.grad(out.loss, logp, allow_unused=False)
    return out, grad


def assert_close(a, b, rtol=1e-9, atol=1e-12, what=""):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol, msg=what)


def compare(backend, device, B, T, rtol=1e-9, atol=1e-12, dtype=torch.float64, seed=0,
            adv_2d=False, **kw):
    logp, old, adv, mask, ref = batch(B, T, seed=seed, adv_2d=adv_2d, dtype=dtype, device=device)
    if kw.get("kl_coef", 0) or kw.pop("with_ref", True):
        kw.setdefault("ref_logp", ref)
    want, want_g = run("reference", logp, old, adv, mask, **kw)
    got, got_g = run(backend, logp, old, adv, mask, **kw)
    assert got.loss.dtype == want.loss.dtype and got.loss.dim() == 0
    assert got_g.dtype == logp.dtype and got_g.device == logp.device
    assert torch.isfinite(got.loss) and torch.isfinite(got_g).all()
    assert_close(got.loss, want.loss, rtol, atol, f"loss {backend} {kw}")
    assert_close(got_g, want_g, rtol, atol, f"grad {backend} {kw}")
    assert sorted(got.metrics) == sorted(LOSS_METRICS)
    for k in LOSS_METRICS:
        assert got.metrics[k].dim() == 0
        assert_close(got.metrics[k], want.metrics[k], rtol, atol, f"metric {k} {backend} {kw}")
    return want, got


# ----------------------------------------------------------------------------- reference

def naive_policy_loss(logp, old, adv, mask, ref, clip_low, clip_high, dual_clip, kl_coef,
                      kl_type, agg, clamp=20.0, num_tokens=None, num_seqs=None, loss_scale=None):
    """The formulas of docs/loss.md with Python floats, token by token (independent of the reference)."""
    import math
    B, T = len(mask), len(mask[0])
    rows, lens = [], []
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            lr = logp[i][t] - old[i][t]
            if clamp is not None:
                lr = max(-clamp, min(clamp, lr))
            r = math.exp(lr)
            l = max(-a * r, -a * max(1 - clip_low, min(1 + clip_high, r)))
            if dual_clip is not None and a < 0:
                l = min(l, -a * dual_clip)
            if kl_coef:
                d = ref[i][t] - logp[i][t]
                if kl_type == "k1":
                    k = -d
                elif kl_type == "k2":
                    k = d * d / 2
                else:
                    d = max(-20, min(20, d))
                    k = max(-10, min(10, math.exp(d) - d - 1))
                l += kl_coef * k
            s, n = s + l, n + 1
        rows.append(s)
        lens.append(n)
    nseq = num_seqs or max(sum(1 for n in lens if n), 1)
    if agg == "token-mean":
        return sum(rows) / (num_tokens or max(sum(lens), 1))
    if agg == "token-sum":
        return sum(rows)
    if agg == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(rows, lens) if n) / nseq
    out = sum(rows) / nseq
    return out / (loss_scale or T) if agg == "seq-mean-token-sum-norm" else out


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_reference_matches_naive_formula(agg, kl_type):
    logp, old, adv, mask, ref = batch(6, 9, seed=3, adv_2d=kl_type == "k2", spread=0.6)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_type=kl_type, agg=agg)
    got = reference.policy_loss(logp, old, adv, mask, ref_logp=ref, **kw).loss
    want = naive_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                             ref.tolist(), **kw)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_reference_gspo_matches_formula():
    """log w_i = clamp(sum_t m (logp - old) / L_i); every token of row i uses exp(log w_i)."""
    logp, old, adv, mask, _ = batch(5, 7, seed=4)
    out = reference.policy_loss(logp, old, adv, mask, ratio_level="sequence", agg="token-sum")
    want = 0.0
    for i in range(5):
        m = mask[i]
        if not m.any():
            continue
        w = ((logp[i][m] - old[i][m]).sum() / m.sum()).exp().item()
        a = adv[i].item()
        want += m.sum().item() * max(-a * w, -a * min(max(w, 0.8), 1.2))
    assert out.loss.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_reference_gradcheck(agg, ratio_level):
    logp, old, adv, mask, ref = batch(4, 6, seed=5, poison_masked=False, spread=0.4)
    def f(x):
        return reference.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1, dual_clip=2.0,
                                     clip_high=0.28, agg=agg, ratio_level=ratio_level).loss
    assert torch.autograd.gradcheck(f, (logp.detach().requires_grad_(),), eps=1e-7, atol=1e-6)


def test_reference_metrics_by_hand():
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, 1.0, 0.0, -5.0]], dtype=torch.float64)  # ratios e, 1/e, 1, e^5
    mask = torch.tensor([[True, True, True, False]])
    for a, high, low, dual in ((1.0, 1 / 3, 0.0, 0.0), (-1.0, 0.0, 1 / 3, 1 / 3)):
        out = reference.policy_loss(logp, old, torch.tensor([a], dtype=torch.float64), mask,
                                    dual_clip=2.0)
        assert out.metrics["clip_frac_high"].item() == pytest.approx(high)
        assert out.metrics["clip_frac_low"].item() == pytest.approx(low)
        assert out.metrics["dual_clip_frac"].item() == pytest.approx(dual)
        assert out.metrics["num_tokens"].item() == 3
        assert out.metrics["approx_kl"].item() == pytest.approx((-1 + 1 + 0) / 3)
    # A < 0, ratio e > dual clip 2: loss capped at -A c = 2, gradient 0 there
    out = reference.policy_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), mask,
                                dual_clip=2.0, agg="token-sum")
    assert out.metrics["dual_clip_frac"].item() == pytest.approx(1 / 3)
    assert out.loss.item() == pytest.approx(2.0 + 0.8 + 1.0)


# ------------------------------------------------------------------ kernels vs reference

OPTION_GRID = [dict(agg=agg, ratio_level=rl, adv_2d=a2) for agg, rl, a2 in
               itertools.product(LOSS_AGGS, ["token", "sequence"], [False, True])]


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("opt", OPTION_GRID, ids=lambda o: f"{o['agg']}-{o['ratio_level']}-"
                         f"{'BT' if o['adv_2d'] else 'B'}")
def test_kernel_matches_reference(backend, device, opt):
    """Each aggregation x ratio level x advantage layout, with the other options cycling."""
    k = OPTION_GRID.index(opt)
    extra = [dict(kl_coef=0.1, kl_type="k3", dual_clip=3.0),
             dict(kl_coef=0.05, kl_type="k1", clip_high=0.28),
             dict(kl_coef=0.2, kl_type="k2", log_ratio_clamp=None),
             dict(dual_clip=10.0, log_ratio_clamp=0.5, clip_low=0.1),
             dict(with_ref=False)][k % 5]
    compare(backend, device, 7, 45, seed=k, adv_2d=opt["adv_2d"], agg=opt["agg"],
            ratio_level=opt["ratio_level"], **extra)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kw", [dict(kl_type="k1"), dict(kl_type="k2"), dict(kl_type="k3"),
                                dict(kl_type="k3", log_ratio_clamp=None, dual_clip=1.5),
                                dict(clip_low=0.0, clip_high=0.0), dict(clip_low=0.2, clip_high=5.0),
                                dict(log_ratio_clamp=0.1, ratio_level="sequence")],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_kernel_options(backend, device, kw):
    compare(backend, device, 9, 33, seed=11, kl_coef=0.3, **kw)


def test_k3_numerics_match_verl_clamps():
    """k3 on huge log-ratio differences: d clamped to +-20, k3 to [-10, 10], grads finite."""
    logp = torch.tensor([[-30.0, 0.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.0, -40.0, -3.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for backend in ["reference"] + KERNELS:
        out = mars.loss.policy_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64),
                                    mask, ref_logp=ref, kl_coef=1.0, agg="token-sum", backend=backend)
        g, = torch.autograd.grad(out.loss, logp)
        assert out.loss.item() == pytest.approx(10 + 10 + (torch.e ** -3 + 3 - 1) + 0)  # k3 capped at 10
        assert g.tolist()[0] == pytest.approx([0.0, 0.0, -(torch.e ** -3 - 1), 0.0])


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (3, 17), (2, 1025), (13, 257),
                                   (64, 3000)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_shapes(backend, device, shape):
    B, T = shape
    for adv_2d in (False, True):
        compare(backend, device, B, T, seed=B * T, adv_2d=adv_2d, kl_coef=0.1, dual_clip=3.0,
                agg="seq-mean-token-mean", rtol=1e-8)
    compare(backend, device, B, T, seed=B + T, agg="token-mean", ratio_level="sequence",
            rtol=1e-8)


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_all_masked_and_empty(backend, device):
    """No valid token: loss 0, metrics 0, gradient 0, nothing NaN, every mode."""
    logp, old, adv, mask, ref = batch(4, 6, device=device)
    mask = torch.zeros_like(mask)
    for agg in LOSS_AGGS:
        out, g = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg)
        assert out.loss.item() == 0.0 and (g == 0).all()
        assert all(v.item() == 0.0 for v in out.metrics.values())
    empty = logp.new_zeros(0, 5).requires_grad_()
    out = mars.loss.policy_loss(empty, empty.detach(), empty.new_zeros(0), torch.zeros(0, 5, dtype=torch.bool, device=device), backend=backend)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_fp32(backend, device, dtype):
    """fp32 / bf16 / fp16 inputs: fp32 loss; vs the reference on the same inputs (fp32 math)
    within the accuracy contract's 1e-5 (relative; docs/README.md); bf16/fp16 gradients within one rounding."""
    logp, old, adv, mask, ref = batch(16, 300, seed=7, dtype=dtype, device=device)
    kw = dict(ref_logp=ref, kl_coef=0.01, dual_clip=3.0, agg="token-mean")
    want, want_g = run("reference", logp, old, adv, mask, **kw)
    got, got_g = run(backend, logp, old, adv, mask, **kw)
    assert got.loss.dtype == torch.float32 and got_g.dtype == dtype
    assert_close(got.loss, want.loss, 1e-5, 1e-7, "loss")
    eps = torch.finfo(dtype).eps
    assert_close(got_g, want_g, 2 * eps if dtype != torch.float32 else 1e-5, 1e-9, "grad")
    for k in LOSS_METRICS:
        assert_close(got.metrics[k], want.metrics[k], 1e-5, 1e-6, k)


def test_mixed_input_dtypes():
    """bf16 logp with fp32 old/ref logp: computed in the promoted dtype, grad in bf16."""
    logp, old, adv, mask, ref = batch(4, 20, dtype=torch.float32)
    lb = logp.detach().bfloat16().requires_grad_()
    for backend in ["reference"] + KERNELS:
        out = mars.loss.policy_loss(lb, old, adv, mask, ref_logp=ref, kl_coef=0.1, backend=backend)
        g, = torch.autograd.grad(out.loss, lb)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_mixed_dtypes_match_reference_numbers_and_dtype(backend, device):
    """Inputs of different dtypes are computed as the reference computes them (cast to fp32,
    fp64 only for fp64 logp): fp32 advantages next to bf16 log-probs are not rounded to
    bf16, and an fp64 old_logp does not turn an fp32 logp's loss into fp64."""
    logp, old, adv, mask, ref = batch(4, 20, dtype=torch.float32, device=device)
    cases = [(logp.detach().bfloat16(), old.bfloat16(), adv, ref.bfloat16()),
             (logp.detach(), old.double(), adv.double(), ref)]
    for lp, o, a, r in cases:
        lp = lp.requires_grad_()
        kw = dict(ref_logp=r, kl_coef=0.1)
        want, want_g = run("reference", lp, o, a, mask, **kw)
        got, got_g = run(backend, lp, o, a, mask, **kw)
        assert got.loss.dtype == want.loss.dtype == torch.float32
        assert_close(got.loss, want.loss, 1e-5, 1e-7, "loss")
        eps = torch.finfo(lp.dtype).eps
        assert_close(got_g, want_g, 2 * eps if lp.dtype != torch.float32 else 1e-5, 1e-9, "grad")


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_zero_length_responses_give_zero_loss(backend, ratio_level):
    """T = 0: every aggregation gives loss 0 (seq-mean-token-sum-norm's default loss_scale
    is T, which must not give 0 / 0 = NaN)."""
    logp = torch.zeros(3, 0, requires_grad=True)
    for agg in LOSS_AGGS:
        out = mars.loss.policy_loss(logp, logp.detach(), torch.zeros(3), torch.zeros(3, 0, dtype=torch.bool),
                                    agg=agg, ratio_level=ratio_level, backend=backend)
        out.loss.backward()
        assert out.loss.item() == 0.0, agg


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_poisoned_outputs(backend, device, poison):
    """Kernels write every element of the buffers they allocate (NaN-filled while poisoned)."""
    for agg, rl in (("token-mean", "token"), ("seq-mean-token-mean", "sequence")):
        logp, old, adv, mask, ref = batch(6, 37, seed=2, device=device)
        out, g = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg,
                     ratio_level=rl)
        assert torch.isfinite(g).all() and torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.metrics.values())
        loss, metrics, dlogp = mars.loss.policy_loss_parts(logp, old, adv, mask, ref_logp=ref,
                                                           kl_coef=0.1, agg=agg, ratio_level=rl,
                                                           backend=backend)
        assert torch.isfinite(dlogp).all() and (dlogp[~mask] == 0).all()
        assert_close(dlogp, g, 1e-12, 1e-15, "policy_loss_parts dlogp")


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
def test_nan_inf_under_mask_give_finite_grads(backend, device):
    logp, old, adv, mask, ref = batch(8, 50, seed=9, device=device, dtype=torch.float32)
    for agg in LOSS_AGGS:
        for rl in ("token", "sequence"):
            out, g = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, agg=agg,
                         ratio_level=rl, log_ratio_clamp=None)
            assert torch.isfinite(out.loss) and torch.isfinite(g).all() and (g[~mask] == 0).all()
            assert all(torch.isfinite(v) for v in out.metrics.values())


# ---------------------------------------------------------------- gradient accumulation

def split_normalisers(mask, agg):
    n_tok = mask.sum().item()
    n_seq = mask.any(-1).sum().item()
    return dict(num_tokens=n_tok, num_seqs=n_seq, loss_scale=mask.shape[1] * 1.0)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("tensor_norm", [False, True])
def test_grad_accumulation_equals_whole_batch(backend, agg, tensor_norm):
    """Micro-batches with the whole batch's normalisers sum to the whole batch's loss and
    gradient (every mode; normalisers as numbers or as tensors, e.g. all-reduced)."""
    logp, old, adv, mask, ref = batch(12, 40, seed=21)
    kw = dict(ref_logp=ref, kl_coef=0.05, dual_clip=3.0, agg=agg)
    whole, whole_g = run(backend, logp, old, adv, mask, loss_scale=40.0, **kw)
    norms = split_normalisers(mask, agg)
    if tensor_norm:
        norms = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in norms.items()}
    total, grad = 0.0, torch.zeros_like(logp)
    for rows in (slice(0, 5), slice(5, 6), slice(6, 12)):
        x = logp.detach()[rows].clone().requires_grad_()
        out = mars.loss.policy_loss(x, old[rows], adv[rows], mask[rows], backend=backend,
                                    **{**kw, "ref_logp": ref[rows]}, **norms)
        out.loss.backward()
        total += out.loss.item()
        grad[rows] = x.grad
    assert total == pytest.approx(whole.loss.item(), rel=1e-10, abs=1e-12)
    assert_close(grad, whole_g, 1e-10, 1e-13, "accumulated grad")


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_bad_input(backend):
    logp, old, adv, mask, ref = batch(3, 5)
    f = lambda **kw: mars.loss.policy_loss(**{**dict(logp=logp, old_logp=old, advantages=adv,  # noqa: E731
                                                  mask=mask, backend=backend), **kw})
    with pytest.raises(ValueError, match="old_logp"):
        f(old_logp=old[:, :4])
    with pytest.raises(ValueError, match="advantages"):
        f(advantages=adv[:2])
    with pytest.raises(ValueError, match="mask"):
        f(mask=mask[:2])
    with pytest.raises(ValueError, match="logp"):
        f(logp=logp[0])
    with pytest.raises(ValueError, match="ref_logp"):
        f(kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logp"):
        f(ref_logp=ref.T, kl_coef=0.1)
    with pytest.raises(ValueError, match="token-mean.*seq-mean-token-sum-norm"):
        f(agg="seq-mean")
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        f(kl_type="k4", ref_logp=ref, kl_coef=0.1)
    with pytest.raises(ValueError, match="ratio_level"):
        f(ratio_level="seq")
    with pytest.raises(ValueError, match="dual_clip"):
        f(dual_clip=0.5)
    with pytest.raises(ValueError, match="num_tokens"):
        f(num_tokens=0)
    with pytest.raises(ValueError, match="old_logp"):
        f(old_logp=old.int())
    with pytest.raises(ValueError, match="log_ratio_clamp"):
        f(log_ratio_clamp=-1.0)
    if HAS_GPU:
        with pytest.raises(ValueError, match="old_logp"):
            f(old_logp=old.cuda())


def test_unknown_backend_and_on_policy():
    logp, old, adv, mask, _ = batch(3, 5, poison_masked=False)
    with pytest.raises(ValueError, match="backend"):
        mars.loss.policy_loss(logp, old, adv, mask, backend="tpu")
    for backend in ["reference"] + KERNELS:  # old_logp None: ratio 1, gradient -A m / N
        out, g = run(backend, logp, None, adv, mask)
        n = mask.sum()
        assert_close(g, torch.where(mask, -adv[:, None] / n, 0.0).expand_as(g), 1e-12, 1e-15)
        assert out.metrics["clip_frac_high"].item() == 0.0


# ------------------------------------------------------------------ module, determinism

def test_marsloss_module_matches_function():
    logp, old, adv, mask, ref = batch(5, 11, poison_masked=False)
    crit = mars.loss.MarsLoss(clip_high=0.28, kl_coef=0.01, agg="seq-mean-token-mean")
    assert "clip_high=0.28" in repr(crit)
    out = crit(logp, old, adv, mask, ref_logp=ref, num_seqs=10)
    want = reference.policy_loss(logp, old, adv, mask, ref_logp=ref, clip_high=0.28, kl_coef=0.01,
                                 agg="seq-mean-token-mean", num_seqs=10)
    assert_close(out.loss, want.loss)
    with pytest.raises(ValueError, match="agg"):
        mars.loss.MarsLoss(agg="mean")


@pytest.mark.parametrize("backend", KERNELS)
def test_deterministic(backend):
    logp, old, adv, mask, ref = batch(33, 700, dtype=torch.float32, seed=1)
    outs = [run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.1) for _ in range(3)]
    for o, g in outs[1:]:
        assert torch.equal(o.loss, outs[0][0].loss) and torch.equal(g, outs[0][1])
    if backend == "cpu":  # independent of the thread count
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            o, g = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=0.1)
        finally:
            torch.set_num_threads(n)
        assert torch.equal(o.loss, outs[0][0].loss) and torch.equal(g, outs[0][1])


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
def test_opcheck_cpu():
    logp, old, adv, mask, ref = batch(3, 8, poison_masked=False)
    w = torch.rand(3, 8, dtype=logp.dtype)
    for is_weights in (None, w, w[:, 0]):
        args = (logp, old, adv, mask, ref, is_weights, 0.2, 0.28, 3.0, 0.1, 2, 2, -1.0, -1.0,
                -1.0, False, 20.0)
        torch.library.opcheck(torch.ops.mars.policy_loss.default, args, test_utils=(
            "test_schema", "test_faketensor", "test_autograd_registration"))


@gpu
@pytest.mark.skipif(not mars.backends()["cuda"].available, reason="needs the CUDA kernels")
def test_op_checks_every_input_is_on_logp_device():
    """torch.ops.mars.policy_loss called directly with one input on another device: a
    ValueError naming it (the kernels read raw pointers), from the CPU and the CUDA body."""
    logp, old, adv, mask, ref = batch(3, 8, seed=3, poison_masked=False)
    w = torch.ones(3, 8, dtype=logp.dtype)
    base = [logp.detach(), old, adv, mask, ref, w]
    names = ["logp", "old_logp", "advantages", "mask", "ref_logp", "is_weights"]
    opts = (0.2, 0.28, 3.0, 0.1, 2, 0, -1.0, -1.0, -1.0, False, 20.0)
    for on_cuda in (False, True):  # one input on CUDA, the others on CPU; and the reverse
        for k, name in enumerate(names):
            args = [t.cuda() if (j == k) != on_cuda else t for j, t in enumerate(base)]
            first_odd = name if k else "old_logp"  # an odd logp: old_logp is named first
            with pytest.raises(ValueError, match=f"{first_odd} is on .* but logp is on"):
                torch.ops.mars.policy_loss(*args, *opts)


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
def test_torch_compile_cpu():
    logp, old, adv, mask, ref = batch(4, 16, poison_masked=False, dtype=torch.float32)

    def step(x):
        return mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                     backend="cpu").loss
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logp.detach().requires_grad_()
    compiled(x1).backward()
    x2 = logp.detach().requires_grad_()
    step(x2).backward()
    assert_close(x1.grad, x2.grad, 1e-6, 1e-8)


@gpu
@pytest.mark.skipif("triton" not in KERNELS, reason="triton not installed")
def test_triton_no_host_sync():
    """The Triton launcher copies its options to the GPU without waiting for it, and keeps
    given normalisers as numbers (a new device tensor from a float is a blocking copy)."""
    logp, old, adv, mask, ref = batch(4, 16, dtype=torch.float32, device="cuda")
    opts = [dict(agg="token-mean", num_tokens=40.0), dict(agg="token-sum"),
            dict(agg="seq-mean-token-sum-norm", num_seqs=3, loss_scale=7.0)]
    for kw in opts:  # compile outside the check
        run("triton", logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in opts:
            run("triton", logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_cuda_large_vs_cpu():
    """GPU only: the CUDA op on a large batch against the C++ op (vectorised and scalar paths)."""
    for T in (4096, 4093):
        logp, old, adv, mask, ref = batch(64, T, seed=T, dtype=torch.float32)
        kw = dict(ref_logp=ref, kl_coef=0.1, dual_clip=3.0)
        want, wg = run("cpu", logp, old, adv, mask, **kw)
        c = [t.cuda() for t in (logp.detach(), old, adv, mask, ref)]
        c[0].requires_grad_()
        got, gg = run("cuda", c[0], c[1], c[2], c[3], **{**kw, "ref_logp": c[4]})
        assert_close(got.loss, want.loss, 1e-5, 1e-7)
        assert_close(gg, wg, 1e-5, 1e-9)


# ------------------------------------------- C++ op: vectorised fp32/bf16 path vs scalar loop

# MARS_CPU_ISA caps the instruction set of the C++ op's fp32/bf16 path (read per call):
# "scalar" is the portable loop (also what fp64/fp16 and non-x86 builds run); "avx2" and
# "avx512" the vectorised bodies (capped again by what the CPU has, so on a smaller CPU the
# higher cases re-test the lower path).
ISAS = ["scalar", "avx2", "avx512"]
needs_cpu_op = pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")

VEC_OPTIONS = [dict(kl_coef=0.1, kl_type="k3", dual_clip=3.0),
               dict(kl_coef=0.2, kl_type="k2", log_ratio_clamp=None, agg="token-sum"),
               dict(kl_coef=0.05, kl_type="k1", clip_high=0.28, agg="seq-mean-token-mean"),
               dict(ratio_level="sequence", kl_coef=0.1, agg="seq-mean-token-sum-norm"),
               dict(log_ratio_clamp=0.1, dual_clip=10.0, with_ref=False)]


@needs_cpu_op
@pytest.mark.parametrize("isa", ISAS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 1025), (5, 33), (4, 64), (3, 250)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_cpu_vector_path_matches_scalar_and_reference(monkeypatch, isa, dtype, shape):
    """Lengths that leave vector tails (and none), every option family, [B] / [B, T]
    advantages: the vectorised path against the scalar loop and against the reference in
    float64 on the same (rounded) inputs, within the accuracy contract's 1e-5."""
    B, T = shape
    for k, kw in enumerate(VEC_OPTIONS):
        for adv_2d in (False, True):
            logp, old, adv, mask, ref = batch(B, T, seed=100 * k + B * T + adv_2d, dtype=dtype,
                                              adv_2d=adv_2d)
            kw = dict(kw)
            if kw.pop("with_ref", True):
                kw["ref_logp"] = ref
            outs = {}
            for name in ("scalar", isa):
                monkeypatch.setenv("MARS_CPU_ISA", name)
                outs[name] = run("cpu", logp, old, adv, mask, **kw)
            l64 = logp.detach().double().requires_grad_()
            kw64 = {**kw, "ref_logp": ref.double()} if "ref_logp" in kw else kw
            want, want_g = run("reference", l64, old.double(), adv.double(), mask, **kw64)
            (vo, vg), (so, sg) = outs[isa], outs["scalar"]
            assert torch.isfinite(vg).all() and (vg[~mask] == 0).all()
            gtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            for other, og in ((so, sg), (want, want_g)):
                assert_close(vo.loss, other.loss, 1e-5, 1e-7, f"loss {isa} {kw}")
                assert_close(vg, og.to(dtype), gtol, 1e-9, f"grad {isa} {kw}")
                for m in LOSS_METRICS:
                    assert_close(vo.metrics[m], other.metrics[m], 1e-5, 1e-6, f"{m} {isa} {kw}")


@needs_cpu_op
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_exp_range_and_specials(monkeypatch, isa):
    """The vectorised exp over its whole range (overflow to inf, underflow through the
    subnormals to 0): with A = 1, no clamp and clip_high past fp32 (never clips), token-sum's gradient is
    -exp(logp - old_logp) token by token; a 37-long row leaves a vector tail."""
    lr = torch.cat([torch.linspace(-110.0, 89.0, 2001), torch.tensor([0.0, -0.0, 1e-8, -1e-8,
                    88.72, 88.73, -87.33, -103.9, -104.0, 80.0, 0.5])])
    lr = lr[: lr.numel() // 37 * 37].reshape(-1, 37)
    logp = lr.float().requires_grad_()
    old = torch.zeros_like(lr, dtype=torch.float32)
    mask = torch.ones_like(lr, dtype=torch.bool)
    monkeypatch.setenv("MARS_CPU_ISA", isa)
    out = mars.loss.policy_loss(logp, old, torch.ones(lr.shape[0]), mask, clip_high=1e39,
                                log_ratio_clamp=None, agg="token-sum", backend="cpu")
    g, = torch.autograd.grad(out.loss, logp)
    want = torch.exp(logp.detach().double()).float()  # correctly rounded fp32 exp
    got = -g
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    normal = fin & (want.abs() >= torch.finfo(torch.float32).tiny)
    assert_close(got[normal], want[normal], 3e-7, 0.0, f"exp {isa}")
    assert_close(got[fin & ~normal], want[fin & ~normal], 0.0, 2e-45, f"subnormal exp {isa}")


@needs_cpu_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_deterministic_across_threads(monkeypatch, isa, dtype):
    """Big enough for the op to split rows over threads: the same bits with 1 or 2 threads."""
    monkeypatch.setenv("MARS_CPU_ISA", isa)
    logp, old, adv, mask, ref = batch(40, 2003, dtype=dtype, seed=5)
    outs = []
    n = torch.get_num_threads()
    for nt in (1, max(2, n)):
        torch.set_num_threads(nt)
        try:
            outs.append(run("cpu", logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, dual_clip=3.0))
        finally:
            torch.set_num_threads(n)
    (o1, g1), (o2, g2) = outs
    assert torch.equal(o1.loss, o2.loss) and torch.equal(g1, g2)
    assert all(torch.equal(o1.metrics[k], o2.metrics[k]) for k in LOSS_METRICS)
