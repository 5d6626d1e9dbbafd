"""Lowering Triton kernels for CUDA targets on the CPU (`triton.compile` to PTX and a cubin,
no GPU), for the tests that check that the kernels compile: what the interpreter
(TRITON_INTERPRET=1) cannot check (types of scalar arguments, float64 bit casts,
constexpr branches).

A test file defines `_compile_all()` (jobs through `compile_jobs`), ends with
`if __name__ == "__main__": main(_compile_all)`, and its module-scoped fixture returns
`compile_in_subprocess(__file__)`: the file runs again as a script in a subprocess without
TRITON_INTERPRET (under it @triton.jit gives interpreted functions)."""
import json
import os
import subprocess
import sys

import pytest

NO_CUDA_BACKEND = 3  # the script's exit status where this Triton has no CUDA backend


def compile_jobs(jobs):
    """jobs {name: (jit fn, signature {arg: type}, constexprs {arg: value}, arch)} ->
    {name: {"ok": True, "target", "cubin", "params64", "bars"} or {"ok": False, "error"}}:
    target, whether the PTX names sm_{arch}; cubin, whether ptxas gave one; params64, the
    PTX's 64-bit kernel parameters; bars, its bar.sync count. A failure is recorded for the
    test that owns the job, not raised."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for name, (fn, sig, cx, arch) in jobs.items():
        try:
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in cx}},
                            constexprs=cx)
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            ptx = k.asm["ptx"]
            out[name] = dict(ok=True, target=f".target sm_{arch}" in ptx,
                             cubin=bool(k.asm.get("cubin")),
                             params64=ptx.count(".param .u64") + ptx.count(".param .b64"),
                             bars=ptx.count("bar.sync"))
        except Exception as exc:  # noqa: BLE001 - reported by the test that owns the job
            out[name] = dict(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return out


def main(compile_all):
    """The subprocess's entry: prints compile_all()'s results as one JSON line, or the
    import error and exits NO_CUDA_BACKEND where Triton has no CUDA backend."""
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as exc:
        print(exc)
        sys.exit(NO_CUDA_BACKEND)
    print(json.dumps(compile_all()))


def compile_in_subprocess(test_file):
    """Runs test_file as a script (its `main`) without TRITON_INTERPRET, from the repository
    root, and returns its results dict; skips the calling test where Triton has no CUDA
    backend, fails it (with the stderr's tail) on any other non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == NO_CUDA_BACKEND:
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
