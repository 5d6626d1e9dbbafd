"""Fused lm-head + log-softmax + policy loss (docs/loss.md, "Fused path"): against the reference that
materialises the logits (float64), the Triton epilogue under the interpreter, parity with
Liger's LigerFusedLinearGRPOLoss and Cut Cross-Entropy, peak memory, bad input, the HF
model helper."""
import os

import pytest
import torch

import mars
from mars import reference
from mars.memory import peak_allocated_bytes
from mars.fused_linear import (FusedLinearMarsLoss, fused_linear_policy_loss,
                               token_logprobs)

HAS_TRITON_HERE = mars.backends()["triton"].available
needs_triton = pytest.mark.skipif(not HAS_TRITON_HERE, reason="triton backend not available "
                                  "(no GPU and TRITON_INTERPRET unset)")


def make_batch(B=3, T=7, H=16, V=50, dtype=torch.float64, bias=True, seed=0, empty_row=True,
               adv_per_token=False, pad_id=-100):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    hidden = r(B, T, H).requires_grad_()
    weight = r(V, H, scale=0.4).requires_grad_()
    b = r(V, scale=0.3).requires_grad_() if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    if empty_row:
        mask[min(1, B - 1)] = False
    ids = torch.where(mask, ids, pad_id)  # padding ids are garbage on purpose
    # old/ref log-probs near the current ones so some ratios clip and some do not
    with torch.no_grad():
        cur = reference.token_logprobs(hidden, weight, ids, bias=b, mask=mask).to(dtype)
    old = cur + r(B, T, scale=0.3)
    ref = cur + r(B, T, scale=0.3)
    adv = r(B, T) if adv_per_token else r(B)
    return dict(hidden=hidden, weight=weight, bias=b, ids=ids, mask=mask, old=old, ref=ref, adv=adv)


def run_both(batch, backend="auto", temperature=1.0, chunk_size=None, use_ref=False, old_none=False,
             **opts):
    """(fused LossOutput, fused grads, reference LossOutput in float64, reference grads)."""
    params = [batch["hidden"], batch["weight"]] + ([batch["bias"]] if batch["bias"] is not None else [])
    ref_logp = batch["ref"] if use_ref else None
    old = None if old_none else batch["old"]
    out = fused_linear_policy_loss(batch["hidden"], batch["weight"], batch["ids"], old,
                                   batch["adv"], batch["mask"], bias=batch["bias"],
                                   temperature=temperature, chunk_size=chunk_size,
                                   ref_logp=ref_logp, backend=backend, **opts)
    grads = torch.autograd.grad(out.loss, params)
    d = lambda t: None if t is None else t.detach().double().requires_grad_(t.requires_grad)  # noqa: E731
    dparams = [d(p) for p in params]
    ref = reference.fused_linear_policy_loss(
        dparams[0], dparams[1], batch["ids"], None if old_none else d(batch["old"]), d(batch["adv"]),
        batch["mask"], bias=dparams[2] if len(dparams) == 3 else None, temperature=temperature,
        ref_logp=d(ref_logp), **opts)
    rgrads = torch.autograd.grad(ref.loss, dparams)
    return out, grads, ref, rgrads


def assert_close(out, grads, ref, rgrads, rtol, atol):
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=rtol, atol=atol)
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        torch.testing.assert_close(out.metrics[k].double(), ref.metrics[k].double(), rtol=rtol,
                                   atol=atol, msg=lambda m: f"metric {k}: {m}")
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")


