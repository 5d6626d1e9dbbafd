"""Triton policy loss (mars_kernels/policy_loss.py): rows split over a (B, splits)
grid when B is small, the tile partials reduced in a fixed order, the one-kernel backward.

Kernel inputs are fp32 or bf16; the reference (mars.reference.policy_loss, autograd) runs
in float64 on the same (rounded) values, so the tolerances measure the kernel's arithmetic:
fp32 loss / metrics / grads rtol 2e-5 (atol 1e-7 on grads, 1e-6 on the loss), bf16 grads
one bf16 rounding (rtol 2^-8). Forced splits > 1 equal splits = 1 bit for bit (loss,
metrics, grad, row scale). Interpreter shapes: B <= 9, T <= 70."""
import pytest
import torch

import mars
from mars import reference
from mars.reference import LOSS_AGGS, LOSS_METRICS

pytest.importorskip("triton")
if not mars.backends()["triton"].available:
    pytest.skip(mars.backends()["triton"].reason, allow_module_level=True)

from mars_kernels import policy_loss as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KL_TYPES = ("k1", "k2", "k3", "k3_ratio")


def make(B, T, *, seed=0, adv_2d=False, is_w=None, dtype=torch.float32):
    """(logp, old, adv, mask, ref, is_weights) in `dtype` on DEV: masked positions hold
    -inf / NaN / 1e30, some rows empty, advantages with exact zeros, ratios across the
    clip range."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn((B, T) if adv_2d else (B,), generator=g, dtype=torch.float64)
    adv[torch.rand(adv.shape, generator=g) < 0.1] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.3
    if B > 2:
        mask[torch.randperm(B, generator=g)[: max(1, B // 4)]] = False
    w = None
    if is_w == "2d":
        w = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
        w[torch.rand(B, T, generator=g) < 0.1] = 0.0
    elif is_w == "1d":
        w = torch.rand(B, generator=g, dtype=torch.float64) * 2
    junk = torch.tensor([float("-inf"), float("nan"), 1e30], dtype=torch.float64)
    fill = junk[torch.randint(0, 3, (B, T), generator=g)]
    logp, old, ref = (torch.where(mask, t, fill) for t in (logp, old, ref))
    if adv_2d:
        adv = torch.where(mask, adv, fill)
    if w is not None and w.dim() == 2:
        w = torch.where(mask, w, fill)
    cast = lambda t: None if t is None else t.to(DEV, dtype)  # noqa: E731
    return cast(logp), cast(old), cast(adv), mask.to(DEV), cast(ref), cast(w)


def loss_and_grad(backend, logp, old, adv, mask, ref, w, scale=1.0, **kw):
    x = logp.detach().requires_grad_()
    out = mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref, is_weights=w, backend=backend,
                                **kw)
    (g,) = torch.autograd.grad(out.loss * scale, x)
    return out, g


def check_vs_reference(inputs, kw, scale=1.0):
    """Kernel (inputs' dtype) vs the float64 reference on the same values."""
    logp, old, adv, mask, ref, w = inputs
    up = [None if t is None else t.double() for t in inputs]
    up[3] = mask
    want, want_g = loss_and_grad("reference", *up, scale=scale, **kw)
    got, got_g = loss_and_grad("triton", *inputs, scale=scale, **kw)
    assert got_g.dtype == logp.dtype and got.loss.dtype == torch.float32
    assert torch.isfinite(got_g).all() and (got_g[~mask] == 0).all()
    close = lambda a, b, r, at, what: torch.testing.assert_close(  # noqa: E731
        a.double().cpu(), b.double().cpu(), rtol=r, atol=at, msg=f"{what} {kw}")
    close(got.loss, want.loss, 2e-5, 1e-6, "loss")
    for k in LOSS_METRICS:
        close(got.metrics[k], want.metrics[k], 2e-5, 1e-6, k)
    if logp.dtype == torch.bfloat16:  # one rounding to bf16 of an fp32-accurate value
        close(got_g, want_g, 2 ** -8, 1e-9, "grad")
    else:
        close(got_g, want_g, 2e-5, 1e-7, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("agg", LOSS_AGGS)
def test_matches_reference(agg, ratio_level, kl_type, dtype, poison):
    """Every aggregation x ratio level x KL type, dual clip, poisoned buffers; B = 5 and
    T = 67 give 5 tiles of 16, split over 5 programs per row."""
    assert K.tiling(5, 67, torch.device(DEV))[3] > 1 or DEV == "cuda"
    kw = dict(agg=agg, ratio_level=ratio_level, kl_type=kl_type, kl_coef=0.05, dual_clip=3.0)
    check_vs_reference(make(5, 67, seed=len(agg) + len(kl_type), dtype=dtype), kw)


@pytest.mark.parametrize("case", [
    dict(B=1, T=70), dict(B=9, T=33, adv_2d=True), dict(B=7, T=1), dict(B=3, T=17, is_w="2d"),
    dict(B=8, T=49, is_w="1d"), dict(B=6, T=64, adv_2d=True, is_w="2d")], ids=str)
@pytest.mark.parametrize("opt", [
    dict(), dict(clip_high=0.28, dual_clip=10.0), dict(log_ratio_clamp=None, kl_coef=0.1),
    dict(agg="seq-mean-token-mean", ratio_level="sequence", kl_coef=0.1, kl_type="k3_ratio"),
    dict(agg="seq-mean-token-sum-norm", loss_scale=40.0, num_seqs=11.0),
    dict(agg="token-mean", num_tokens=123.0, kl_coef=0.2, kl_type="k2")], ids=str)
def test_shapes_and_options(case, opt, poison):
    """Odd T, T = 1, B = 1, [B, T] advantages, is_weights [B, T] and [B], global
    normalisers, clamp off; the upstream gradient is not 1 (scale 3.5)."""
    case = dict(case)
    B, T = case.pop("B"), case.pop("T")
    check_vs_reference(make(B, T, seed=B * T, **case), dict(opt), scale=3.5)


@pytest.mark.parametrize("opt", [
    dict(agg="seq-mean-token-mean", kl_coef=0.1, kl_type="k3_ratio", dual_clip=3.0),
    dict(agg="token-mean", ratio_level="sequence", kl_coef=0.1),
    dict(agg="seq-mean-token-sum-norm", ratio_level="sequence", kl_type="k3_ratio",
         kl_coef=0.2)], ids=str)
def test_one_program_per_row_matches_reference(opt, monkeypatch, poison):
    """B >= the target (4 here): splits = 1, each program adds its row's tiles itself."""
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 4)
    if DEV == "cpu":
        assert K.tiling(9, 70, torch.device(DEV))[3] == 1
    check_vs_reference(make(9, 70, seed=3, is_w="2d", dtype=torch.float32), opt, scale=0.7)


def test_empty_rows_and_all_masked(poison):
    """A batch whose rows are all empty gives loss 0, metrics 0, gradient 0 (no 0 / 0)."""
    logp, old, adv, _, ref, _ = make(4, 40)
    mask = torch.zeros(4, 40, dtype=torch.bool, device=DEV)
    for agg in LOSS_AGGS:
        out, g = loss_and_grad("triton", logp, old, adv, mask, ref, None, agg=agg, kl_coef=0.1)
        assert out.loss.item() == 0.0 and (g == 0).all()
        assert all(out.metrics[k].item() == 0.0 for k in LOSS_METRICS)


def test_tiling_rule(monkeypatch):
    """BLOCK depends on T only; splits fill the target when B is small, 1 once B >= target,
    never more than the tiles of a row."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 132)
    for T in (1, 16, 17, 70, 1000, 8192, 8193):
        blocks = {K.tiling(B, T, cpu)[0] for B in (1, 8, 500)}
        assert len(blocks) == 1
        block, nt, tps, splits = K.tiling(8, T, cpu)
        assert nt == max(1, -(-T // block)) and splits * tps >= nt > (splits - 1) * tps
        assert splits == min(nt, 17)
        assert K.tiling(132, T, cpu)[3] == 1 and K.tiling(1000, T, cpu)[3] == 1
    assert K.tiling(8, 8192, cpu)[3] * 8 >= 128  # B = 8 at T = 8192: 128 programs, not 8


CONFIGS = [
    dict(agg="token-mean", kl_coef=0.1, dual_clip=3.0),
    dict(agg="seq-mean-token-mean", kl_coef=0.1, kl_type="k3_ratio", is_w="2d"),
    dict(agg="seq-mean-token-sum", ratio_level="sequence", kl_coef=0.1, kl_type="k3_ratio"),
    dict(agg="seq-mean-token-sum-norm", ratio_level="sequence", adv_2d=True, is_w="1d"),
    dict(agg="token-sum", log_ratio_clamp=None, kl_type="k1", kl_coef=0.3),
]


def launch(inputs, splits, agg="token-mean", ratio_level="token", kl_coef=0.0, kl_type="k3",
           dual_clip=None, log_ratio_clamp=20.0):
    logp, old, adv, mask, ref, w = inputs
    return K.policy_loss(logp, old, adv, mask, ref, w, 0.2, 0.2,
                         -1.0 if dual_clip is None else dual_clip, kl_coef,
                         reference.KL_TYPES.index(kl_type), LOSS_AGGS.index(agg), -1.0, -1.0,
                         -1.0, ratio_level == "sequence",
                         -1.0 if log_ratio_clamp is None else log_ratio_clamp, splits=splits)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_splits_equal_one_split_bit_for_bit(cfg, dtype, poison):
    """Forced splits 2, 3, NT give the very bits of splits = 1: the tile partials do not
    depend on the program that wrote them and are reduced in one fixed order. Twice the
    same call: the same bits (deterministic)."""
    cfg = dict(cfg)
    data = {k: cfg.pop(k) for k in ("adv_2d", "is_w") if k in cfg}
    inputs = make(3, 70, seed=7, dtype=dtype, **data)
    nt = K.tiling(3, 70, torch.device(DEV))[1]
    assert nt >= 4
    base = launch(inputs, 1, **cfg)
    assert all(torch.isfinite(t).all() for t in base)
    for s in (2, 3, nt, 1):
        got = launch(inputs, s, **cfg)
        for a, b, name in zip(got, base, ("loss", "metrics", "grad", "row_scale")):
            assert torch.equal(a, b), f"{name} splits={s} {cfg}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 67), (9, 70), (3, 0)])
def test_backward_kernel_bits(dtype, shape, poison):
    """policy_loss_backward: bit for bit torch's grad * (row_scale * g)[:, None] cast to
    logp's dtype, g a 0-dim tensor on the device (not 1), poisoned output."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    grad = torch.randn(shape, generator=gen, dtype=acc).to(DEV)
    rs = torch.rand(shape[:1], generator=gen, dtype=acc).to(DEV) / 7
    gl = torch.tensor(-2.3, dtype=acc, device=DEV)
    got = K.policy_loss_backward(grad, rs, gl, dtype)
    want = (grad * (rs * gl)[:, None]).to(dtype)
    assert got.dtype == dtype and got.shape == grad.shape
    assert torch.equal(got, want)


def test_backward_goes_through_one_kernel(monkeypatch):
    """loss.backward() on backend triton calls policy_loss_backward once (scale, upstream
    grad, cast in one launch) and returns its numbers."""
    import mars._ext as ext
    if not hasattr(ext, "policy_loss_triton_backward"):
        pytest.skip("mars/ops/_ext.py does not route the Triton backward to the kernel yet")
    calls = []
    real = K.policy_loss_backward

    def spy(*args):
        calls.append(args[-1])
        return real(*args)
    monkeypatch.setattr(K, "policy_loss_backward", spy)
    inputs = make(4, 30, dtype=torch.bfloat16)
    _, g = loss_and_grad("triton", *inputs, scale=2.0, kl_coef=0.1)
    assert calls == [torch.bfloat16] and g.dtype == torch.bfloat16


def test_tensor_normaliser_and_compile(poison):
    """A tensor normaliser divides outside the op, so the backward's upstream gradient is a
    device tensor 1 / d; and the op traces under torch.compile (aot_eager, fullgraph)."""
    logp, old, adv, mask, ref, _ = make(6, 45)
    nt = torch.tensor(77.0, device=DEV)
    check_vs_reference((logp, old, adv, mask, ref, None), dict(num_tokens=nt, kl_coef=0.1))

    def step(x):
        return mars.loss.policy_loss(x, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                     agg="seq-mean-token-mean", backend="triton").loss
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logp.detach().requires_grad_(), logp.detach().requires_grad_()
    compiled(x1).backward()
    step(x2).backward()
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("seq", [False, True])
def test_launcher_issues_only_kernels(seq, monkeypatch):
    """The launchers run no torch compute op (no multiply, cast, sum or copy: only
    allocations and views) and launch 2 kernels forward (3 with GSPO), 1 backward; the grid
    is (B, splits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.name, tuple(grid)))
    for name in ("_policy_loss_fwd", "_policy_loss_finalize", "_gspo_add", "_policy_loss_bwd"):
        monkeypatch.setattr(K, name, Stub(name))
    inputs = make(5, 40, is_w="2d", adv_2d=True)
    gl = torch.tensor(2.0, device=DEV)
    splits = K.tiling(5, 40, torch.device(DEV))[3]
    with Ops() as mode:
        out = launch(inputs, None, agg="seq-mean-token-mean", kl_coef=0.1,
                     ratio_level="sequence" if seq else "token")
        K.policy_loss_backward(out[2], out[3], gl, torch.bfloat16)
    views = {"aten.view.default", "aten.view.dtype", "aten.detach.default"}  # no kernel
    assert mode.seen <= {"aten.empty.memory_format"} | views
    want = [("_policy_loss_fwd", (5, splits)), ("_policy_loss_finalize", (1,))]
    want += [("_gspo_add", (5, splits))] if seq else []
    assert launches == want + [("_policy_loss_bwd", (1,))]
