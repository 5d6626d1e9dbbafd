"""Numerically hard cases of the policy loss, every backend against the float64 reference
(docs/loss.md, "KL estimators", "Huge ratios", "Fused path"): k3 near d = 0 (1e-3 .. 1e-9)
in fp64 / fp32 / bf16, ratios that overflow with the clamp off, advantage 0, NaN / inf in
masked hidden states of the fused loss, and eager vs torch.compile on those cases."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mars
from mars import reference
from mars.fused_linear import fused_linear_policy_loss

mpmath = pytest.importorskip("mpmath")

KERNELS = [b for b in ("cpu", "triton") if mars.backends()[b].available]
BACKENDS = ["reference"] + KERNELS
ISAS = ["scalar", "avx2", "avx512"]  # MARS_CPU_ISA caps the C++ op's fp32/bf16 path


def backend_variants():
    """(backend, MARS_CPU_ISA or None): the C++ op once per instruction-set path."""
    out = [("reference", None)]
    if "cpu" in KERNELS:
        out += [("cpu", isa) for isa in ISAS]
    if "triton" in KERNELS:
        out.append(("triton", None))
    return out


VARIANTS = backend_variants()
VARIANT_IDS = [b if isa is None else f"{b}-{isa}" for b, isa in VARIANTS]


def exact_k3(d: float) -> float:
    mpmath.mp.dps = 60
    x = mpmath.mpf(d)
    return float(mpmath.exp(x) - 1 - x)


def exact_expm1(d: float) -> float:
    mpmath.mp.dps = 60
    return float(mpmath.expm1(mpmath.mpf(d)))


def run(backend, logp, old, adv, mask, **kw):
    x = logp.detach().requires_grad_()
    out = mars.loss.policy_loss(x, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, x)
    return out, g


def relclose(got, want, rtol, what):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bad = err > rtol * want.abs()
    assert not bad.any(), f"{what}: max rel err {(err / want.abs().clamp(min=1e-300)).max():.3e}"


# --------------------------------------------------------------------- k3 near d = 0

def small_d(n, lo=-9, hi=-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    return mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


def test_reference_k3_is_exact_to_rounding():
    """The float64 reference against 60-digit arithmetic, d from 1e-12 to the clamp (both
    branches, both signs): e^d - 1 - d within a few ulps, and its gradient -expm1(d)."""
    mags = torch.logspace(-12, math.log10(19.9), 400, dtype=torch.float64)
    d = torch.cat([mags, -mags, torch.tensor([0.4999999, 0.5, -0.5, -0.5000001])])
    for dtype, rtol in ((torch.float64, 4e-16 * 8), (torch.float32, 6e-8 * 8)):
        dd = d.to(dtype)
        x = torch.zeros_like(dd, requires_grad=True)
        k = reference.kl_estimate(x, dd, "k3")
        (g,) = torch.autograd.grad(k.sum(), x)
        ds = dd.double().tolist()
        want = torch.tensor([min(exact_k3(v), 10.0) for v in ds], dtype=torch.float64)
        want_g = torch.tensor([0.0 if exact_k3(v) > 10 else -exact_expm1(v) for v in ds],
                              dtype=torch.float64)
        relclose(k, want, rtol, f"k3 {dtype}")
        relclose(g, want_g, rtol, f"dk3 {dtype}")


@pytest.mark.parametrize("backend,isa", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_k3_near_zero_matches_float64_reference(monkeypatch, backend, isa, dtype):
    """ref_logp within 1e-9 .. 1e-3 of logp (the reference policy barely moved): loss (k3
    only, A = 0), ref_kl and gradient within the accuracy contract's 1e-5 relative (docs/README.md) of the float64 reference
    on the same (rounded) inputs. exp(d) - d - 1 is off by up to 100% here in fp32."""
    if isa:
        monkeypatch.setenv("MARS_CPU_ISA", isa)
    B, T = 4, 37  # a vector tail
    g = torch.Generator().manual_seed(3)
    # confident tokens (logp near 0, where a bf16 / fp32 logp can resolve a tiny d) and
    # less confident ones
    base = -10 ** (-7.5 + 8 * torch.rand(B, T, generator=g, dtype=torch.float64))
    logp = base.to(dtype)
    ref = (logp.double() + small_d(B * T).reshape(B, T)).to(dtype)  # in the input dtype
    # keep the tokens whose d survived the rounding to the input dtype
    mask = (ref.double() - logp.double()) != 0
    adv = torch.zeros(B, dtype=dtype)
    kw = dict(ref_logp=ref, kl_coef=1.0, kl_type="k3", agg="token-sum")
    want, want_g = run("reference", logp.double(), logp.double(), adv.double(), mask,
                       **{**kw, "ref_logp": ref.double()})
    got, got_g = run(backend, logp, logp, adv, mask, **kw)
    assert mask.sum() > 20
    relclose(got.loss, want.loss, 1e-5 if dtype != torch.float64 else 1e-12, "loss")
    relclose(got.metrics["ref_kl"], want.metrics["ref_kl"], 1e-5 if dtype != torch.float64
             else 1e-12, "ref_kl")
    gtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -8}[dtype]
    relclose(got_g[mask], want_g[mask], gtol, "grad")
    # and the float64 reference is the true k3 of these inputs
    d = (ref.double() - logp.double())[mask]
    exact = sum(exact_k3(v) for v in d.tolist())
    assert want.loss.item() == pytest.approx(exact, rel=1e-13)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(d=st.lists(st.floats(-25.0, 25.0, allow_subnormal=False), min_size=1, max_size=12),
       kl_type=st.sampled_from(reference.KL_TYPES))
def test_kl_estimates_every_backend_float32(d, kl_type):
    """Any d (both k3 branches, the clamps, the series edge at |d| = 0.5): fp32 kernels
    vs the float64 reference on the same inputs, loss, ref_kl and gradient."""
    dd = torch.tensor(d, dtype=torch.float32)[None]
    logp = torch.full_like(dd, -1.0)
    ref = logp + dd
    mask = torch.ones_like(dd, dtype=torch.bool)
    adv = torch.zeros(1)
    kw = dict(kl_coef=0.5, kl_type=kl_type, agg="token-sum")
    want, want_g = run("reference", logp.double(), logp.double(), adv.double(), mask,
                       ref_logp=ref.double(), **kw)
    prev = os.environ.get("MARS_CPU_ISA")
    try:
        for b, isa in VARIANTS[1:]:
            if isa:
                os.environ["MARS_CPU_ISA"] = isa
            got, got_g = run(b, logp, logp, adv, mask, ref_logp=ref, **kw)
            torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(got.metrics["ref_kl"].double(), want.metrics["ref_kl"],
                                       rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(got_g.double(), want_g, rtol=1e-5, atol=1e-12)
    finally:
        if prev is None:
            os.environ.pop("MARS_CPU_ISA", None)
        else:
            os.environ["MARS_CPU_ISA"] = prev


# --------------------------------------------------------------- huge ratios, clamp off

HUGE = [0.0, 1e-3, 30.0, 88.0, 89.0, 100.0, 500.0, 800.0]  # exp overflows fp32 > 88.7, fp64 > 709


def huge_batch(dtype, adv_2d):
    lr = torch.tensor(HUGE, dtype=torch.float64)
    n = lr.numel()
    advs = torch.tensor([0.0, 1.5, -1.5, -0.0], dtype=torch.float64)
    logp = (lr[None, :] - 2.0).expand(4, n).clone()
    old = torch.full_like(logp, -2.0)
    mask = torch.ones(4, n, dtype=torch.bool)
    mask[:, 1] = False
    adv = advs[:, None].expand(4, n).clone() if adv_2d else advs
    if adv_2d:  # mix signs inside rows too
        adv[0, ::2] = 2.0
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


# the Triton interpreter (numpy) warns on the overflowing exp it computes on purpose
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend,isa", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("adv_2d", [False, True])
def test_huge_ratio_no_nan_and_reference_values(monkeypatch, backend, isa, dtype, ratio_level,
                                                 dual_clip, adv_2d):
    """log_ratio_clamp=None, ratios e^0 .. e^800: no NaN in loss or gradient (no 0 * inf);
    every backend equals the reference in the same dtype, inf where the reference is inf."""
    if isa:
        monkeypatch.setenv("MARS_CPU_ISA", isa)
    logp, old, adv, mask = huge_batch(dtype, adv_2d)
    kw = dict(log_ratio_clamp=None, dual_clip=dual_clip, clip_high=0.28, agg="token-sum",
              ratio_level=ratio_level)
    want, want_g = run("reference", logp, old, adv, mask, **kw)
    got, got_g = run(backend, logp, old, adv, mask, **kw)
    assert not torch.isnan(want.loss) and not torch.isnan(want_g).any()
    assert not torch.isnan(got.loss) and not torch.isnan(got_g).any()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-6, equal_nan=False)
    assert all(not torch.isnan(v) for v in got.metrics.values())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_ratio_defined_values(backend):
    """docs/loss.md "Huge ratios", token by token (ratio = inf in fp32, clamp off):
    A = 0 -> 0, grad 0; A > 0 -> -A (1 + clip_high), grad 0; A < 0 with dual clip c -> -A c,
    grad 0; A < 0 without -> +inf, grad +inf. Finite cases equal the float64 reference."""
    lp = torch.tensor([[100.0]])
    old = torch.zeros(1, 1)
    m = torch.ones(1, 1, dtype=torch.bool)
    cases = [(0.0, None, 0.0, 0.0), (-0.0, 3.0, 0.0, 0.0), (2.0, None, -2.0 * 1.28, 0.0),
             (2.0, 3.0, -2.0 * 1.28, 0.0), (-2.0, 3.0, 6.0, 0.0), (-2.0, None, math.inf, math.inf)]
    for a, dual, loss, grad in cases:
        kw = dict(log_ratio_clamp=None, dual_clip=dual, clip_high=0.28, agg="token-sum")
        out, g = run(backend, lp, old, torch.tensor([a]), m, **kw)
        assert out.loss.item() == pytest.approx(loss, rel=1e-6), (a, dual)
        assert g.item() == pytest.approx(grad), (a, dual)
        if math.isfinite(loss):
            w, wg = run("reference", lp.double(), old.double(), torch.tensor([a]).double(), m, **kw)
            assert out.loss.item() == pytest.approx(w.loss.item(), rel=1e-6)
            assert g.item() == pytest.approx(wg.item(), abs=1e-12)
    # clip_high = inf too: -inf for A > 0, never NaN
    out, g = run(backend, lp, old, torch.tensor([2.0]), m, log_ratio_clamp=None,
                 clip_high=math.inf, agg="token-sum")
    assert out.loss.item() == -math.inf and g.item() == -math.inf


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend,isa", VARIANTS, ids=VARIANT_IDS)
def test_zero_advantage_gives_zero_loss_and_grad(monkeypatch, backend, isa):
    """A = 0 (exactly, or -0.0): loss 0 and gradient exactly 0 whatever the ratio and the
    options; with a KL term only the KL remains."""
    if isa:
        monkeypatch.setenv("MARS_CPU_ISA", isa)
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 19, generator=g) * 40
    old = torch.randn(3, 19, generator=g) * 40
    mask = torch.rand(3, 19, generator=g) > 0.2
    for adv in (torch.zeros(3), torch.full((3,), -0.0), torch.zeros(3, 19)):
        for kw in (dict(log_ratio_clamp=None), dict(dual_clip=2.0, log_ratio_clamp=None),
                   dict(ratio_level="sequence", log_ratio_clamp=None), dict()):
            out, gr = run(backend, logp, old, adv, mask, agg="token-sum", **kw)
            assert out.loss.item() == 0.0 and (gr == 0).all(), kw


# ----------------------------------------------------- fused loss: masked NaN / inf hidden

def fused_batch(seed=0, B=3, T=6, H=8, V=23, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    w = (0.4 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype)
    b = (0.3 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, 0] = True
    mask[-1] = False
    old = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 3.0).to(dtype)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return h, w, b, ids, mask, old, adv


def fused_grads(backend, h, w, b, ids, mask, old, adv, **kw):
    params = [t.detach().requires_grad_() for t in (h, w, b)]
    out = fused_linear_policy_loss(params[0], params[1], ids, old, adv, mask, bias=params[2],
                                   backend=backend, **kw)
    return out, torch.autograd.grad(out.loss, params)


FUSED_BACKENDS = ["reference", "auto"] + (["triton"] if "triton" in KERNELS else [])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_masked_nan_inf_hidden_do_not_reach_gradients(backend, ratio_level, dtype):
    """NaN / inf / huge hidden states (and ids out of range) at masked positions: loss,
    metrics and the gradients of hidden, weight and bias are those of the clean batch
    (bit for bit: those rows are never used), all finite, hidden's gradient 0 there."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("fp64 uses the torch epilogue")
    h, w, b, ids, mask, old, adv = fused_batch(dtype=dtype)
    junk = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=dtype)
    idx = torch.arange(h.numel()).reshape(h.shape) % 4
    h_bad = torch.where(mask[..., None], h, junk[idx])
    ids_bad = torch.where(mask, ids, -100)
    kw = dict(ratio_level=ratio_level, kl_coef=0.0, dual_clip=3.0, chunk_size=4,
              agg="seq-mean-token-mean")
    clean, cg = fused_grads(backend, h, w, b, ids, mask, old, adv, **kw)
    bad, bg = fused_grads(backend, h_bad, w, b, ids_bad, mask, old, adv, **kw)
    assert torch.isfinite(bad.loss)
    assert torch.equal(bad.loss, clean.loss)
    for name, x, y in zip(("hidden", "weight", "bias"), bg, cg):
        assert torch.isfinite(x).all(), name
        assert torch.equal(x, y), name
    assert (bg[0][~mask] == 0).all()
    if backend != "reference":  # and the kernel path is the reference's number
        ref, rg = fused_grads("reference", h_bad, w, b, ids_bad, mask, old, adv, **kw)
        tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bad.loss, ref.loss, **tol)
        for x, y in zip(bg, rg):
            torch.testing.assert_close(x, y, **tol)