OPTION_SETS = [
    dict(),
    dict(agg="seq-mean-token-mean", kl_coef=0.1, use_ref=True, temperature=0.7),
    dict(agg="token-sum", clip_high=0.28, dual_clip=3.0, temperature=1.3),
    dict(agg="seq-mean-token-sum", kl_coef=0.05, kl_type="k1", use_ref=True, old_none=True),
    dict(agg="seq-mean-token-sum-norm", loss_scale=11.0, kl_coef=0.2, kl_type="k2", use_ref=True),
    dict(agg="token-mean", num_tokens=torch.tensor(37.0), log_ratio_clamp=None),
    dict(ratio_level="sequence", agg="seq-mean-token-mean", temperature=0.9),            # GSPO
    dict(ratio_level="sequence", agg="token-mean", dual_clip=3.0, kl_coef=0.1, use_ref=True,
         num_seqs=5),
]


@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 5])  # T*B = 21: 4 and 5 do not divide it
def test_matches_reference_float64(opts, chunk_size):
    batch = make_batch(adv_per_token=opts.get("agg") == "token-sum")
    out, grads, ref, rgrads = run_both(batch, chunk_size=chunk_size, **opts)
    assert out.loss.dtype == torch.float64
    assert_close(out, grads, ref, rgrads, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [OPTION_SETS[1], OPTION_SETS[6]], ids=["token", "sequence"])
def test_full_mask(opts, dtype):
    """Every token valid: chunks are slices of the rows, gradients written in place."""
    batch = make_batch(B=2, T=9, H=16, V=40, dtype=dtype, empty_row=False, seed=21)
    batch["mask"] = torch.ones_like(batch["mask"], dtype=torch.float32)  # 0/1 floats
    batch["ids"] = batch["ids"].clamp(min=0)
    out, grads, ref, rgrads = run_both(batch, chunk_size=4, **opts)
    tol = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-3)}
    assert_close(out, grads, ref, rgrads, *tol[dtype])


@pytest.mark.parametrize("opts", OPTION_SETS[:3] + OPTION_SETS[6:7], ids=str)
def test_float32_matches_float64_reference(opts):
    batch = make_batch(B=4, T=9, H=24, V=77, dtype=torch.float32, seed=3)
    out, grads, ref, rgrads = run_both(batch, chunk_size=8, **opts)
    assert out.loss.dtype == torch.float32 and grads[1].dtype == torch.float32
    assert_close(out, grads, ref, rgrads, rtol=1e-5, atol=1e-6)


def test_no_bias_and_all_masked():
    batch = make_batch(bias=False, seed=1)
    out, grads, ref, rgrads = run_both(batch, chunk_size=3)
    assert_close(out, grads, ref, rgrads, rtol=1e-9, atol=1e-12)
    batch["mask"] = torch.zeros_like(batch["mask"])
    batch["ids"] = torch.full_like(batch["ids"], -1)
    out, grads, ref, rgrads = run_both(batch)
    assert out.loss.item() == 0.0 and all((g == 0).all() for g in grads)
    assert_close(out, grads, ref, rgrads, rtol=0, atol=0)


def test_bfloat16_inputs():
    batch = make_batch(B=2, T=8, H=32, V=64, dtype=torch.bfloat16, seed=2)
    out, grads, ref, rgrads = run_both(batch, chunk_size=5)
    assert out.loss.dtype == torch.float32
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    # logits computed in fp32 from the bf16 values: only the bf16 rounding of the grads
    assert_close(out, grads, ref, rgrads, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_gpu_mixed_precision_path_on_cpu(monkeypatch, backend, ratio_level):
    """The GPU's bf16 path (bf16 matmuls into an fp32 logits block, dlogits written as bf16
    for the gradient matmuls, an fp32 weight-gradient accumulator), run on CPU."""
    from mars import fused_linear
    monkeypatch.setattr(fused_linear._Head, "upcast_half_on_cpu", False)
    batch = make_batch(B=2, T=8, H=32, V=64, dtype=torch.bfloat16, seed=22)
    out, grads, ref, rgrads = run_both(batch, backend=backend, chunk_size=5, ratio_level=ratio_level,
                                       agg="seq-mean-token-mean")
    assert grads[0].dtype == grads[1].dtype == grads[2].dtype == torch.bfloat16
    assert_close(out, grads, ref, rgrads, rtol=5e-2, atol=5e-3)


def test_mixed_matmul_probe_cpu_twin_is_exact():
    """The CPU twin of the GPU's bf16 x bf16 -> fp32 matmul passes the probe, and equals a
    float32 matmul of the same values bit for bit."""
    from mars import fused_linear
    for dtype in (torch.bfloat16, torch.float16):
        assert fused_linear._mixed_mm_unsupported(torch.device("cpu"), dtype) is None
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(9, 13, generator=g).to(dtype), torch.randn(13, 5, generator=g).to(dtype))
        out = torch.empty(9, 5)
        fused_linear._mm_into(a, b, out)
        assert torch.equal(out, a.float() @ b.float())


