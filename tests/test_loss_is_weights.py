"""Importance-sampling weights of the policy loss (`is_weights`, docs/loss.md,
"Importance-sampling weights"): a hand formula, every backend (C++ scalar / AVX2 / AVX-512,
Triton, CUDA on a GPU) against the float64 reference, [B] and [B, T] weights, GSPO, zero
weights against infinite ratios, the validation, torch.compile, the fused lm-head loss, and
the peers' own functions on the same inputs (verl rollout_is_weights, TRL's
vllm_importance_sampling_correction, Liger's vllm_is_ratio)."""
import math
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mars
from mars import reference
from mars.fused_linear import FusedLinearMarsLoss, fused_linear_policy_loss
import trl_peer
from conftest import HAS_GPU, gpu
from test_policy_loss import CASE_IDS, CASES, KERNELS, assert_close, batch


def run(backend, logp, old, adv, mask, **kw):
    x = logp.detach().requires_grad_()
    out = mars.loss.policy_loss(x, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


ISAS = ["scalar", "avx2", "avx512"]


def assert_matches_reference(backend, logp, old, adv, mask, kw, what):
    """`backend` against the reference in float64: loss, gradient (finite, 0 under the
    mask) and every metric."""
    want, want_g = run("reference", logp, old, adv, mask, **kw)
    got, got_g = run(backend, logp, old, adv, mask, **kw)
    assert torch.isfinite(got_g).all() and (got_g[~mask] == 0).all()
    assert_close(got.loss, want.loss, 1e-9, 1e-12, f"loss {what}")
    assert_close(got_g, want_g, 1e-9, 1e-12, f"grad {what}")
    for m in want.metrics:
        assert_close(got.metrics[m], want.metrics[m], 1e-9, 1e-12, f"{m} {what}")


def weights(B, T, *, per_token, seed=0, mask=None, dtype=torch.float64, device="cpu",
            poison=True):
    """Weights in [0, 2) with exact zeros; [B, T] ones hold NaN / -1 / inf under the mask
    (never used, so allowed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand((B, T) if per_token else (B,), generator=g, dtype=torch.float64) * 2
    w[torch.rand(w.shape, generator=g) < 0.15] = 0.0
    if per_token and poison and mask is not None:
        junk = torch.tensor([math.nan, -1.0, math.inf], dtype=torch.float64)
        w = torch.where(mask.cpu(), w, junk[torch.randint(0, 3, (B, T), generator=g)])
    return w.to(device=device, dtype=dtype)


def naive(logp, old, adv, mask, w, ref, *, clip_low, clip_high, dual_clip, kl_coef, clamp=20.0):
    """Token-mean loss with Python floats: w * clipped term + kl_coef * k3 (k3 unweighted)."""
    num, n = 0.0, 0
    for i in range(len(mask)):
        for t in range(len(mask[0])):
            if not mask[i][t]:
                continue
            a = adv[i]
            r = math.exp(max(-clamp, min(clamp, logp[i][t] - old[i][t])))
            l = max(-a * r, -a * max(1 - clip_low, min(1 + clip_high, r)))
            if dual_clip is not None and a < 0:
                l = min(l, -a * dual_clip)
            wt = w[i][t] if isinstance(w[i], list) else w[i]
            d = max(-20.0, min(20.0, ref[i][t] - logp[i][t]))
            num += wt * l + kl_coef * min(10.0, math.exp(d) - d - 1)
            n += 1
    return num / max(n, 1)


@pytest.mark.parametrize("per_token", [False, True])
def test_reference_matches_naive_formula(per_token):
    logp, old, adv, mask, ref = batch(5, 9, seed=11, spread=0.6, poison_masked=False)
    w = weights(5, 9, per_token=per_token, seed=2, poison=False)
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05)
    got = reference.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=w, **kw).loss
    want = naive(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), w.tolist(),
                 ref.tolist(), **kw)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_unit_weights_change_nothing(backend, ratio_level):
    """w = 1 everywhere gives bit for bit the numbers of no weights (x * 1 is exact)."""
    logp, old, adv, mask, ref = batch(6, 33, seed=4, dtype=torch.float32)
    kw = dict(ref_logp=ref, kl_coef=0.1, dual_clip=3.0, ratio_level=ratio_level)
    for w in (torch.ones(6), torch.ones(6, 33)):
        a, ga = run(backend, logp, old, adv, mask, **kw)
        b, gb = run(backend, logp, old, adv, mask, is_weights=w, **kw)
        assert torch.equal(a.loss, b.loss) and torch.equal(ga, gb)
        for k in a.metrics:
            assert torch.equal(a.metrics[k], b.metrics[k])


OPTIONS = [dict(agg="token-mean", kl_coef=0.1, dual_clip=3.0),
           dict(agg="seq-mean-token-mean", kl_coef=0.05, kl_type="k1", clip_high=0.28),
           dict(agg="seq-mean-token-sum-norm", kl_coef=0.1, kl_type="k2", log_ratio_clamp=None),
           dict(agg="token-sum", ratio_level="sequence", kl_coef=0.1, dual_clip=10.0),
           dict(agg="seq-mean-token-sum", ratio_level="sequence", with_ref=False)]


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_token", [False, True], ids=["w[B]", "w[B,T]"])
@pytest.mark.parametrize("adv_2d", [False, True], ids=["adv[B]", "adv[B,T]"])
def test_kernels_match_reference(backend, device, per_token, adv_2d):
    """Every kernel, in float64, on poisoned masked positions (NaN / -1 / inf weights
    there), with every aggregation family, KL type, GSPO, dual clip and the clamp off."""
    for k, opt in enumerate(OPTIONS):
        logp, old, adv, mask, ref = batch(7, 45, seed=20 + k, adv_2d=adv_2d, device=device)
        kw = dict(opt)
        if kw.pop("with_ref", True):
            kw["ref_logp"] = ref
        kw["is_weights"] = weights(7, 45, per_token=per_token, seed=k, mask=mask, device=device)
        assert_matches_reference(backend, logp, old, adv, mask, kw, opt)


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_low_precision(monkeypatch, isa, dtype):
    """The C++ op's scalar loop and its AVX2 / AVX-512 bodies (vector tails included) with
    fp32 / bf16 weights, against the float64 reference on the same rounded inputs."""
    monkeypatch.setenv("MARS_CPU_ISA", isa)
    for per_token in (False, True):
        for (B, T), opt in zip([(3, 17), (2, 64), (4, 250)], OPTIONS[:3]):
            logp, old, adv, mask, ref = batch(B, T, seed=B * T + per_token, dtype=dtype)
            w = weights(B, T, per_token=per_token, seed=T, mask=mask, dtype=dtype)
            kw = {**opt, "ref_logp": ref, "is_weights": w}
            got, got_g = run("cpu", logp, old, adv, mask, **kw)
            l64 = logp.detach().double().requires_grad_()
            want, want_g = run("reference", l64, old.double(), adv.double(), mask,
                               **{**kw, "ref_logp": ref.double(), "is_weights": w.double()})
            gtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert_close(got.loss, want.loss, 1e-5, 1e-7, f"loss {opt}")
            assert_close(got_g, want_g.to(dtype), gtol, 1e-9, f"grad {opt}")


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 5), T=st.integers(1, 40), per_token=st.booleans(),
       scale=st.floats(0.0, 100.0), seed=st.integers(0, 2 ** 16),
       ratio_level=st.sampled_from(["token", "sequence"]))
def test_weights_are_linear_in_the_policy_term(B, T, per_token, scale, seed, ratio_level):
    """Without KL the loss is linear in the weights: loss(c w) = c loss(w) and
    loss(w1 + w2) = loss(w1) + loss(w2), gradients too; every backend, float64."""
    logp, old, adv, mask, _ = batch(B, T, seed=seed, spread=0.5)
    w1 = weights(B, T, per_token=per_token, seed=seed + 1, mask=mask)
    w2 = weights(B, T, per_token=per_token, seed=seed + 2, mask=mask)
    kw = dict(dual_clip=3.0, ratio_level=ratio_level, agg="token-sum")
    for backend in ["reference"] + KERNELS:
        o1, g1 = run(backend, logp, old, adv, mask, is_weights=w1, **kw)
        o2, g2 = run(backend, logp, old, adv, mask, is_weights=w2, **kw)
        oc, gc = run(backend, logp, old, adv, mask, is_weights=scale * w1, **kw)
        s, gs = run(backend, logp, old, adv, mask, is_weights=w1 + w2, **kw)
        assert_close(oc.loss, scale * o1.loss, 1e-12, 1e-12)
        assert_close(gc, scale * g1, 1e-12, 1e-12)
        assert_close(s.loss, o1.loss + o2.loss, 1e-12, 1e-12)
        assert_close(gs, g1 + g2, 1e-12, 1e-12)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's overflowing exp
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_zero_weight_silences_an_infinite_ratio(backend, dtype, ratio_level):
    """Clamp off, ratio e^800 (inf), A < 0, no dual clip: the term is +inf, but a weight of
    0 makes it 0 with gradient 0 (never 0 * inf = NaN); a weight of 2 keeps it inf."""
    lr = torch.tensor([[800.0, 0.1, -0.2], [0.3, 800.0, 0.0]], dtype=torch.float64)
    logp = (lr - 1.0).to(dtype)
    old = torch.full_like(logp, -1.0)
    adv = torch.tensor([-1.0, -2.0], dtype=dtype)
    mask = torch.ones(2, 3, dtype=torch.bool)
    kw = dict(log_ratio_clamp=None, ratio_level=ratio_level, agg="token-sum")
    w = torch.tensor([0.0, 0.0], dtype=dtype)
    out, g = run(backend, logp, old, adv, mask, is_weights=w, **kw)
    assert out.loss.item() == 0.0 and (g == 0).all()
    w2 = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=dtype)
    want, want_g = run("reference", logp, old, adv, mask, is_weights=w2, **kw)
    out, g = run(backend, logp, old, adv, mask, is_weights=w2, **kw)
    assert not torch.isnan(g).any() and not torch.isnan(out.loss)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, want_g, rtol=1e-6, atol=1e-6)
    if ratio_level == "token":  # the weighted tokens are finite: zero weights took the infs
        assert torch.isfinite(out.loss) and torch.isfinite(g).all()
    if ratio_level == "token":
        out, g = run(backend, logp, old, adv, mask, is_weights=2 * w2.flip(1), **kw)
        assert out.loss.item() == math.inf


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_bad_weights_raise_naming_them(backend):
    logp, old, adv, mask, _ = batch(4, 6, seed=1, poison_masked=False, empty_rows=False)
    mask[2] = False  # an empty row: its [B] weight is never used
    f = lambda w: mars.loss.policy_loss(logp, old, adv, mask, is_weights=w,  # noqa: E731
                                        backend=backend)
    ok = torch.ones(4, 6, dtype=torch.float64)
    i, t = mask.nonzero()[0].tolist()
    for bad in (-0.5, math.nan, math.inf, -math.inf):
        w = ok.clone()
        w[i, t] = bad
        with pytest.raises(ValueError, match=r"is_weights must be finite and >= 0 .*at \["):
            f(w)
        w1 = torch.ones(4, dtype=torch.float64)
        w1[0] = bad
        with pytest.raises(ValueError, match="is_weights"):
            f(w1)
    # unused weights may hold anything: masked positions, the empty row of [B] weights
    f(torch.where(mask, ok, math.nan))
    f(torch.tensor([1.0, 1.0, math.nan, 1.0], dtype=torch.float64))
    for bad, what in ((ok[:3], r"\[B\]"), (ok[:, :5], r"\[B, T\]"), (ok[None], r"\[B\]"),
                      (ok.long(), "float"), (ok.bool(), "float"), ([1.0] * 4, "tensor")):
        with pytest.raises(ValueError, match=f"is_weights.*{what}"):
            f(bad)
    if HAS_GPU:
        with pytest.raises(ValueError, match="is_weights is on"):
            f(ok.cuda())


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_weights_get_no_gradient(backend):
    """Weights are data: a weight tensor that requires grad is read, not differentiated."""
    logp, old, adv, mask, _ = batch(3, 8, seed=2, poison_masked=False)
    w = torch.rand(3, 8, dtype=torch.float64, requires_grad=True)
    out = mars.loss.policy_loss(logp, old, adv, mask, is_weights=w, backend=backend)
    out.loss.backward()
    assert w.grad is None and logp.grad is not None


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
def test_op_checks_weights_shape_dtype_device():
    logp, old, adv, mask, ref = batch(3, 8, seed=3, poison_masked=False)
    args = lambda w: (logp.detach(), old, adv, mask, ref, w, 0.2, 0.28, 3.0, 0.1, 2, 0,  # noqa: E731
                      -1.0, -1.0, -1.0, False, 20.0)
    for bad, what in ((torch.ones(3, 7, dtype=torch.float64), r"\[B\] or \[B, T\]"),
                      (torch.ones(2, dtype=torch.float64), r"\[B\] or \[B, T\]"),
                      (torch.ones(3, 8, dtype=torch.float32), "dtype")):
        with pytest.raises(ValueError, match=f"is_weights.*{what}"):
            torch.ops.mars.policy_loss(*args(bad))
    if HAS_GPU:
        with pytest.raises(ValueError, match="is_weights is on"):
            torch.ops.mars.policy_loss(*args(torch.ones(3, 8, dtype=torch.float64).cuda()))


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_checks_weights_on_the_device(backend):
    """Under torch.compile the weights' values are checked by torch._assert_async: the
    eager numbers for good weights, a RuntimeError (on CPU) for a negative one."""
    logp, old, adv, mask, ref = batch(3, 16, poison_masked=False, dtype=torch.float32,
                                      empty_rows=False)

    def step(x, w):
        return mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                     is_weights=w, backend=backend).loss
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    w = torch.rand(3, 16)
    x1, x2 = (logp.detach().requires_grad_() for _ in range(2))
    a, b = compiled(x1, w), step(x2, w)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)
    bad = w.clone()
    i, t = mask.nonzero()[0].tolist()
    bad[i, t] = -1.0
    with pytest.raises(RuntimeError, match="is_weights"):
        compiled(logp.detach().requires_grad_(), bad)


def test_modules_take_weights():
    logp, old, adv, mask, ref = batch(5, 11, poison_masked=False)
    w = weights(5, 11, per_token=False, seed=3)
    out = mars.loss.MarsLoss(clip_high=0.28)(logp, old, adv, mask, is_weights=w)
    want = reference.policy_loss(logp, old, adv, mask, clip_high=0.28, is_weights=w)
    assert_close(out.loss, want.loss)


# ------------------------------------------------------------------------- fused path

def fused_batch(B=3, T=7, H=16, V=40, seed=0, dtype=torch.float64, p_mask=0.25):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.4).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) >= p_mask
    with torch.no_grad():
        cur = reference.token_logprobs(hidden, weight, ids, mask=mask).to(dtype)
    old = cur + torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    ref = cur + torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    adv = torch.randn(B, generator=g, dtype=dtype)
    return hidden, weight, ids, mask, old, ref, adv


FUSED_BACKENDS = ["auto"] + (["triton"] if "triton" in KERNELS else [])


def check_fused_against_reference(h, W, ids, old, adv, mask, backend, grad_atol, **kw):
    """fused_linear_policy_loss(backend) against the reference: the loss and the gradients
    of h and W; grad_atol(reference gradient, rtol) is the absolute tolerance of a gradient
    (callers differ: a fixed floor, or one scaled by the largest gradient). Returns the
    fused and the reference outputs."""
    out = fused_linear_policy_loss(h, W, ids, old, adv, mask, chunk_size=4, backend=backend, **kw)
    got = torch.autograd.grad(out.loss, (h, W))
    want = reference.fused_linear_policy_loss(h, W, ids, old, adv, mask, **kw)
    wgrads = torch.autograd.grad(want.loss, (h, W))
    tol = 1e-5 if backend == "triton" else 1e-9  # the Triton epilogue works in fp32
    assert_close(out.loss, want.loss, tol, 1e-7)
    for a, b in zip(got, wgrads):
        assert_close(a, b, tol, grad_atol(b, tol))
    return out, want


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_matches_reference(backend, per_token, ratio_level):
    h, W, ids, mask, old, ref, adv = fused_batch(seed=per_token + 2 * (ratio_level == "token"))
    w = weights(3, 7, per_token=per_token, seed=5, mask=mask)
    kw = dict(ref_logp=ref, kl_coef=0.05, dual_clip=3.0, ratio_level=ratio_level,
              agg="seq-mean-token-mean", is_weights=w)
    out, _ = check_fused_against_reference(h, W, ids, old, adv, mask, backend, lambda grad, rtol: 1e-7, **kw)
    mod = FusedLinearMarsLoss(dual_clip=3.0, kl_coef=0.05, ratio_level=ratio_level,
                              agg="seq-mean-token-mean", chunk_size=4, backend=backend)
    out2 = mod(h, W, ids, old, adv, mask, ref_logp=ref, is_weights=w)
    assert_close(out2.loss, out.loss, 0, 0)


# ------------------------------------------------------------------------------ peers

def finite_batch(B, T, seed):
    return batch(B, T, seed=seed, poison_masked=False)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("per_token", [False, True])
def test_verl_rollout_is_weights(backend, per_token):
    """verl 0.9.1 compute_policy_loss_vanilla(..., rollout_is_weights=w) + the unweighted
    k3 KL term (verl applies the weights to pg_losses only)."""
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl not installed")
    logp, old, adv, mask, ref = finite_batch(8, 30, seed=7)
    w = weights(8, 30, per_token=per_token, seed=8, mask=mask, poison=False)
    cfg = types.SimpleNamespace(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                global_batch_info={}, get=lambda k, d=None: 3.0)
    maskf = mask.double()
    w_bt = w if per_token else w[:, None].expand_as(logp)
    pg, metrics = core.compute_policy_loss_vanilla(
        old, logp, adv[:, None].expand_as(logp), maskf, "token-mean", cfg, rollout_is_weights=w_bt)
    want = pg + 0.05 * core.agg_loss(core.kl_penalty(logp, ref, "low_var_kl"), maskf, "token-mean")
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=w, clip_low=0.2,
                                clip_high=0.28, dual_clip=3.0, kl_coef=0.05, kl_type="k3",
                                backend=backend)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    assert out.metrics["approx_kl"].item() == pytest.approx(metrics["actor/ppo_kl"], rel=1e-6)


def trl_compute_loss(loss_type, logp, old, adv, mask, ref, is_ratio, beta=0.04, level="token",
                     bias_correction_kl=False, max_completion_length=None,
                     num_items_in_batch=None):
    """TRL 1.16's GRPOTrainer._compute_loss with vLLM importance sampling on (the ratio
    comes in inputs["importance_sampling_ratio"])."""
    return trl_peer.trl_compute_loss(loss_type, logp, old, adv, mask, ref, beta=beta, level=level,
                                     is_ratio=is_ratio, bias_correction_kl=bias_correction_kl,
                                     max_completion_length=max_completion_length,
                                     num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token", [False, True])
def test_trl_vllm_importance_sampling(backend, loss_type, level, per_token):
    """TRL multiplies per_token_loss by importance_sampling_ratio ((B, T) for token_*
    modes, (B, 1) for sequence_* modes) before adding beta * KL."""
    pytest.importorskip("trl")
    logp, old, adv, mask, ref = finite_batch(6, 25, seed=3)
    w = weights(6, 25, per_token=per_token, seed=4, mask=mask, poison=False)
    want, _ = trl_compute_loss(loss_type, logp, old, adv, mask, ref,
                               w if per_token else w[:, None], level=level,
                               max_completion_length=32)
    agg = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean",
           "dr_grpo": "seq-mean-token-sum-norm"}[loss_type]
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=w, clip_low=0.2,
                                clip_high=0.28, kl_coef=0.04, log_ratio_clamp=None,
                                ratio_level=level, agg=agg, num_seqs=6, loss_scale=32,
                                backend=backend)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token", [False, True])
def test_liger_vllm_is_ratio(backend, level, per_token):
    """Liger's ppo_loss_fn(..., vllm_is_ratio=w): weights on the policy term, then beta * k3."""
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    logp, old, adv, mask, ref = finite_batch(7, 19, seed=5)
    w = weights(7, 19, per_token=per_token, seed=6, mask=mask, poison=False)
    maskf = mask.double()
    want, _ = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp, maskf, adv, maskf, ref_per_token_logps=ref, old_per_token_logps=old,
        epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type="bnpo",
        importance_sampling_level=level, vllm_is_ratio=w if per_token else w[:, None])
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=w, clip_low=0.2,
                                clip_high=0.28, kl_coef=0.04, log_ratio_clamp=None,
                                ratio_level=level, agg="token-mean", backend=backend)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("per_token", [False, True])
