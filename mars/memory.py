"""Peak memory of a call, for the memory tests and benchmarks."""
from __future__ import annotations

import json
import os
import tempfile

import torch


def peak_allocated_bytes(fn, device: str | torch.device = "cpu") -> int:
    """Peak of the torch allocator's live bytes while fn() runs, above the level at its start.

    CUDA: torch.cuda.max_memory_allocated. CPU: the torch profiler's memory events (every
    c10 CPU allocation and free, with the running total). Not counted: memory outside the
    torch allocator (BLAS scratch, Python objects).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not mem:
        raise RuntimeError("the torch profiler recorded no memory events")
    # "Total Allocated" is a running counter that is not reset between profiler sessions:
    # measure from its value just before this session's first event
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in mem) - base)
