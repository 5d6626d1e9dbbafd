"""Higher-order gradients (docs/loss.md, "Backends and gradients"): the reference policy
loss and the reference fused loss pass gradgradcheck in float64; the kernel ops
(mars::policy_loss, mars::policy_loss_triton) and the fused loss's autograd Function give
correct first-order gradients under create_graph=True and raise a RuntimeError naming
backend="reference" on a backward through them, instead of a silent 0."""
import pytest
import torch

import mars
from mars import reference
from mars.fused_linear import fused_linear_policy_loss

KERNELS = [b for b in ("cpu", "triton") if mars.backends()[b].available]


def batch(seed=0, B=3, T=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = logp + 0.15 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = logp + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    old = torch.where(mask, old, float("-inf"))  # masked garbage must not matter
    return logp.requires_grad_(), old, adv, mask, ref


@pytest.mark.parametrize("agg", reference.LOSS_AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_reference_gradgradcheck(agg, ratio_level, kl_type):
    logp, old, adv, mask, ref = batch(seed=len(agg) + len(kl_type))

    def f(x):
        return reference.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.3,
                                     kl_type=kl_type, dual_clip=3.0, agg=agg,
                                     ratio_level=ratio_level).loss

    assert torch.autograd.gradcheck(f, (logp,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (logp,), eps=1e-6, atol=1e-6)


def test_reference_second_derivative_by_hand():
    """Token level, ratio inside the clip range, k2: d2 l / d logp2 = -A r + kl_coef."""
    logp = torch.tensor([[-1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.05]], dtype=torch.float64)
    ref = torch.tensor([[-0.7]], dtype=torch.float64)
    A = torch.tensor([0.8], dtype=torch.float64)
    out = reference.policy_loss(logp, old, A, torch.ones(1, 1, dtype=torch.bool), ref_logp=ref,
                                kl_coef=0.25, kl_type="k2", agg="token-sum")
    (g,) = torch.autograd.grad(out.loss, logp, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), logp)
    r = torch.exp(torch.tensor(0.05, dtype=torch.float64))
    assert h.item() == pytest.approx((-0.8 * r + 0.25).item(), rel=1e-12)


def test_reference_fused_gradgradcheck():
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 2, 3, 3, 5
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    with torch.no_grad():
        old = reference.token_logprobs(h, w, ids, bias=b, mask=mask) + 0.1
    adv = torch.tensor([0.7, -1.2], dtype=torch.float64)

    def f(h, w, b):
        return reference.fused_linear_policy_loss(h, w, ids, old, adv, mask, bias=b,
                                                  temperature=0.8, kl_coef=0.0).loss

    assert torch.autograd.gradgradcheck(f, (h, w, b), eps=1e-6, atol=1e-6)
    out = fused_linear_policy_loss(h, w, ids, old, adv, mask, bias=b, temperature=0.8,
                                   backend="reference")
    (gh,) = torch.autograd.grad(out.loss, h, create_graph=True)
    assert gh.requires_grad  # a real graph behind it


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_kernel_double_backward_raises(backend, ratio_level):
    logp, old, adv, mask, ref = batch(dtype=torch.float32)
    kw = dict(ref_logp=ref, kl_coef=0.1, ratio_level=ratio_level)
    out = mars.loss.policy_loss(logp, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, logp, create_graph=True)
    want = mars.loss.policy_loss(logp, old, adv, mask, backend="reference", **kw)
    (wg,) = torch.autograd.grad(want.loss, logp)
    torch.testing.assert_close(g.detach(), wg, rtol=1e-5, atol=1e-7)  # first order correct
    with pytest.raises(RuntimeError, match='backend="reference"'):
        g.sum().backward()
    # the silent case: a gradient penalty added to the loss
    out = mars.loss.policy_loss(logp, old, adv, mask, backend=backend, **kw)
    (g,) = torch.autograd.grad(out.loss, logp, create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        (out.loss + (g ** 2).sum()).backward()
    # backward(create_graph=True) fills .grad with the same guarded gradient
    x = logp.detach().requires_grad_()
    mars.loss.policy_loss(x, old, adv, mask, backend=backend, **kw).loss.backward(create_graph=True)
    torch.testing.assert_close(x.grad.detach(), wg, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match='backend="reference"'):
        x.grad.sum().backward()


@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_first_order_unaffected(backend):
    """Without create_graph the gradient is a plain tensor (no graph, no error node)."""
    logp, old, adv, mask, _ = batch(dtype=torch.float32)
    out = mars.loss.policy_loss(logp, old, adv, mask, backend=backend)
    (g,) = torch.autograd.grad(out.loss, logp)
    assert g.grad_fn is None and not g.requires_grad


@pytest.mark.parametrize("backend", ["auto"] + (["triton"] if "triton" in KERNELS else []))
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_fused_double_backward_raises(backend, ratio_level):
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 2, 4, 8, 11
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    old = torch.full((B, T), -2.4)
    adv = torch.tensor([1.0, -0.5])
    kw = dict(ratio_level=ratio_level, chunk_size=3)
    out = fused_linear_policy_loss(h, w, ids, old, adv, mask, backend=backend, **kw)
    gh, gw = torch.autograd.grad(out.loss, (h, w), create_graph=True)
    ref = fused_linear_policy_loss(h, w, ids, old, adv, mask, backend="reference", **kw)
    rh, rw = torch.autograd.grad(ref.loss, (h, w))
    torch.testing.assert_close(gh.detach(), rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw.detach(), rw, rtol=1e-5, atol=1e-6)
    for t in (gh, gw):
        with pytest.raises(RuntimeError, match='backend="reference"'):
            (t ** 2).sum().backward(retain_graph=True)