def test_reference_token_logprobs_masked_nan_hidden():
    """The reference token_logprobs alone: masked rows selected away before the matmul."""
    h, w, b, ids, mask, *_ = fused_batch()
    h = torch.where(mask[..., None], h, math.nan).requires_grad_()
    w = w.clone().requires_grad_()
    lp = reference.token_logprobs(h, w, ids, bias=b, mask=mask)
    assert torch.isfinite(lp).all() and (lp[~mask] == 0).all()
    gh, gw = torch.autograd.grad((lp * 1.7).sum(), (h, w))
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all() and (gh[~mask] == 0).all()


# ------------------------------------------------------------- eager vs torch.compile

@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_matches_eager_on_edge_cases(backend):
    """Huge ratios with the clamp off, A = 0 and k3 near 0, compiled (fullgraph) and eager:
    the same numbers, no NaN."""
    logp, old, adv, mask = huge_batch(torch.float32, adv_2d=True)
    ref = logp + 1e-4

    def step(x):
        return mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                     log_ratio_clamp=None, dual_clip=3.0, agg="token-mean",
                                     backend=backend).loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = logp.detach().requires_grad_()
    l1 = compiled(x1)
    l1.backward()
    x2 = logp.detach().requires_grad_()
    l2 = step(x2)
    l2.backward()
    assert torch.isfinite(l1) and torch.isfinite(x1.grad).all()
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-8)
