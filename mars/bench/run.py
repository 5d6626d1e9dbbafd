"""Runs the cases of `mars bench` and collects compact results (docs/bench.md)."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import re
import sys
import tempfile
import traceback

import torch

from . import cases as C
from .peers import Skip, version
from .timer import FULL, QUICK, Plan, copy_bandwidth, count_syncs, matmul_flops, measure

SCHEMA = "mars-bench/1"


def sig(x: float | None, digits: int = 4):
    """x rounded to `digits` significant digits (compact JSON); None stays None."""
    if x is None:
        return None
    return float(f"{x:.{digits}g}")


def rel_error(got, want) -> float:
    """max |got - want| / max |want| over all tensors of an output (fp64)."""
    num, den = 0.0, 0.0
    if len(got) != len(want):
        raise ValueError(f"output has {len(got)} tensors, the reference {len(want)}")
    for a, b in zip(got, want):
        if a is None or b is None:
            raise ValueError("an output tensor is None (no gradient?)")
        a, b = a.detach().double().reshape(-1), b.detach().double().reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"output shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            return float("inf")
        num = max(num, (a - b).abs().max().item() if a.numel() else 0.0)
        den = max(den, b.abs().max().item() if b.numel() else 0.0)
    return num / max(den, 1e-30)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_KINETO_LINE = re.compile(r"^(STAGE|USDT|ERROR|WARNING|INFO):\d{4}-\d\d-\d\d [^\]]*\.cpp:\d+\] ")


@contextlib.contextmanager
def _quiet_profiler():
    """The torch profiler (CPU peak memory) writes a few log lines per session to the
    process's stderr (file descriptor 2); keep everything else that is written there."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(True)
                    if not _KINETO_LINE.match(line)]
            if kept:
                sys.stderr.write("".join(kept))


def environment(device: str) -> dict:
    """Device and versions for the header of the results."""
    import mars
    try:
        from mars import _build_info as bi
        build = dict(cuda_built=bi.CUDA_BUILT, cuda_arch=bi.CUDA_ARCH_LIST)
    except ImportError:
        build = {}
    env = {
        "device": {"type": device},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": version("triton"),
            "mars": getattr(mars, "__version__", None),
            "verl": version("verl"),
            "liger-kernel": version("liger-kernel"),
            "cut-cross-entropy": version("cut-cross-entropy"),
            "numpy": version("numpy"),
        },
        "mars_build": build,
        "backends": {k: v.available for k, v in mars.backends().items()},
        "platform": platform.platform(),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["device"].update(name=p.name, capability=f"{p.major}.{p.minor}",
                             memory_GiB=round(p.total_memory / 2**30, 1),
                             sms=p.multi_processor_count)
    else:
        env["device"].update(name=_cpu_name(), cores=os.cpu_count(),
                             torch_threads=torch.get_num_threads(),
                             mars_cpu_isa=os.environ.get("MARS_CPU_ISA"))
    return env


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_size(op: C.Op, size: C.Size, device: str, plan: Plan, quick: bool,
             impl_filter: list[str] | None, roofs: dict, log) -> dict:
    """Times every implementation of op at one size; returns the group's compact record."""
    group = {"size": size.name, "label": size.label, "x": size.x, "series": size.series,
             "params": size.params, "results": {}, "skipped": {}, "errors": {}}
    inputs = op.inputs(size, device)
    expected = {}
    calls = {}
    impls = [i for i in op.impls_for(device, quick)
             if not impl_filter or i.name in impl_filter]
    for impl in [i for i in op.impls if device in i.devices and quick and not i.quick
                 and (not impl_filter or i.name in impl_filter)]:
        group["skipped"][impl.name] = "not in --quick runs (compiles or imports too long)"
    for impl in impls:
        try:
            call = impl.build(inputs, size, device)
            out = call.fn()                      # first call: compiles, checks it runs here
            if device == "cuda":
                torch.cuda.synchronize()
        except Skip as s:
            group["skipped"][impl.name] = str(s)
            continue
        except Exception as exc:  # noqa: BLE001 - reported, never turned into a number
            if device == "cuda" and isinstance(exc, torch.OutOfMemoryError):
                gc.collect()
                torch.cuda.empty_cache()
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if impl.kind == "mars":
                group["errors"][impl.name] = msg
                log(traceback.format_exc())
            else:
                group["skipped"][impl.name] = f"does not run here: {msg}"
            continue
        want = expected.get(impl.variant)
        if want is None:
            want = op.expected(inputs, impl.variant) if op.expected else None
            if want is None and impl.name == "reference":
                want = tuple(t.detach().clone() if t is not None else None for t in out)
            if want is not None:
                expected[impl.variant] = want
        err = None
        if want is not None:
            try:
                err = rel_error(out, want)
            except ValueError as exc:
                group["errors"][impl.name] = f"output does not match the reference's: {exc}"
                continue
        del out
        rec = {"err": sig(err, 2)}
        if impl.kind == "mars" and err is not None and not err <= op.tolerance(size):
            group["errors"][impl.name] = (f"differs from the reference: max relative error "
                                          f"{err:.3g} > {op.tolerance(size):.0e}")
        group["results"][impl.name] = rec
        calls[impl.name] = call
    if calls:
        stats = measure({k: c.fn for k, c in calls.items()}, torch.device(device), plan)
        for name, st in stats.items():
            rec = group["results"][name]
            rec.update(median_s=sig(st.median), iqr_s=sig(st.iqr), min_s=sig(st.min),
                       rounds=st.rounds, calls_per_round=st.inner)
    for name, call in calls.items():
        rec = group["results"][name]
        if op.memory:
            from mars.memory import peak_allocated_bytes
            call.reset()
            gc.collect()
            with _quiet_profiler() if device == "cpu" else contextlib.nullcontext():
                rec["peak_bytes"] = int(peak_allocated_bytes(call.fn, device))
        if device == "cuda":
            if op.sync_check and get_kind(op, name) == "mars":
                rec["host_syncs"] = count_syncs(call.fn)
            rec.update(roofline(op, size, rec["median_s"], roofs))
        call.reset()
    base = group["results"].get(op.baseline(device), {}).get("median_s")
    ref = group["results"].get("reference", {}).get("median_s")
    base_mem = group["results"].get(op.baseline(device), {}).get("peak_bytes")
    for name, rec in group["results"].items():
        if "median_s" not in rec:
            continue
        if base:
            rec["time_vs_mars"] = sig(rec["median_s"] / base, 3)
        if ref:
            rec["speedup_vs_reference"] = sig(ref / rec["median_s"], 3)
        if base_mem and "peak_bytes" in rec:
            rec["memory_vs_mars"] = sig(rec["peak_bytes"] / base_mem, 3)
    del calls, inputs, expected
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    for k in ("skipped", "errors"):
        if not group[k]:
            del group[k]
    return group