def test_mixed_matmul_probe_names_missing_kernels_and_never_catches_oom(monkeypatch):
    from mars import fused_linear
    probe = fused_linear._mixed_mm_unsupported.__wrapped__  # uncached
    cpu = torch.device("cpu")
    for exc in (TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
                RuntimeError("no kernel for this GPU"), NotImplementedError("aten::mm.dtype")):
        def missing(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(fused_linear, "_mm_out_dtype", missing)
        assert probe(cpu, torch.bfloat16) == f"{type(exc).__name__}: {exc}"

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(fused_linear, "_mm_out_dtype", oom)
    with pytest.raises(torch.OutOfMemoryError):
        probe(cpu, torch.bfloat16)
    monkeypatch.setattr(fused_linear, "_mm_out_dtype", lambda a, b, out: out.fill_(3.0))
    assert "wrong values" in probe(cpu, torch.bfloat16)


def test_missing_mixed_matmul_warns_once_and_stays_exact(monkeypatch):
    """Where the probe finds no exact mixed-precision matmul (a GPU whose torch lacks
    out_dtype), the fused loss says so once and runs float32 matmuls: the same numbers as
    the CPU's float32 path, not logits rounded to bf16."""
    from mars import fused_linear
    batch = make_batch(B=2, T=8, H=32, V=64, dtype=torch.bfloat16, seed=23)
    args = (batch["hidden"], batch["weight"], batch["ids"], batch["old"], batch["adv"],
            batch["mask"])
    want = fused_linear_policy_loss(*args, bias=batch["bias"], chunk_size=5)
    want_g = torch.autograd.grad(want.loss, (batch["hidden"], batch["weight"]))
    monkeypatch.setattr(fused_linear._Head, "upcast_half_on_cpu", False)
    monkeypatch.setattr(fused_linear, "_mixed_mm_unsupported",
                        lambda device, dtype: "TypeError: no out_dtype")
    fused_linear._warn_upcast.cache_clear()
    with pytest.warns(RuntimeWarning, match=r"no exact torch.bfloat16 .*TypeError: no out_dtype"
                                            r".*float32 copies"):
        got = fused_linear_policy_loss(*args, bias=batch["bias"], chunk_size=5)
    got_g = torch.autograd.grad(got.loss, (batch["hidden"], batch["weight"]))
    assert torch.equal(got.loss, want.loss)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (device, dtype)
        fused_linear_policy_loss(*args, bias=batch["bias"], chunk_size=5)
    fused_linear._warn_upcast.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_cuda_matches_reference(dtype, backend, ratio_level):
    """On a GPU: the exact mixed-precision matmul is there (no fallback), and the fused loss
    (Triton epilogue with "auto", torch epilogue with "cuda") equals the float64 reference."""
    from mars import fused_linear
    if not mars.backends()[backend if backend != "auto" else "reference"].available:
        pytest.skip(f"backend {backend} not available")
    dev = torch.device("cuda", torch.cuda.current_device())
    if dtype == torch.bfloat16:
        assert fused_linear._mixed_mm_unsupported(dev, dtype) is None
    batch = make_batch(B=3, T=40, H=64, V=1000, dtype=dtype, seed=31)
    cuda = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                else v) for k, v in batch.items()}
    opts = dict(ratio_level=ratio_level, kl_coef=0.05, dual_clip=3.0)
    out = fused_linear_policy_loss(cuda["hidden"], cuda["weight"], cuda["ids"], cuda["old"],
                                   cuda["adv"], cuda["mask"], bias=cuda["bias"],
                                   ref_logp=cuda["ref"], chunk_size=32, backend=backend, **opts)
    grads = torch.autograd.grad(out.loss, (cuda["hidden"], cuda["weight"], cuda["bias"]))
    params = [batch[k].detach().double().requires_grad_() for k in ("hidden", "weight", "bias")]
    ref = reference.fused_linear_policy_loss(
        params[0], params[1], batch["ids"], batch["old"].double(), batch["adv"].double(),
        batch["mask"], bias=params[2], ref_logp=batch["ref"].double(), **opts)
    rgrads = torch.autograd.grad(ref.loss, params)
    # bf16: logits in fp32 from the bf16 values, dlogits rounded to bf16 for the gradient
    # matmuls (as test_gpu_mixed_precision_path_on_cpu)
    tol, gtol = ((2e-5, 1e-6), (1e-4, 1e-6)) if dtype == torch.float32 else \
        ((2e-2, 2e-3), (5e-2, 5e-3))
    torch.testing.assert_close(out.loss.double().cpu(), ref.loss, rtol=tol[0], atol=tol[1])
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, rgrads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        torch.testing.assert_close(g.double().cpu(), rg, rtol=gtol[0], atol=gtol[1],
                                   msg=lambda m: f"grad {name}: {m}")


