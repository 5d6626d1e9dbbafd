"""kl_type="k3_ratio" (docs/loss.md, "k3_ratio: TRL's bias-corrected KL"): k3 times the
policy ratio, differentiated through both factors. A hand formula and gradcheck of the
reference, every backend (C++ scalar / AVX2 / AVX-512, Triton, CUDA on a GPU) against the
float64 reference, k3 = 0 against an infinite ratio, the fused loss, and TRL 1.16's and
Liger's numbers with use_bias_correction_kl=True."""
import math

import pytest
import torch

import mars
from mars import reference
from mars.fused_linear import fused_linear_policy_loss
from conftest import gpu
from test_loss_is_weights import assert_matches_reference, fused_batch, run, trl_compute_loss, weights
from test_policy_loss import CASE_IDS, CASES, KERNELS, assert_close, batch

ISAS = ["scalar", "avx2", "avx512"]


def naive(logp, old, adv, mask, ref, *, level, kl_coef, clamp):
    """Token-sum loss with Python floats: clipped term + kl_coef * k3 * ratio."""
    total = 0.0
    for i in range(len(mask)):
        idx = [t for t in range(len(mask[0])) if mask[i][t]]
        if level == "sequence" and idx:
            lw = sum(logp[i][t] - old[i][t] for t in idx) / len(idx)
        for t in idx:
            lr = lw if level == "sequence" else logp[i][t] - old[i][t]
            lr = max(-clamp, min(clamp, lr))
            r = math.exp(lr)
            a = adv[i]
            d = ref[i][t] - logp[i][t]
            k3 = min(10.0, math.exp(d) - d - 1)
            total += max(-a * r, -a * max(0.8, min(1.2, r))) + kl_coef * k3 * r
    return total


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_reference_matches_naive_formula_and_gradcheck(level):
    logp, old, adv, mask, ref = batch(4, 7, seed=2, spread=0.5, poison_masked=False)
    kw = dict(kl_coef=0.3, kl_type="k3_ratio", agg="token-sum", ratio_level=level,
              log_ratio_clamp=0.4)
    got = reference.policy_loss(logp, old, adv, mask, ref_logp=ref, **kw).loss
    want = naive(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(),
                 level=level, kl_coef=0.3, clamp=0.4)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # the gradient flows through k3 and through the ratio (not detached)
    f = lambda x: reference.policy_loss(x, old, adv, mask, ref_logp=ref, **kw).loss  # noqa: E731
    assert torch.autograd.gradcheck(f, (logp.detach().requires_grad_(),))


def test_ratio_is_not_detached():
    """With A = 0 only the KL term is left: its gradient differs from k3's by the ratio's
    share k3 ratio, which a detached ratio would drop."""
    logp, old, _, mask, ref = batch(3, 9, seed=5, spread=0.5, poison_masked=False)
    adv = torch.zeros(3, dtype=torch.float64)
    kw = dict(kl_coef=1.0, agg="token-sum", ref_logp=ref)
    _, g3 = run("reference", logp, old, adv, mask, kl_type="k3", **kw)
    _, gr = run("reference", logp, old, adv, mask, kl_type="k3_ratio", **kw)
    x, o, rf = logp.detach(), old, ref
    ratio = (x - o).clamp(-20, 20).exp()
    k3 = reference.kl_estimate(x, rf, "k3")
    assert_close(gr, torch.where(mask, g3 * ratio + k3 * ratio, 0.0), 1e-12, 1e-14)


OPTIONS = [dict(agg="token-mean", dual_clip=3.0),
           dict(agg="seq-mean-token-mean", log_ratio_clamp=None),
           dict(agg="token-sum", ratio_level="sequence"),
           dict(agg="seq-mean-token-sum-norm", ratio_level="sequence", log_ratio_clamp=0.3),
           dict(agg="token-mean", log_ratio_clamp=0.2, weights=True)]


