"""The Triton kernels (losses, and the advantage's) compile for the GPUs users have (sm_80,
sm_90), here on the CPU: `triton.compile` to PTX and a cubin (ptxas) for a GPU target, no
GPU needed.
The interpreter (TRITON_INTERPRET=1, the other tests) checks their numbers but not that
they lower: types of scalar arguments, float64 bit casts, constexpr branches. The compiler
runs in a subprocess without TRITON_INTERPRET (under it @triton.jit gives interpreted
functions). Skipped where this Triton has no CUDA backend."""
import pytest

pytest.importorskip("triton")

from triton_compile import compile_in_subprocess, compile_jobs, main  # noqa: E402

ARCHS = (80, 90)
POLICY_CONFIGS = [  # (DT, KL_TYPE, SEQ, HAS_IS, IS_2D, ADV_2D, HAS_DUAL, HAS_CLAMP)
    ("fp32", 2, False, True, True, False, True, True),
    ("fp32", 3, True, True, False, True, False, False),
    ("fp64", 3, False, False, False, False, True, True),
    ("fp64", 0, True, True, True, True, True, False),
]


def _compile_all():
    """Runs in the subprocess: {name: tests/triton_compile.compile_jobs' result}."""
    import triton.language as tl

    from mars_kernels import advantage as A
    from mars_kernels import fused_linear as F
    from mars_kernels import policy_loss as K

    jobs = {}
    for arch in ARCHS:
        for cfg in POLICY_CONFIGS:
            dt, kl_type, seq, has_is, is_2d, adv_2d, has_dual, has_clamp = cfg
            ptr = f"*{dt}"
            sig = dict(lp_ptr="*bf16", old_ptr="*bf16", adv_ptr="*bf16", mask_ptr="*u8",
                       ref_ptr="*bf16", is_ptr="*bf16", grad_ptr=ptr, part_ptr="*fp64", B="i32",
                       T="i32", NT="i32", TPS="i32", lo_bits="i64", hi_bits="i64",
                       dual_bits="i64", kl_bits="i64",
                       clamp_bits="i32",  # a bit pattern that fits in 32 bits is typed i32
                       kd_bits="i64", kk_bits="i64")  # k3's clamps (20 and 10; +inf: off)
            cx = dict(ADV_2D=adv_2d, HAS_IS=has_is, IS_2D=is_2d, HAS_REF=True,
                      KL_TYPE=kl_type, HAS_KL=True, HAS_DUAL=has_dual, HAS_CLAMP=has_clamp,
                      SEQ=seq, DT=tl.float32 if dt == "fp32" else tl.float64, BLOCK=256,
                      K3_TOP=K.K3_TOP_FACTORIAL, K3_BELOW=K.K3_SERIES_BELOW,
                      ROW_SUM=has_dual)  # both the per-tile and the per-row partials
            jobs[f"policy_loss-{'-'.join(map(str, cfg))}-sm{arch}"] = (K._policy_loss_fwd, sig,
                                                                        cx, arch)
        # B = T = 1 (and NT = TPS = 1): Triton makes int arguments equal to 1 constexprs
        ones = dict(B=1, T=1, NT=1, TPS=1)
        sig = {k: v for k, v in sig.items() if k not in ones}
        jobs[f"policy_loss-ones-sm{arch}"] = (K._policy_loss_fwd, sig, {**cx, **ones}, arch)
        for dt in ("fp32", "fp64"):
            ptr = f"*{dt}"
            DT = tl.float32 if dt == "fp32" else tl.float64
            sig = dict(part_ptr="*fp64", loss_ptr=ptr, metrics_ptr=ptr, rs_ptr=ptr, add_ptr=ptr,
                       B="i32", T="i32", NP="i32", nt_bits="i64", ns_bits="i64", ls_bits="i64")
            for agg, seq in ((2, True), (4, False), (0, False)):
                jobs[f"finalize-{dt}-{agg}-{seq}-sm{arch}"] = (K._policy_loss_finalize, sig, dict(
                    AGG=agg, SEQ=seq, DT=DT, RB=64), arch)
            jobs[f"finalize-{dt}-ones-sm{arch}"] = (K._policy_loss_finalize, {
                k: v for k, v in sig.items() if k not in ("B", "T", "NP")}, dict(
                AGG=4, SEQ=True, DT=DT, RB=16, B=1, T=1, NP=1), arch)
            sig = dict(grad_ptr=ptr, mask_ptr="*u8", add_ptr=ptr, T="i32", NT="i32", TPS="i32")
            jobs[f"gspo_add-{dt}-sm{arch}"] = (K._gspo_add, sig, dict(BLOCK=256), arch)
            for out in (("bf16", "fp32") if dt == "fp32" else ("fp64",)):
                sig = dict(grad_ptr=ptr, rs_ptr=ptr, gl_ptr=ptr, out_ptr=f"*{out}", n="i64",
                           T="i32")
                jobs[f"backward-{dt}-{out}-sm{arch}"] = (K._policy_loss_bwd, sig, dict(
                    BLOCK=1024, OUT_BF16=out == "bf16"), arch)
        sig = dict(x_ptr="*fp32", stride_x="i64", ids_ptr="*i64", lse_ptr="*fp32",
                   logp_ptr="*fp32", V="i32", inv_temp="fp32")
        jobs[f"lse_logp-sm{arch}"] = (F._lse_logp_kernel, sig, dict(BLOCK_V=1024), arch)
        sig = dict(x_ptr="*fp32", stride_x="i64", out_ptr="*bf16", stride_out="i64",
                   ids_ptr="*i64", lse_ptr="*fp32", g_ptr="*fp32", V="i32", inv_temp="fp32")
        jobs[f"dlogits-sm{arch}"] = (F._dlogits_kernel, sig, dict(BLOCK_V=1024), arch)
        sig = dict(x_ptr="*fp64", off_ptr="*i64", ord_ptr="*i64", adv_ptr="*fp32",
                   mean_ptr="*fp32", std_ptr="*fp32", count_ptr="*i64", gain_ptr="*fp32",
                   B="i32", eps_bits="i64")
        for norm, raw in ((True, False), (False, True)):
            jobs[f"advantage-{norm}-{raw}-sm{arch}"] = (A._advantage_kernel, sig, dict(
                NORM_BY_STD=norm, UNBIASED=True, SINGLETON_RAW=raw, BLOCK=32), arch)
    return compile_jobs(jobs)


