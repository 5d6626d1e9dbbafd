"""The fused lm-head loss's one-kernel Triton epilogue (mars_kernels.fused_linear.
policy_epilogue) under TRITON_INTERPRET=1, against mars.reference in float64: lse, logp,
the token loss, its gradient and dlogits on odd V / odd n, options, NaN-poisoned outputs,
bf16 / fp16 dlogits written in place; the whole fused loss on the Triton path (gradients of
hidden, weight, bias vs autograd of the reference); the weight gradient cast in blocks; the
kernels lower for sm_80 / sm_90. On a machine with a GPU the kernels run there instead.

Tolerances (fp32 kernel vs float64 reference): lse / logp 1e-6 relative + 1e-5 absolute
(fp32 sums of <= 1000 exponentials); token loss and g 1e-5 relative + 1e-6 absolute,
evaluated by the reference *at the kernel's fp32 logp* so a clip decision cannot flip on
the logp's own rounding; dlogits 1e-5 relative + 1e-7 absolute; bf16 / fp16 dlogits
bit for bit the fp32 kernel's values rounded to nearest even by torch."""
import pytest
import torch

import mars
from mars import _ext, fused_linear, reference
from mars.memory import peak_allocated_bytes
from triton_compile import compile_in_subprocess, compile_jobs, main

# the kernels run on the GPU where there is one, else on CPU tensors in the interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not mars.backends()["triton"].available or (DEV == "cpu" and not _ext.triton_interpret()),
    reason="triton backend not available (no GPU, no TRITON_INTERPRET)")

OPTS = [  # (kernel options, temperature, old_logp given, is_weights given, ref given)
    (dict(), 1.0, True, False, False),
    (dict(clip_high=0.28, dual_clip=3.0), 0.7, True, False, False),
    (dict(kl_coef=0.1, kl_type="k3"), 1.3, True, True, True),
    (dict(kl_coef=0.05, kl_type="k1"), 1.0, False, False, True),
    (dict(kl_coef=0.2, kl_type="k2", clip_high=float("inf"), log_ratio_clamp=None), 0.9,
     True, True, True),
    (dict(kl_coef=0.1, kl_type="k3_ratio", log_ratio_clamp=0.5, dual_clip=10.0), 1.0,
     True, True, True),
    (dict(kl_coef=0.0), 1.0, True, False, True),  # ref given, KL off: ref never read (NaN)
    (dict(kl_coef=0.3, kl_type="k3_ratio", log_ratio_clamp=None), 1.0, False, False, True),
]
OPT_IDS = ["default", "dual,clip-higher,T0.7", "k3,is,T1.3", "k1,on-policy", "k2,no-clamp",
           "k3_ratio,clamp0.5", "kl-off", "k3_ratio,on-policy,no-clamp"]
FULL = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3",
            log_ratio_clamp=20.0)