def roofline(op: C.Op, size: C.Size, median_s: float, roofs: dict) -> dict:
    """bytes_moved and roofline_share (the bytes the op must move over the measured copy
    bandwidth, over the median time); tflops and matmul_share for the ops that count FLOPs."""
    out = {}
    if op.bytes_moved and roofs.get("copy_Bps"):
        out["bytes_moved"] = int(op.bytes_moved(size))
        out["roofline_share"] = sig(out["bytes_moved"] / roofs["copy_Bps"] / median_s, 3)
    if op.flops and roofs.get("matmul_flops"):
        out["tflops"] = sig(op.flops(size) / median_s / 1e12, 3)
        out["matmul_share"] = sig(op.flops(size) / roofs["matmul_flops"] / median_s, 3)
    return out


def get_kind(op: C.Op, name: str) -> str:
    return C.get_impl(op, name).kind


def run(ops: list[str], device: str, quick: bool, impl_filter: list[str] | None = None,
        plan: Plan | None = None, command: str = "", log=print,
        size_filter: list[str] | None = None, progress=None) -> dict:
    """Runs the suite; returns the results document (docs/bench.md, "JSON").
    ``progress(doc)``, when given, is called with the document so far after every shape
    (``doc["incomplete"]`` then says how many shapes are done), so a run that is stopped
    keeps what it measured."""
    plan = plan or (QUICK if quick else FULL)
    started = datetime.datetime.now(datetime.timezone.utc)
    doc = {"schema": SCHEMA, "command": command, "mode": "quick" if quick else "full",
           "date": started.isoformat(timespec="seconds"), "load_avg_start": _load()}
    filters = {k: v for k, v in (("op", ops), ("size", size_filter), ("impl", impl_filter))
               if v and (k != "op" or set(v) != set(C.OPS))}
    if filters:
        doc["filters"] = filters
    doc.update(environment(device))
    roofs = {}
    if device == "cuda":
        roofs = {"copy_Bps": copy_bandwidth(torch.device("cuda")),
                 "matmul_flops": matmul_flops(torch.device("cuda"))}
        doc["roofs"] = {"copy_GBps": sig(roofs["copy_Bps"] / 1e9, 4),
                        "bf16_matmul_TFLOPs": sig(roofs["matmul_flops"] / 1e12, 4)}
    doc["plan"] = dict(max_rounds=plan.max_rounds, min_rounds=plan.min_rounds,
                       budget_s=plan.budget_s, block_s=plan.block_s, warmup=plan.warmup)
    by_name = {name: C.get_op(name) for name in ops}
    doc["ops"] = {name: {"title": op.title, "what": op.what, "baseline": op.baseline(device),
                         "groups": []} for name, op in by_name.items()}
    todo = [(name, size) for name, op in by_name.items() for size in op.sizes(device, quick)
            if not size_filter or size.name in size_filter]

    def elapsed() -> float:
        return round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)

    if progress is not None:
        doc["incomplete"] = f"0 of {len(todo)} shapes measured"
        progress(doc)
    for k, (name, size) in enumerate(todo):
        log(f"[{k + 1}/{len(todo)}] {name} {size.name} ...")
        doc["ops"][name]["groups"].append(run_size(by_name[name], size, device, plan, quick,
                                                   impl_filter, roofs, log))
        if progress is not None and k + 1 < len(todo):
            doc["incomplete"] = f"{k + 1} of {len(todo)} shapes measured"
            doc["seconds"] = elapsed()
            progress(doc)
    doc.pop("incomplete", None)
    doc["load_avg_end"] = _load()
    doc["seconds"] = elapsed()
    return doc
