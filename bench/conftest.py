"""pytest-benchmark over the cases of `mars.bench` (mars/bench/cases.py): the shapes and
implementations are defined there once; these files only time them with pytest-benchmark.

    pytest bench/ --benchmark-only --benchmark-json=out.json
    python bench/summarize.py out.json > out.md          # ratios within one run

`mars bench` (python -m mars.bench) runs the same cases with its own timer (interleaved
rounds, CUDA events), peak memory, the roofline and the goals. Triton on CPU runs only
through the interpreter, which is far too slow to time, so Triton cases need a GPU.
"""
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_GPU else [])


def cases_for(op_name):
    """pytest params (device, size, impl) of every full-run case of op_name on this machine."""
    from mars.bench import cases as C
    op = C.get_op(op_name)
    return [pytest.param(d, s.name, i.name, id=f"{d}-{s.name}-{i.name}".replace(" ", "_"))
            for d in DEVICES for s in op.sizes(d, quick=False) for i in op.impls_for(d, quick=False)]


def run_case(benchmark, op_name, device, size, impl):
    """Builds one case (pytest.skip with its note where it cannot run), warms it up and
    times it; the peak memory goes to extra_info for the ops that measure it."""
    from mars.bench import Skip, build
    from mars.bench.cases import get_op
    from mars.memory import peak_allocated_bytes
    try:
        call, s, _ = build(op_name, size, impl, device)
        call.fn()
    except Skip as exc:
        pytest.skip(str(exc))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        call.fn()
        sync()

    timed()
    benchmark.group = f"{op_name} {size} {device}"
    benchmark.extra_info.update(op=op_name, size=size, impl=impl, device=device,
                                torch=torch.__version__,
                                device_name=torch.cuda.get_device_name() if device == "cuda"
                                else f"cpu x{torch.get_num_threads()} threads")
    if get_op(op_name).memory:
        call.reset()
        benchmark.extra_info["peak_MiB"] = round(peak_allocated_bytes(call.fn, device) / 2**20, 1)
    benchmark(timed)