def chunk(n, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * 3
    ids = torch.randint(0, V, (n,), generator=g)
    lp = torch.log_softmax(x.double(), -1).gather(1, ids[:, None])[:, 0].float()
    far = torch.rand(n, generator=g) < 0.3  # some ratios far out: clip, dual clip, clamps
    old = lp + torch.randn(n, generator=g) * torch.where(far, 2.0, 0.3)
    ref = lp + torch.randn(n, generator=g) * torch.where(far, 3.0, 0.3)
    adv = torch.randn(n, generator=g)
    adv[1] = 0.0  # A == 0: loss 0, gradient 0
    isw = torch.rand(n, generator=g) * 2
    isw[2] = 0.0
    wagg = torch.rand(n, generator=g) + 0.1
    c = dict(x=x, ids=ids, old=old, ref=ref, adv=adv, isw=isw, wagg=wagg)
    return {k: v.to(DEV) for k, v in c.items()}


def expected(c, xk_logp, opts, temp, has_old, has_is, has_ref):
    """float64 reference at the kernel's logp: (loss [n], g [n])."""
    o = {**FULL, **opts}
    n = c["x"].shape[0]
    lp = xk_logp.double()[None].requires_grad_(True)
    old = lp.detach() if not has_old else c["old"].double()[None]
    loss, _, _ = reference.per_token_policy_loss(
        lp, old, c["adv"].double()[None], torch.ones(1, n, dtype=torch.bool, device=DEV),
        ref_logp=c["ref"].double()[None] if o["kl_coef"] > 0 else None,
        is_weights=c["isw"].double()[None] if has_is else None,
        **{k: o[k] for k in FULL}, ratio_level="token")
    (g,) = torch.autograd.grad((loss * c["wagg"].double()).sum(), lp)
    return loss[0].detach(), g[0]


def run_kernel(c, opts, temp, has_old, has_is, has_ref, block_v, out_dtype=None):
    from mars_kernels import fused_linear as K
    n = c["x"].shape[0]
    lse0 = torch.full((n,), float("nan"), device=DEV)
    logp0 = torch.full((n,), float("nan"), device=DEV)
    x = c["x"].clone()
    ref = c["ref"] if opts.get("kl_coef", 0) > 0 else torch.full((n,), float("nan"), device=DEV)
    out = K.policy_epilogue(x, c["ids"], c["adv"], c["wagg"], old_logp=c["old"] if has_old else None,
                            ref_logp=ref if has_ref else None, is_weights=c["isw"] if has_is else None,
                            inv_temp=1.0 / temp, out_dtype=out_dtype, lse=lse0, logp=logp0,
                            block_v=block_v, **{**FULL, **opts})
    assert out[1] is lse0 and out[2] is logp0
    assert out[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # in place
    return out


@needs_triton
@pytest.mark.parametrize("n,V,block_v", [(5, 301, 64), (17, 1000, 256), (7, 517, None)])
@pytest.mark.parametrize("case", OPTS, ids=OPT_IDS)
def test_policy_epilogue_vs_float64_reference(poison, case, n, V, block_v):
    opts, temp, has_old, has_is, has_ref = case
    c = chunk(n, V, seed=V + n)
    d, lse, logp, g, loss = run_kernel(c, opts, temp, has_old, has_is, has_ref, block_v)
    x64 = c["x"].double() / temp
    lse_ref = torch.logsumexp(x64, -1)
    for t in (d, lse, logp, g, loss):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logp.double(), x64.gather(1, c["ids"][:, None])[:, 0] - lse_ref,
                               rtol=1e-6, atol=1e-5)
    loss_ref, g_ref = expected(c, logp, opts, temp, has_old, has_is, has_ref)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-6)
    if not opts.get("kl_coef"):  # A == 0 (token 1), is-weight 0 (token 2): no gradient
        assert g[1] == 0 and loss[1] == 0 and (not has_is or (g[2] == 0 and loss[2] == 0))
    p = torch.softmax(x64, -1)
    d_ref = g_ref[:, None] / temp * (torch.nn.functional.one_hot(c["ids"], V) - p)
    torch.testing.assert_close(d.double(), d_ref, rtol=1e-5, atol=1e-7)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [OPTS[1], OPTS[5]], ids=[OPT_IDS[1], OPT_IDS[5]])
def test_narrow_dlogits_in_place_bit_for_bit(poison, case, dtype):
    """bf16 / fp16 dlogits in the first half of each fp32 row: no element of the row is
    overwritten before it is read (sequential order: the interpreter's), values = the fp32
    kernel's rounded to nearest even (torch's cast), per-token outputs unchanged."""
    opts, temp, has_old, has_is, has_ref = case
    c = chunk(9, 613, seed=4)
    full = run_kernel(c, opts, temp, has_old, has_is, has_ref, 128)
    nar = run_kernel(c, opts, temp, has_old, has_is, has_ref, 128, out_dtype=dtype)  # in place
    d = nar[0]
    assert d.dtype == dtype and d.stride() == (2 * 613, 1)
    assert torch.equal(d, full[0].to(dtype))
    for a, b in zip(full[1:], nar[1:]):
        assert torch.equal(a, b)
    # the GSPO path's separate dlogits kernel, in place the same way
    from mars_kernels import fused_linear as K
    y = c["x"].clone()
    d2 = K.dlogits(y, c["ids"], full[1], full[3], 1.0 / temp, block_v=64, out_dtype=dtype)
    assert d2.stride() == (2 * 613, 1) and torch.equal(d2, full[0].to(dtype))