def test_backward_scales_stored_gradients_and_partial_requires_grad():
    batch = make_batch(seed=4)
    h, w, b = batch["hidden"], batch["weight"], batch["bias"]
    args = (batch["ids"], batch["old"], batch["adv"], batch["mask"])
    (3.0 * fused_linear_policy_loss(h, w, *args, bias=b).loss).backward()
    g3 = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    fused_linear_policy_loss(h, w, *args, bias=b).loss.backward()
    for a, c in zip(g3, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(a, 3.0 * c)
    # frozen lm head (LoRA): only hidden gets a gradient, and it is the same
    w2, b2 = w.detach(), b.detach()
    h.grad = None
    fused_linear_policy_loss(h, w2, *args, bias=b2).loss.backward()
    torch.testing.assert_close(h.grad, g3[0] / 3.0)
    # no grad at all: loss only
    with torch.no_grad():
        out = fused_linear_policy_loss(h, w, *args, bias=b)
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss * 3.0, fused_linear_policy_loss(h, w, *args, bias=b).loss * 3.0)


def test_deterministic():
    batch = make_batch(B=4, T=16, H=32, V=300, dtype=torch.float32, seed=5)
    runs = [run_both(batch, chunk_size=7)[:2] for _ in range(2)]
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_module_and_token_logprobs():
    batch = make_batch(seed=6)
    crit = FusedLinearMarsLoss(clip_high=0.28, temperature=0.8, chunk_size=4, agg="seq-mean-token-mean")
    assert "clip_high=0.28" in repr(crit)
    out = crit(batch["hidden"], batch["weight"], batch["ids"], batch["old"], batch["adv"],
               batch["mask"], bias=batch["bias"])
    ref = reference.fused_linear_policy_loss(batch["hidden"], batch["weight"], batch["ids"],
                                             batch["old"], batch["adv"], batch["mask"],
                                             bias=batch["bias"], clip_high=0.28, temperature=0.8,
                                             agg="seq-mean-token-mean")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-9, atol=1e-12)
    lp = token_logprobs(batch["hidden"], batch["weight"], batch["ids"], bias=batch["bias"],
                        temperature=0.8, mask=batch["mask"], chunk_size=3)
    rlp = reference.token_logprobs(batch["hidden"], batch["weight"], batch["ids"],
                                   bias=batch["bias"], temperature=0.8, mask=batch["mask"])
    assert lp.grad_fn is None and lp.shape == batch["ids"].shape
    torch.testing.assert_close(lp, rlp.detach(), rtol=1e-10, atol=1e-12)
    # no mask: every id must be valid; the log-probs are those of log_softmax directly
    ids = batch["ids"].clamp(min=0)
    lp = token_logprobs(batch["hidden"], batch["weight"], ids, chunk_size=5)
    direct = torch.log_softmax(batch["hidden"] @ batch["weight"].T, -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(lp, direct.detach(), rtol=1e-10, atol=1e-12)


def test_positive_logprobs_never():
    """verl's fused kernel once returned positive log-probs (verl #2656)."""
    batch = make_batch(B=4, T=32, H=16, V=1000, dtype=torch.float32, seed=7, empty_row=False)
    lp = token_logprobs(batch["hidden"] * 10, batch["weight"], batch["ids"], mask=batch["mask"])
    assert (lp <= 0).all() and torch.isfinite(lp).all()


# ----------------------------------------------------------------------------- Triton

@needs_triton
@pytest.mark.parametrize("V,block", [(50, 16), (64, 16), (37, 64)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_triton_kernels_vs_torch(V, block, temperature):
    from mars_kernels import fused_linear as K
    g = torch.Generator().manual_seed(V)
    x = torch.randn(6, V + 3, generator=g)[:, :V] * 4  # row stride > V
    ids = torch.randint(0, V, (6,), generator=g)
    lse, logp = K.lse_logp(x, ids, 1.0 / temperature, block_v=block)
    ref_lse = torch.logsumexp(x.double() / temperature, -1)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp.double(), (x.double() / temperature).gather(1, ids[:, None])[:, 0] - ref_lse,
                               rtol=1e-6, atol=1e-6)
    gr = torch.randn(6, generator=g)
    gr[2] = 0.0
    out = torch.full((6, V), float("nan"))
    K.dlogits(x, ids, lse, gr, 1.0 / temperature, out=out, block_v=block)
    p = torch.softmax(x.double() / temperature, -1)
    expect = gr.double()[:, None] / temperature * (torch.nn.functional.one_hot(ids, V) - p)
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-7)
    assert (out[2] == 0).all()


@needs_triton
@pytest.mark.parametrize("opts", [OPTION_SETS[0], OPTION_SETS[1], OPTION_SETS[6]], ids=str)
def test_triton_backend_matches_reference(opts):
    batch = make_batch(B=3, T=6, H=16, V=45, dtype=torch.float32, seed=8)
    out, grads, ref, rgrads = run_both(batch, backend="triton", chunk_size=4, **opts)
    assert_close(out, grads, ref, rgrads, rtol=1e-5, atol=1e-6)
    lp = token_logprobs(batch["hidden"], batch["weight"], batch["ids"], bias=batch["bias"],
                        mask=batch["mask"], backend="triton", chunk_size=5)
    torch.testing.assert_close(lp.double(), reference.token_logprobs(
        batch["hidden"].double(), batch["weight"].double(), batch["ids"], bias=batch["bias"].double(),
        mask=batch["mask"]).detach(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- peers

def test_parity_with_liger_grpo_loss():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    batch = make_batch(B=4, T=10, H=32, V=90, dtype=torch.float32, seed=9, empty_row=False)
    batch["ids"] = batch["ids"].clamp(min=0)  # Liger reads every id
    h, w, b = batch["hidden"], batch["weight"], batch["bias"]
    cases = [  # (liger options, mars options): where they coincide
        (dict(loss_type="dapo", beta=0.0), dict(agg="token-mean")),
        (dict(loss_type="bnpo", beta=0.0, temperature=0.7), dict(agg="token-mean", temperature=0.7)),
        (dict(loss_type="grpo", beta=0.04, epsilon_high=0.28),
         dict(agg="seq-mean-token-mean", kl_coef=0.04, kl_type="k3", clip_high=0.28, use_ref=True)),
        (dict(loss_type="dr_grpo", beta=0.0, max_completion_length=10),
         dict(agg="seq-mean-token-sum-norm", loss_scale=10)),
        (dict(loss_type="dapo", beta=0.0, importance_sampling_level="sequence"),
         dict(agg="token-mean", ratio_level="sequence")),
    ]
    for lopts, mopts in cases:
        mopts = dict(mopts)
        use_ref = mopts.pop("use_ref", False)
        crit = liger.LigerFusedLinearGRPOLoss(compiled=False, use_ref_model=use_ref, chunk_size=2, **lopts)
        lloss, lmetrics = crit(h, w, batch["ids"], batch["mask"], batch["adv"], bias=b,
                               old_per_token_logps=batch["old"],
                               ref_per_token_logps=batch["ref"] if use_ref else None)
        lgrads = torch.autograd.grad(lloss, (h, w, b))
        out = fused_linear_policy_loss(h, w, batch["ids"], batch["old"], batch["adv"], batch["mask"],
                                       bias=b, ref_logp=batch["ref"] if use_ref else None,
                                       chunk_size=7, log_ratio_clamp=None, **mopts)
        grads = torch.autograd.grad(out.loss, (h, w, b))
        torch.testing.assert_close(out.loss, lloss, rtol=2e-5, atol=1e-6, msg=lambda m: f"{lopts}: {m}")
        for name, a, c in zip(("hidden", "weight", "bias"), grads, lgrads):
            torch.testing.assert_close(a, c, rtol=2e-4, atol=2e-6, msg=lambda m: f"{lopts} grad {name}: {m}")
        clip = out.metrics["clip_frac_high"] + out.metrics["clip_frac_low"]
        torch.testing.assert_close(clip, lmetrics[-1], rtol=1e-5, atol=1e-6)
        if use_ref:
            torch.testing.assert_close(out.metrics["ref_kl"], lmetrics[0], rtol=1e-4, atol=1e-6)


def test_parity_with_cut_cross_entropy():
    cce = pytest.importorskip("cut_cross_entropy", reason="cut-cross-entropy not installed")
    g = torch.Generator().manual_seed(10)
    N, H, V = 24, 32, 130
    e = torch.randn(N, H, generator=g)
    c = torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    nll = None
    for impl in ("cce", "torch_compile"):  # CCE's Triton kernel; its torch.compile fallback
        try:
            nll = cce.linear_cross_entropy(e, c, t, reduction="none", impl=impl)
            break
        except Exception as exc:  # noqa: BLE001 - CCE's kernel needs a GPU; report, then fall back
            reason = f"{impl}: {type(exc).__name__}"
    if nll is None:
        pytest.skip(f"cut-cross-entropy does not run on this machine ({reason})")
    lp = token_logprobs(e[None], c, t[None])[0]
    torch.testing.assert_close(-lp, nll.float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- memory

def test_peak_memory_below_one_logits_buffer():
    B, T, H, V = 8, 512, 32, 16384
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.1).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    old = torch.full((B, T), -9.7)
    adv = torch.randn(B, generator=g)
    logits_bytes = B * T * V * 4  # one [B*T, V] fp32 buffer: 256 MiB

    def fused():
        fused_linear_policy_loss(hidden, weight, ids, old, adv, mask).loss.backward()

    def materialised():
        reference.fused_linear_policy_loss(hidden, weight, ids, old, adv, mask).loss.backward()

    peak = peak_allocated_bytes(fused)
    peak_ref = peak_allocated_bytes(materialised)
    grads_bytes = (B * T * H + V * H) * 4
    assert peak_ref > logits_bytes  # the measurement sees the materialised logits
    assert peak < logits_bytes / 3, (peak, logits_bytes)
    # default chunk: a 32 MiB logits block, plus the two gradients and small per-token tensors
    assert peak < (32 << 20) + 2 * grads_bytes + (8 << 20), peak
    assert peak <= peak_ref / 4, (peak, peak_ref)
    # an explicit chunk bounds the block: 128 tokens x V fp32 = 8 MiB
    peak_small = peak_allocated_bytes(lambda: fused_linear_policy_loss(
        hidden, weight, ids, old, adv, mask, chunk_size=128).loss.backward())
    assert peak_small < (8 << 20) + 2 * grads_bytes + (8 << 20), peak_small


# ----------------------------------------------------------------------------- bad input

def test_bad_input():
    batch = make_batch(seed=12)
    h, w, ids, old, adv, mask = (batch[k] for k in ("hidden", "weight", "ids", "old", "adv", "mask"))

    def call(**kw):
        args = dict(hidden=h, weight=w, ids=ids, old_logp=old, advantages=adv, mask=mask)
        args.update(kw)
        return fused_linear_policy_loss(**args)

    bad_ids = ids.clone()
    bad_ids[0, mask[0].nonzero()[0, 0]] = w.shape[0]  # = V, at an unmasked position
    with pytest.raises(ValueError, match=r"ids must be in \[0, V\)"):
        call(ids=bad_ids)
    bad_ids[0, mask[0].nonzero()[0, 0]] = -3
    with pytest.raises(ValueError, match=r"ids must be in \[0, V\)"):
        call(ids=bad_ids)
    with pytest.raises(ValueError, match=r"ids must be in \[0, V\)"):
        token_logprobs(h, w, ids)  # no mask: the -100 padding ids are out of range
    with pytest.raises(ValueError, match="H = hidden.shape"):
        call(weight=w[:, :-1])
    with pytest.raises(ValueError, match="same dtype"):
        call(hidden=h.detach().half(), weight=w.detach().float())
    with pytest.raises(ValueError, match="ids must be an integer"):
        call(ids=ids.double())
    with pytest.raises(ValueError, match=r"ids must be \[B, T\]"):
        call(ids=ids[:, :-1])
    with pytest.raises(ValueError, match="hidden must be a float"):
        call(hidden=h[0])
    with pytest.raises(ValueError, match="bias must be"):
        call(bias=batch["bias"][:-1])
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="old_logp"):
        call(old_logp=old[:, :-1])
    with pytest.raises(ValueError, match="kl_coef"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="backend"):
        call(backend="gpu")
    # the mask's padding may hold any id (here -100) and any old_logp (here -inf)
    out = call(old_logp=torch.where(mask, old, float("-inf")))
    gh, gw = torch.autograd.grad(out.loss, (h, w))
    assert torch.isfinite(out.loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()


# ----------------------------------------------------------------------------- HF models

def tiny_causal_lm(kind, tie):
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**small), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**small), transformers.LlamaForCausalLM
    torch.manual_seed(13)
    return cls(cfg).float()


@pytest.mark.parametrize("kind,tie", [("qwen2", True), ("llama", False)])
def test_hf_helper_end_to_end(kind, tie):
    from mars.hf_model import lm_head_parameters, response_lm_inputs
    model = tiny_causal_lm(kind, tie)
    weight, bias = lm_head_parameters(model)
    assert (weight is model.get_input_embeddings().weight) == tie
    g = torch.Generator().manual_seed(14)
    B, S, T = 3, 12, 7
    input_ids = torch.randint(3, 97, (B, S), generator=g)
    attn = torch.ones(B, S, dtype=torch.long)
    attn[2, -3:] = 0  # right padding in the response
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.2 - 4.6

    x = response_lm_inputs(model, input_ids, attn, response_length=T)
    assert x.hidden.shape == (B, T, 32) and x.ids.shape == (B, T) and x.mask.shape == (B, T)
    out = fused_linear_policy_loss(x.hidden, x.weight, x.ids, old, adv, x.mask, bias=x.bias,
                                   temperature=0.9, chunk_size=5)
    out.loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # the same loss through the model's own logits
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, S - T - 1:S - 1]
    logp = torch.log_softmax(logits.float() / 0.9, -1).gather(-1, input_ids[:, S - T:, None])[..., 0]
    ref = mars.loss.policy_loss(logp, old, adv, attn[:, S - T:], backend="reference")
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert "model.embed_tokens.weight" in fused_grads
    lp = token_logprobs(x.hidden, x.weight, x.ids, mask=x.mask, temperature=0.9)
    torch.testing.assert_close(lp, torch.where(x.mask.bool(), logp, 0.0).detach(), rtol=1e-5, atol=1e-5)


