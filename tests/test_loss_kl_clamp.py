"""The `kl_clamp` option of mars.loss (docs/loss.md, "KL estimators"): k3 (and k3_ratio's
k3) clamped to [-kl_clamp, kl_clamp] with d to +-20 (verl's low_var_kl, the default 10), or
neither clamp with kl_clamp=None (TRL 1.16's k3 = exp(d) - d - 1, d = ref - logp).

At log-ratios d = 3.5, 6, 12 (k3 = 28.6, 396, 162742: past the clamp of 10) and d = -12, in
float64: TRL's formula and TRL's own `_compute_loss` against every backend here (reference,
the C++ op on each CPU instruction set, Triton under the interpreter), loss and gradient,
token and sequence level; the fused path; the options' checks."""
import math

import pytest
import torch

import mars
from mars import reference
from test_loss_is_weights import check_fused_against_reference, run, trl_compute_loss
from test_policy_loss import KERNELS, assert_close

D_FAR = [3.5, 6.0, 12.0, -12.0]  # ref_logp - logp: k3 = 28.6, 396, 162742, 11.0, all past 10
ISAS = ["scalar", "avx2", "avx512"]


def far_batch(dtype=torch.float64, poison=True):
    """[2, 6] rollouts whose valid tokens have d = ref - logp in D_FAR (and two small d),
    log-ratios to old_logp up to 0.3, one masked token per row (holding garbage with
    poison; TRL multiplies masked tokens by 0, so its peer runs get finite ones)."""
    d = torch.tensor([[3.5, 6.0, 12.0, -12.0, 0.1, 0.0],
                      [-3.5, 12.0, 6.0, 3.5, -0.2, 0.0]], dtype=torch.float64)
    logp = -torch.linspace(0.1, 2.4, 12, dtype=torch.float64).reshape(2, 6)
    ref = logp + d
    old = logp + torch.tensor([[0.1, -0.1, 0.05, 0.0, -0.2, 0.0],
                               [0.3, -0.3, 0.0, 0.15, 0.1, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 5] = False
    if poison:
        logp[:, 5], ref[:, 5], old[:, 5] = -math.inf, math.nan, 7.0
    adv = torch.tensor([0.5, -0.8], dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ref.to(dtype)


def trl_k3(logp, ref):
    """TRL 1.16's per_token_kl (grpo_trainer.py): exp(ref - logp) - (ref - logp) - 1."""
    return torch.exp(ref - logp) - (ref - logp) - 1


# ------------------------------------------------------------------------------ reference

@pytest.mark.parametrize("d", D_FAR + [0.1, -0.1, 1e-4])
def test_reference_unclamped_k3_is_trls_formula(d):
    logp = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    ref = logp.detach() + d
    k3 = reference.kl_estimate(logp, ref, "k3", kl_clamp=None)
    (g,) = torch.autograd.grad(k3.sum(), logp)
    assert k3.item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12)
    assert g.item() == pytest.approx(-math.expm1(d), rel=1e-12)      # d/dlogp (e^d - d - 1)
    clamped = reference.kl_estimate(logp, ref, "k3")                    # verl's default
    assert clamped.item() == pytest.approx(min(10.0, math.exp(d) - d - 1), rel=1e-12)
    # a number clamps at that number (d still to +-20)
    k5 = reference.kl_estimate(logp, ref, "k3", kl_clamp=5.0)
    assert k5.item() == pytest.approx(min(5.0, math.exp(d) - d - 1), rel=1e-12)


def test_one_token_at_log_ratio_3_5_trl_vs_verl_clamp():
    """One token at d = 3.5 among 8, beta 0.04, A = 0.5, loss_type grpo, no bias
    correction, on-policy (the policy term is -A = -0.5): TRL's KL share of the loss 0.143
    and gradient -0.223 there (verl's clamp: 0.050 and -0.0625)."""
    pytest.importorskip("trl")
    logp = torch.full((1, 8), -1.0, dtype=torch.float64, requires_grad=True)
    ref = logp.detach().clone()
    ref[0, 0] += 3.5
    adv, mask = torch.tensor([0.5], dtype=torch.float64), torch.ones(1, 8, dtype=torch.bool)
    want, _ = trl_compute_loss("grpo", logp, logp.detach(), adv, mask, ref, None, beta=0.04)
    (want_g,) = torch.autograd.grad(want, logp)
    assert want.item() + 0.5 == pytest.approx(0.143, abs=5e-4)
    assert want_g[0, 0].item() == pytest.approx(-0.223, abs=5e-4)
    for backend in ["reference"] + KERNELS:
        kw = dict(ref_logp=ref, kl_coef=0.04, kl_type="k3", agg="seq-mean-token-mean",
                  log_ratio_clamp=None)
        out, g = run(backend, logp, logp.detach(), adv, mask, **{**kw, "kl_clamp": None})
        assert out.loss.item() == pytest.approx(want.item(), rel=1e-12), backend
        assert_close(g, want_g, 1e-12, 1e-15, backend)
        out, g = run(backend, logp, logp.detach(), adv, mask, **kw)   # the default: verl's clamp
        assert out.loss.item() + 0.5 == pytest.approx(0.05, rel=1e-12)
        assert g[0, 0].item() == pytest.approx(-0.0625, rel=1e-12)


# ------------------------------------------------------------------------------ backends

@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("kl_type", ["k3", "k3_ratio"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_backend_gives_trls_formula_past_the_clamp(backend, kl_type, level):
    """A = 0 leaves only the KL term: token-sum loss = beta sum k3 (times the ratio for
    k3_ratio), gradient beta d/dlogp of it, with TRL's unclamped k3; float64."""
    logp, old, _, mask, ref = far_batch()
    adv = torch.zeros(2, dtype=torch.float64)
    beta = 0.04
    out, g = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=beta, kl_type=kl_type,
                 kl_clamp=None, log_ratio_clamp=None, ratio_level=level, agg="token-sum")
    x = torch.where(mask, logp, -1.0).detach().requires_grad_()
    r_ref = torch.where(mask, ref, 0.0)
    lr = x - torch.where(mask, old, 0.0)
    if level == "sequence":
        lr = (torch.where(mask, lr, 0.0).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).expand_as(x)
    term = trl_k3(x, r_ref) * (torch.exp(lr) if kl_type == "k3_ratio" else 1.0)
    want = beta * torch.where(mask, term, 0.0).sum()
    (want_g,) = torch.autograd.grad(want, x)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    # k3_ratio's gradient beta r (k3 - expm1(d)) cancels terms of 1e5 (d = 12) to ~d
    assert_close(g, torch.where(mask, want_g, 0.0), 1e-10, 1e-9)
    assert torch.isfinite(g).all()
    assert out.metrics["ref_kl"].item() == pytest.approx(
        (torch.where(mask, term, 0.0).sum() / mask.sum()).item(), rel=1e-12)
    # the default (verl's clamp) is not TRL's here: what the option changes
    clamped, _ = run(backend, logp, old, adv, mask, ref_logp=ref, kl_coef=beta, kl_type=kl_type,
                     log_ratio_clamp=None, ratio_level=level, agg="token-sum")
    assert clamped.loss.item() < 0.01 * out.loss.item()


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("bias_correction_kl", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_every_backend_equals_trls_compute_loss_past_the_clamp(backend, loss_type,
                                                                bias_correction_kl, level):
    """TRL 1.16's own GRPOTrainer._compute_loss (policy term + beta k3, with and without
    use_bias_correction_kl) at d up to 12: the options the TRL plug-in passes
    (mars.integrations.trl.loss.loss_plan: log_ratio_clamp=None, kl_clamp=None)."""
    pytest.importorskip("trl")
    from mars.integrations.trl.loss import loss_normalisers, loss_plan

    logp, old, adv, mask, ref = far_batch(poison=False)
    logp.requires_grad_()
    want, metrics = trl_compute_loss(loss_type, logp, old, adv, mask, ref, None, beta=0.04,
                                     level=level, bias_correction_kl=bias_correction_kl,
                                     max_completion_length=6)
    plan = loss_plan(loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.04,
                     importance_sampling_level=level, use_bias_correction_kl=bias_correction_kl,
                     backend=backend)
    assert plan.fallback is None and plan.options["kl_clamp"] is None
    norms = loss_normalisers(loss_type, mask, gradient_accumulation_steps=1,
                             max_completion_length=6)
    opts = {k: v for k, v in plan.options.items() if k != "backend"}
    assert plan.options["backend"] == backend
    out, g = run(backend, logp, old, adv, mask, ref_logp=ref, **norms, **opts)
    (want_g,) = torch.autograd.grad(want, logp)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert_close(g, want_g, 1e-10, 1e-12)
    assert out.metrics["ref_kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-10)


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kl_type", ["k3", "k3_ratio"])
@pytest.mark.parametrize("kl_clamp", [None, 10.0, 4.0])
def test_cpu_float32_paths(monkeypatch, isa, kl_type, kl_clamp):
    """The C++ op's float32 bodies (scalar, AVX2, AVX-512 where the machine has it) against
    the float64 reference, clamped and not."""
    monkeypatch.setenv("MARS_CPU_ISA", isa)
    logp, old, adv, mask, ref = far_batch(torch.float32)
    kw = dict(ref_logp=ref, kl_coef=0.04, kl_type=kl_type, kl_clamp=kl_clamp,
              log_ratio_clamp=None, agg="token-mean")
    got, got_g = run("cpu", logp, old, adv, mask, **kw)
    want, want_g = run("reference", logp.double(), old.double(), adv.double(), mask,
                       **{**kw, "ref_logp": ref.double()})
    assert_close(got.loss, want.loss, 1e-5, 1e-7, "loss")
    # float32 gradient terms are as accurate as their scale, beta expm1(d) r / N (up to 1e3
    # at d = 12), not as their difference (k3_ratio: beta r (k3 - expm1(d)))
    x, o, rf = (torch.where(mask, t.double(), 0.0) for t in (logp, old, ref))
    term = (0.04 * torch.expm1(rf - x).abs() * torch.exp(x - o)).max().item() / mask.sum().item()
    assert_close(got_g, want_g, 1e-5, 4 * torch.finfo(torch.float32).eps * term, "grad")
    assert_close(got.metrics["ref_kl"], want.metrics["ref_kl"], 1e-5, 1e-7)


@pytest.mark.parametrize("backend", ["auto", "cpu"] + (["triton"] if "triton" in KERNELS else []))
@pytest.mark.parametrize("kl_type", ["k3", "k3_ratio"])
def test_fused_path_unclamped(backend, kl_type):
    """fused_linear_policy_loss with kl_clamp=None against the reference (materialised
    logits), with the reference policy far off on some tokens."""
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 2, 5, 8, 24
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    W = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4] = False
    with torch.no_grad():
        cur = reference.token_logprobs(h, W, ids, mask=mask)
    shift = torch.tensor([[3.5, 6.0, 12.0, -12.0, 0.2], [12.0, -3.5, 6.0, 0.1, 0.0]],
                         dtype=torch.float64)
    ref, old = cur + shift, cur + 0.1
    adv = torch.tensor([0.3, -0.6], dtype=torch.float64)
    kw = dict(ref_logp=ref, kl_coef=0.04, kl_type=kl_type, kl_clamp=None, log_ratio_clamp=None)
    _, want = check_fused_against_reference(h, W, ids, old, adv, mask, backend,
                                            lambda grad, rtol: rtol * grad.abs().max().item(), **kw)
    clamped = reference.fused_linear_policy_loss(h, W, ids, old, adv, mask, **{**kw, "kl_clamp": 10.0})
    assert clamped.loss.item() < 0.01 * want.loss.item()


# ------------------------------------------------------------------------------ options

def test_kl_clamp_option_checks_and_inf_is_none():
    logp, old, adv, mask, ref = far_batch()
    kw = dict(ref_logp=ref, kl_coef=0.1, log_ratio_clamp=None, backend="reference")
    for bad in (0, -1.0, math.nan, "10", True, torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="kl_clamp"):
            mars.loss.policy_loss(logp, old, adv, mask, kl_clamp=bad, **kw)
        with pytest.raises(ValueError, match="kl_clamp"):
            mars.loss.MarsLoss(kl_clamp=bad)
    a = mars.loss.policy_loss(logp, old, adv, mask, kl_clamp=math.inf, **kw).loss
    b = mars.loss.policy_loss(logp, old, adv, mask, kl_clamp=None, **kw).loss
    c = mars.loss.policy_loss(logp, old, adv, mask, **kw).loss
    d = mars.loss.policy_loss(logp, old, adv, mask, kl_clamp=10.0, **kw).loss
    assert a.item() == b.item() and c.item() == d.item() and a.item() > 100 * abs(c.item())
    crit = mars.loss.MarsLoss(kl_coef=0.1, kl_clamp=None, log_ratio_clamp=None, backend="reference")
    assert "kl_clamp=None" in repr(crit)
    assert crit(logp, old, adv, mask, ref_logp=ref).loss.item() == b.item()


@pytest.mark.skipif("cpu" not in KERNELS, reason="needs the C++ extension")
def test_op_default_and_nan_refused():
    """torch.ops.mars.policy_loss: kl_clamp defaults to 10 (callers of the old signature
    keep verl's clamp); NaN raises; <= 0 turns it off."""
    logp, old, adv, mask, ref = far_batch()
    mask = mask.clone()
    logp, ref, old = (torch.where(mask, t, -1.0) for t in (logp, ref, old))
    args = (logp, old, adv, mask, ref, None, 0.2, 0.2, -1.0, 0.04, 2, 1, -1.0, -1.0, -1.0, False, -1.0)
    base = torch.ops.mars.policy_loss(*args)[0]
    assert base.item() == torch.ops.mars.policy_loss(*args, 10.0)[0].item()
    off = torch.ops.mars.policy_loss(*args, -1.0)[0]
    want = reference.policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.04, kl_clamp=None,
                                 agg="token-sum", log_ratio_clamp=None).loss
    assert off.item() == pytest.approx(want.item(), rel=1e-12)
    with pytest.raises(ValueError, match="kl_clamp"):
        torch.ops.mars.policy_loss(*args, math.nan)