def test_fused_matches_liger_fused_grpo_loss(per_token):
    """The fused lm-head loss with weights against Liger's LigerFusedLinearGRPOLoss with
    vllm_is_ratio (fp32, Liger's own chunking)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    h, W, ids, mask, old, ref, adv = fused_batch(B=4, T=10, H=32, V=90, seed=9,
                                                 dtype=torch.float32, p_mask=0.0)
    w = weights(4, 10, per_token=per_token, seed=7, dtype=torch.float32, poison=False)
    crit = liger.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=True, chunk_size=2,
                                          loss_type="grpo", beta=0.04, epsilon_high=0.28)
    lloss, _ = crit(h, W, ids, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref,
                    vllm_is_ratio=w)
    lgrads = torch.autograd.grad(lloss, (h, W))
    out = fused_linear_policy_loss(h, W, ids, old, adv, mask, ref_logp=ref, is_weights=w,
                                   kl_coef=0.04, clip_high=0.28, agg="seq-mean-token-mean",
                                   log_ratio_clamp=None, chunk_size=7)
    grads = torch.autograd.grad(out.loss, (h, W))
    torch.testing.assert_close(out.loss, lloss, rtol=2e-5, atol=1e-6)
    for a, b in zip(grads, lgrads):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6)


# --------------------------------------------------------------------------------- GPU

@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_weights_match_reference(backend, dtype):
    """The CUDA and Triton kernels with [B] / [B, T] weights (vectorised loads: T % 8 == 0)
    against the float64 reference on the CPU."""
    if not mars.backends()[backend].available:
        pytest.skip(mars.backends()[backend].reason)
    for per_token in (False, True):
        for T in (64, 61):
            logp, old, adv, mask, ref = batch(9, T, seed=T, dtype=dtype)
            w = weights(9, T, per_token=per_token, seed=1, mask=mask, dtype=dtype)
            kw = dict(ref_logp=ref, kl_coef=0.1, dual_clip=3.0, is_weights=w)
            l64 = logp.detach().double().requires_grad_()
            want, want_g = run("reference", l64, old.double(), adv.double(), mask,
                               **{**kw, "ref_logp": ref.double(), "is_weights": w.double()})
            c = [t.cuda() for t in (logp.detach(), old, adv, mask, ref, w)]
            x = c[0].requires_grad_()
            got, got_g = run(backend, x, c[1], c[2], c[3], ref_logp=c[4], kl_coef=0.1,
                             dual_clip=3.0, is_weights=c[5])
            gtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
            assert_close(got.loss, want.loss, 1e-5, 1e-7)
            assert_close(got_g, want_g.to(dtype), gtol, 1e-9)