def test_hf_helper_vlm():
    """A tiny Qwen2-VL with two images per prompt: the helper's hidden states carry the
    images (the log-probs differ without them) and give the model's own log-probs."""
    pytest.importorskip("transformers")
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from tiny_vlm import SPECIALS, build_tiny_vlm
    from mars.hf_model import response_lm_inputs
    model, _, improc = build_tiny_vlm(seed=0)
    rng = np.random.RandomState(15)
    imgs = [Image.fromarray((rng.rand(56, 56, 3) * 255).astype("uint8")) for _ in range(2)]
    enc = improc(images=imgs, return_tensors="pt")
    start, end, pad = (SPECIALS.index(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    n = int(enc["image_grid_thw"][0].prod()) // 4  # merge size 2
    row = ([start] + [pad] * n + [end]) * 2 + list(range(10, 22))
    input_ids = torch.tensor([row])
    extra = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                 mm_token_type_ids=(input_ids == pad).int())
    S, T = input_ids.shape[1], 6
    x = response_lm_inputs(model, input_ids, response_length=T, **extra)

    def direct(**kw):
        logits = model(input_ids=input_ids, **kw).logits[:, S - T - 1:S - 1]
        return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, S - T:, None])[..., 0].detach()

    lp = token_logprobs(x.hidden, x.weight, x.ids)
    torch.testing.assert_close(lp, direct(**extra), rtol=1e-5, atol=1e-5)
    assert (lp - direct()).abs().max() > 1e-3  # the image changes the numbers