# ----------------------------------------------------------------------------- whole loss

def batch(B, T, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(DEV, dtype)  # noqa: E731
    hidden = r(B, T, H).requires_grad_()
    weight = r(V, H, scale=0.3).requires_grad_()
    bias = r(V, scale=0.2).requires_grad_()
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, -2:] = False
    ids = torch.where(mask, torch.randint(0, V, (B, T), generator=g), -100).to(DEV)
    mask = mask.to(DEV)
    with torch.no_grad():
        hidden[~mask] = float("nan")  # masked hidden states are never read
        cur = reference.token_logprobs(hidden, weight, ids, bias=bias, mask=mask)
    old = cur + torch.randn(B, T, generator=g).to(DEV) * 0.4
    ref = cur + torch.randn(B, T, generator=g).to(DEV) * 0.4
    return hidden, weight, bias, ids, mask, old, ref


LOSS_OPTS = [
    dict(agg="token-mean"),
    dict(agg="seq-mean-token-mean", kl_coef=0.1, ref=True, temperature=0.7, dual_clip=3.0),
    dict(agg="token-sum", clip_high=0.28, kl_coef=0.05, kl_type="k3_ratio", ref=True,
         adv_per_token=True, is_weights=True),
    dict(agg="seq-mean-token-sum-norm", loss_scale=9.0, kl_coef=0.2, kl_type="k2", ref=True,
         old_none=True, num_seqs=4, log_ratio_clamp=None, is_weights="row"),
]