@pytest.mark.parametrize("backend,device", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("adv_2d", [False, True], ids=["adv[B]", "adv[B,T]"])
def test_kernels_match_reference(backend, device, adv_2d):
    for k, opt in enumerate(OPTIONS):
        logp, old, adv, mask, ref = batch(6, 37, seed=40 + k, adv_2d=adv_2d, device=device,
                                          spread=0.4)
        kw = dict(opt, ref_logp=ref, kl_coef=0.2, kl_type="k3_ratio")
        if kw.pop("weights", False):
            kw["is_weights"] = weights(6, 37, per_token=True, seed=k, mask=mask, device=device)
        assert_matches_reference(backend, logp, old, adv, mask, kw, opt)


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_low_precision(monkeypatch, isa, dtype):
    monkeypatch.setenv("MARS_CPU_ISA", isa)
    for (B, T), opt in zip([(3, 17), (2, 64), (4, 250)], OPTIONS[:3]):
        logp, old, adv, mask, ref = batch(B, T, seed=B * T, dtype=dtype, spread=0.4)
        kw = dict(opt, ref_logp=ref, kl_coef=0.2, kl_type="k3_ratio")
        got, got_g = run("cpu", logp, old, adv, mask, **kw)
        want, want_g = run("reference", logp.double(), old.double(), adv.double(), mask,
                           **{**kw, "ref_logp": ref.double()})
        gtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert_close(got.loss, want.loss, 1e-5, 1e-7, f"loss {opt}")
        # GSPO's gradient is a token term plus the row's term: where they cancel, fp32
        # arithmetic is accurate relative to the gradient's scale, not to the element
        scale = want_g.abs().max().item()
        assert_close(got_g, want_g.to(dtype), gtol, gtol * scale, f"grad {opt}")
        assert_close(got.metrics["ref_kl"], want.metrics["ref_kl"], 1e-5, 1e-7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's overflowing exp
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_zero_k3_with_infinite_ratio(backend, level):
    """Clamp off, ratio e^800 = inf (fp32), ref_logp == logp (k3 = 0) and A = 0: the KL
    term is 0 with gradient 0, not 0 * inf. Where k3 > 0 the loss is +inf, as in TRL, and
    the gradient of that token (of its row, GSPO) is not finite (docs/loss.md: inf - inf
    can give NaN there, as in TRL); the other tokens keep finite gradients (token level)."""
    logp = torch.tensor([[799.0, -0.5, -1.0]])
    old = torch.full_like(logp, -1.0)
    adv = torch.zeros(1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    kw = dict(kl_coef=0.5, kl_type="k3_ratio", log_ratio_clamp=None, ratio_level=level,
              agg="token-sum")
    ref = logp.clone()
    out, g = run(backend, logp, old, adv, mask, ref_logp=ref, **kw)
    assert out.loss.item() == 0.0 and (g == 0).all()
    ref[0, 0] = 798.0
    out, g = run(backend, logp, old, adv, mask, ref_logp=ref, **kw)
    assert out.loss.item() == math.inf and not torch.isfinite(g[0, 0])
    if level == "token":
        assert (g[0, 1:] == 0).all()


@pytest.mark.parametrize("backend", ["auto"] + (["triton"] if "triton" in KERNELS else []))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_matches_reference(backend, ratio_level):
    h, W, ids, mask, old, ref, adv = fused_batch(seed=3)
    kw = dict(ref_logp=ref, kl_coef=0.2, kl_type="k3_ratio", ratio_level=ratio_level)
    out = fused_linear_policy_loss(h, W, ids, old, adv, mask, chunk_size=4, backend=backend, **kw)
    got = torch.autograd.grad(out.loss, (h, W))
    want = reference.fused_linear_policy_loss(h, W, ids, old, adv, mask, **kw)
    wgrads = torch.autograd.grad(want.loss, (h, W))
    tol = 1e-5 if backend == "triton" else 1e-9
    assert_close(out.loss, want.loss, tol, 1e-7)
    for a, b in zip(got, wgrads):
        assert_close(a, b, tol, 1e-7)


# ------------------------------------------------------------------------------ peers

TRL_AGG = {"grpo": dict(agg="seq-mean-token-mean"), "bnpo": dict(agg="token-mean"),
           "dr_grpo": dict(agg="seq-mean-token-sum-norm", loss_scale=32),
           "dapo": dict(agg="token-mean")}


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("loss_type", list(TRL_AGG))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("with_is", [False, True])
def test_trl_bias_corrected_kl(backend, loss_type, level, with_is):
    """TRL 1.16 GRPOTrainer._compute_loss with use_bias_correction_kl=True (its default):
    loss, gradient and the logged kl, with and without vLLM importance sampling."""
    pytest.importorskip("trl")
    logp, old, adv, mask, ref = batch(6, 25, seed=8, poison_masked=False, spread=0.4)
    w = weights(6, 25, per_token=True, seed=9, mask=mask, poison=False) if with_is else None
    kw = dict(TRL_AGG[loss_type], num_seqs=6)
    if loss_type == "dapo":
        kw["num_tokens"] = int(mask.sum())
    want, metrics = trl_compute_loss(loss_type, logp, old, adv, mask, ref, w, level=level,
                                     bias_correction_kl=True, max_completion_length=32,
                                     **({"num_items_in_batch": kw["num_tokens"]}
                                        if loss_type == "dapo" else {}))
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=w, clip_low=0.2,
                                clip_high=0.28, kl_coef=0.04, kl_type="k3_ratio",
                                log_ratio_clamp=None, ratio_level=level, backend=backend, **kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    assert out.metrics["ref_kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_liger_bias_corrected_kl(backend, level):
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    logp, old, adv, mask, ref = batch(7, 19, seed=6, poison_masked=False, spread=0.4)
    maskf = mask.double()
    want, metrics = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp, maskf, adv, maskf, ref_per_token_logps=ref, old_per_token_logps=old,
        epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type="bnpo",
        importance_sampling_level=level, use_bias_correction_kl=True)
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28,
                                kl_coef=0.04, kl_type="k3_ratio", log_ratio_clamp=None,
                                ratio_level=level, agg="token-mean", backend=backend)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    g1, = torch.autograd.grad(out.loss, logp)
    g2, = torch.autograd.grad(want, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
    assert out.metrics["ref_kl"].item() == pytest.approx(metrics[0].item(), rel=1e-7)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gpu_matches_reference(backend, dtype, level):
    if not mars.backends()[backend].available:
        pytest.skip(mars.backends()[backend].reason)
    logp, old, adv, mask, ref = batch(9, 64, seed=1, dtype=dtype, spread=0.4)
    kw = dict(kl_coef=0.2, kl_type="k3_ratio", ratio_level=level)
    want, want_g = run("reference", logp.double(), old.double(), adv.double(), mask,
                       ref_logp=ref.double(), **kw)
    c = [t.cuda() for t in (logp.detach(), old, adv, mask, ref)]
    got, got_g = run(backend, c[0], c[1], c[2], c[3], ref_logp=c[4], **kw)
    gtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert_close(got.loss, want.loss, 1e-5, 1e-7)
    assert_close(got_g, want_g.to(dtype), gtol, 1e-9)