def test_hf_helper_refuses_softcapped_logits():
    from mars.hf_model import lm_head_parameters
    model = tiny_causal_lm("qwen2", True)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_parameters(model)


def test_hf_helper_refuses_scaled_logits():
    """Granite divides the head's logits by config.logits_scaling: not hidden @ W^T."""
    transformers = pytest.importorskip("transformers")
    from mars.hf_model import lm_head_parameters
    cfg = transformers.GraniteConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, logits_scaling=4.0)
    model = transformers.GraniteForCausalLM(cfg)
    with pytest.raises(ValueError, match="logits_scaling"):
        lm_head_parameters(model)
    model.config.logits_scaling = 1.0
    assert lm_head_parameters(model)[0] is model.lm_head.weight


def test_zero_length_responses():
    """T = 0 (and B = 0): loss 0, zero gradients of the right shapes, for every aggregation."""
    for B, T in ((3, 0), (0, 4)):
        b = make_batch(B=max(B, 1), T=max(T, 1), empty_row=False)
        hidden = b["hidden"].detach()[:B, :T].clone().requires_grad_()
        ids = b["ids"][:B, :T]
        z = torch.zeros(B, T, dtype=torch.float64)
        for agg in reference.LOSS_AGGS:
            for rl in ("token", "sequence"):
                out = fused_linear_policy_loss(hidden, b["weight"], ids, z, torch.zeros(B, dtype=torch.float64),
                                               torch.zeros(B, T, dtype=torch.bool), agg=agg, ratio_level=rl)
                gh, gw = torch.autograd.grad(out.loss, [hidden, b["weight"]])
                assert out.loss.item() == 0.0, (B, T, agg, rl)
                assert (gh == 0).all() and (gw == 0).all()