def spy(monkeypatch):
    from mars_kernels import fused_linear as K
    calls = {"policy_epilogue": 0, "lse_logp": 0, "dlogits": 0}
    for name in calls:
        fn = getattr(K, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(K, name, wrapped)
    return calls


@needs_triton
@pytest.mark.parametrize("opts", LOSS_OPTS, ids=lambda o: o["agg"])
@pytest.mark.parametrize("chunk_size", [4, 7])
def test_fused_loss_triton_matches_reference(poison, monkeypatch, opts, chunk_size):
    opts = dict(opts)
    temperature = opts.pop("temperature", 1.0)
    use_ref, old_none = opts.pop("ref", False), opts.pop("old_none", False)
    adv_tok, use_is = opts.pop("adv_per_token", False), opts.pop("is_weights", False)
    B, T, H, V = 3, 5, 12, 333
    hidden, weight, bias, ids, mask, old, ref = batch(B, T, H, V, seed=chunk_size)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(B, T, generator=g) if adv_tok else torch.randn(B, generator=g)
    isw = None if not use_is else torch.rand(*((B,) if use_is == "row" else (B, T)), generator=g) * 2
    adv, isw = adv.to(DEV), None if isw is None else isw.to(DEV)
    kw = dict(ref_logp=ref if use_ref else None, is_weights=isw, temperature=temperature, **opts)
    calls = spy(monkeypatch)
    out = fused_linear.fused_linear_policy_loss(hidden, weight, ids, None if old_none else old,
                                                adv, mask, bias=bias, chunk_size=chunk_size,
                                                backend="triton", **kw)
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    n = int(mask.sum())
    assert calls == {"policy_epilogue": -(-n // chunk_size), "lse_logp": 0, "dlogits": 0}
    d = lambda t: None if t is None else t.detach().double()  # noqa: E731
    params = [d(t).requires_grad_() for t in (hidden, weight, bias)]
    want = reference.fused_linear_policy_loss(
        *params[:2], ids, None if old_none else d(old), d(adv), mask, bias=params[2],
        **{**kw, "ref_logp": d(kw["ref_logp"]), "is_weights": d(isw)})
    wgrads = torch.autograd.grad(want.loss, params)
    torch.testing.assert_close(out.loss.double(), want.loss, rtol=1e-5, atol=1e-6)
    for k in want.metrics:
        torch.testing.assert_close(out.metrics[k].double(), want.metrics[k].double(), rtol=1e-5,
                                   atol=1e-6)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, wgrads):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (grads[0][~mask] == 0).all()


@needs_triton
def test_gspo_keeps_the_two_kernel_path(monkeypatch):
    hidden, weight, bias, ids, mask, old, _ = batch(2, 5, 8, 301, seed=3)
    adv = torch.tensor([0.7, -1.2], device=DEV)
    calls = spy(monkeypatch)
    out = fused_linear.fused_linear_policy_loss(hidden, weight, ids, old, adv, mask, bias=bias,
                                                chunk_size=3, ratio_level="sequence",
                                                backend="triton")
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    chunks = -(-int(mask.sum()) // 3)
    assert calls == {"policy_epilogue": 0, "lse_logp": chunks, "dlogits": chunks}
    params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.fused_linear_policy_loss(*params[:2], ids, old.double(), adv.double(), mask,
                                              bias=params[2], ratio_level="sequence")
    for a, b in zip(grads, torch.autograd.grad(want.loss, params)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_bf16_gpu_path_in_place_and_weight_gradient_in_blocks(poison, monkeypatch, ratio_level):
    """The GPU's bf16 path on CPU (bf16 matmuls into fp32 logits, bf16 dlogits in place, an
    fp32 weight-gradient accumulator), with the accumulator cut into 5 row blocks: the
    same gradients as one block, and the reference's within bf16 rounding."""
    monkeypatch.setattr(fused_linear._Head, "upcast_half_on_cpu", False)
    hidden, weight, bias, ids, mask, old, ref = batch(3, 6, 16, 401, seed=9, dtype=torch.bfloat16)
    adv = torch.tensor([0.5, -1.0, 1.5], device=DEV)
    kw = dict(bias=bias, ref_logp=ref, kl_coef=0.1, chunk_size=5, ratio_level=ratio_level,
              agg="seq-mean-token-mean", backend="triton")

    def grads():
        out = fused_linear.fused_linear_policy_loss(hidden, weight, ids, old, adv, mask, **kw)
        return out, torch.autograd.grad(out.loss, (hidden, weight, bias))

    out1, one = grads()
    acc_bytes = 401 * 16 * 4
    monkeypatch.setattr(fused_linear._Head, "grad_w_block_bytes", acc_bytes // 5 + 1)
    _, blocked = grads()
    assert all(g.dtype == torch.bfloat16 for g in blocked)
    for a, b in zip(one, blocked):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-6)
    params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    want = reference.fused_linear_policy_loss(
        *params[:2], ids, old.double(), adv.double(), mask, bias=params[2],
        ref_logp=ref.double(), kl_coef=0.1, ratio_level=ratio_level, agg="seq-mean-token-mean")
    torch.testing.assert_close(out1.loss.double(), want.loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(blocked, torch.autograd.grad(want.loss, params)):
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-3)


def test_w_block_rows():
    head = fused_linear._Head.__new__(fused_linear._Head)
    head.acc = torch.float32
    head.grad_w_block_bytes = 1000
    assert head._w_block_rows(301, 10, torch.float32) == 301  # no cast: one block
    rows = head._w_block_rows(301, 10, torch.bfloat16)  # 12040 bytes: 13 blocks
    assert rows * 10 * 4 <= 1000 and -(-301 // rows) == 13
    assert head._w_block_rows(3, 1000, torch.bfloat16) == 1  # at most V blocks


@pytest.mark.parametrize("blocks", [1, 4])
def test_cast_blocks_peak(blocks):
    """Casting the [V, H] fp32 accumulator back to bf16 in blocks: the peak is the
    accumulator (4 V H bytes) plus one cast block (2 V H / blocks), not 6 V H; same values.
    (The accumulator is made inside the measured call: the CPU profiler only sees frees of
    what it saw allocated.)"""
    V, H = 1024, 256
    src = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    want = src.to(torch.bfloat16)
    got = []

    def run():
        parts = [p.clone() for p in src.chunk(blocks)]
        got.append(fused_linear.cast_blocks(parts, torch.bfloat16))
        assert parts == []

    peak = peak_allocated_bytes(run)
    assert torch.equal(got[0], want)
    acc_bytes, one = V * H * 4, V * H * 2 // blocks
    assert acc_bytes + one <= peak <= acc_bytes + one + 4096, (peak, acc_bytes + one)


# ----------------------------------------------------------------------------- lowering

COMPILE_CONFIGS = [  # (HAS_OLD, HAS_IS, HAS_KL, KL_TYPE, HAS_DUAL, HAS_CLAMP, out dtype)
    (True, False, False, 2, False, True, "fp32"),
    (True, True, True, 2, True, True, "bf16"),
    (False, False, True, 0, False, False, "fp16"),
    (True, True, True, 3, True, True, "bf16"),
    (True, False, True, 1, False, True, "fp32"),
    (False, False, True, 3, False, False, "bf16"),  # k3_ratio without the clamp
]


def _compile_all():
    """In a subprocess without TRITON_INTERPRET (tests/triton_compile.py): the epilogue
    kernel's option branches and the dlogits kernel, for sm_80 and sm_90."""
    from mars_kernels import fused_linear as K
    jobs = {}
    for arch in (80, 90):
        for cfg in COMPILE_CONFIGS + [COMPILE_CONFIGS[1][:-1] + ("fp32",)]:
            *flags, odt = cfg
            sig = dict(x_ptr="*fp32", stride_x="i64", out_ptr=f"*{odt}", stride_out="i64",
                       ids_ptr="*i64", lse_ptr="*fp32", logp_ptr="*fp32", g_ptr="*fp32",
                       loss_ptr="*fp32", old_ptr="*bf16", adv_ptr="*fp32", wagg_ptr="*fp32",
                       is_ptr="*fp32", ref_ptr="*fp32", V="i32", inv_temp="fp32", lo="fp32",
                       hi="fp32", dual_c="fp32", kl_coef="fp32", c="fp32", kd="fp32",
                       kk="fp32")  # k3's clamps, runtime (+inf: kl_clamp=None)
            cx = dict(zip(("HAS_OLD", "HAS_IS", "HAS_KL", "KL_TYPE", "HAS_DUAL", "HAS_CLAMP"),
                          flags), K3_TOP=K.K3_TOP_FACTORIAL, K3_BELOW=K.K3_SERIES_BELOW,
                      BLOCK_V=2048)
            jobs[f"epilogue-{'-'.join(map(str, cfg))}-sm{arch}"] = (
                K._policy_epilogue_kernel, sig, cx, arch)
        for odt in ("fp32", "bf16"):
            sig = dict(x_ptr="*fp32", stride_x="i64", out_ptr=f"*{odt}", stride_out="i64",
                       ids_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", V="i32", inv_temp="fp32")
            jobs[f"dlogits-{odt}-sm{arch}"] = (K._dlogits_kernel, sig, dict(BLOCK_V=2048), arch)
    return compile_jobs(jobs)


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(__file__)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("cfg", COMPILE_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_epilogue_kernel_compiles(compiled, arch, cfg):
    """Lowers for the GPUs (types of scalars, constexpr branches: what the interpreter
    cannot check)."""
    r = compiled[f"epilogue-{'-'.join(map(str, cfg))}-sm{arch}"]
    assert r["ok"], r.get("error")


@pytest.mark.parametrize("arch", [80, 90])
def test_in_place_16_bit_dlogits_have_the_block_barrier(compiled, arch):
    """The barrier between each vocab block's load and its store is there exactly when
    dlogits are 16-bit (written in place over the fp32 row; the reductions have their own
    barriers, so the epilogue compares with its fp32 twin)."""
    assert compiled[f"dlogits-bf16-sm{arch}"]["bars"] > 0
    assert compiled[f"dlogits-fp32-sm{arch}"]["bars"] == 0
    twin = "-".join(map(str, COMPILE_CONFIGS[1][:-1]))
    assert compiled[f"epilogue-{twin}-bf16-sm{arch}"]["bars"] > \
        compiled[f"epilogue-{twin}-fp32-sm{arch}"]["bars"]


if __name__ == "__main__":
    main(_compile_all)