@pytest.fixture(scope="module")
def compiled():
    return compile_in_subprocess(__file__)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", POLICY_CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_policy_loss_kernel_compiles(compiled, arch, cfg):
    r = compiled[f"policy_loss-{'-'.join(map(str, cfg))}-sm{arch}"]
    assert r["ok"], r.get("error")
    assert r["target"] and r["cubin"]
    # options arrive as 64-bit kernel parameters (pointers and the float64 bit patterns)
    assert r["params64"] >= 8 + 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["finalize-fp32-2-True", "finalize-fp32-4-False",
                                    "finalize-fp64-0-False", "finalize-fp32-ones",
                                    "finalize-fp64-ones", "policy_loss-ones",
                                    "gspo_add-fp32", "gspo_add-fp64",
                                    "backward-fp32-bf16", "backward-fp32-fp32",
                                    "backward-fp64-fp64"])
def test_policy_loss_reduce_and_backward_kernels_compile(compiled, arch, kernel):
    """The tile-partials reduction, GSPO's row term and the one-kernel backward (the
    bf16 output rounded from the bits) lower for each GPU target; so do the forward and
    the reduction when B, T (and the tile counts) are 1, which Triton turns into constexprs."""
    r = compiled[f"{kernel}-sm{arch}"]
    assert r["ok"], r.get("error")
    assert r["target"] and r["cubin"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", ["lse_logp", "dlogits"])
def test_fused_epilogue_kernels_compile(compiled, arch, kernel):
    r = compiled[f"{kernel}-sm{arch}"]
    assert r["ok"], r.get("error")
    assert r["target"] and r["cubin"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm,raw", [(True, False), (False, True)])
def test_advantage_kernel_compiles(compiled, arch, norm, raw):
    r = compiled[f"advantage-{norm}-{raw}-sm{arch}"]
    assert r["ok"], r.get("error")
    assert r["target"] and r["cubin"]


if __name__ == "__main__":
    main(_compile_all)
