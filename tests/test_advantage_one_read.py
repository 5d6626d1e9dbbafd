"""The advantage's one-read path (mars.groups._prepare_one_read; docs/advantage.md,
"Host syncs"): int tensor labels on a GPU are factorised on the device and every check
is read in one small tensor. Here it is forced on CPU tensors (_FORCE_ONE_READ) and must
give bit for bit the general path's groups, advantages and stats, and the same errors in
the same order; the whole call reads the host once and runs no op that reads a value
behind the caller's back (nonzero, bincount, unique, item). The kernels' layout (sort +
searchsorted offsets, no bincount) is checked through the Triton launcher, the CUDA body's
twin; on a GPU the sync count itself is measured (torch.cuda.set_sync_debug_mode)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import mars
from mars import groups
from conftest import gpu

BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if mars.backends()[b].available]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


def both_paths(monkeypatch, *args, **kw):
    """(general path's result, one-read path's result) of mono_anchored_advantage, or the
    exceptions they raise."""
    out = []
    for force in (False, True):
        monkeypatch.setattr(groups, "_FORCE_ONE_READ", force)
        try:
            out.append(mars.mono_anchored_advantage(*args, **kw))
        except ValueError as exc:
            out.append(exc)
    return out


def assert_same(a, b):
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
        return
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) or (torch.isnan(x) == torch.isnan(y)).all() and \
            torch.equal(x.nan_to_num(), y.nan_to_num()), (x, y)


@st.composite
def labelled_batch(draw):
    n_groups = draw(st.integers(0, 12))
    spread = draw(st.sampled_from([1, 3, 1000, 2 ** 40]))
    dtype = draw(st.sampled_from(LABEL_DTYPES))
    if dtype != torch.int64:
        spread = min(spread, 3)
    pool = sorted(set(draw(st.lists(st.integers(-5, 5), min_size=n_groups, max_size=n_groups))
                      )) if spread == 1 else None
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    base = (torch.randperm(max(n_groups, 1), generator=gen)[:n_groups] * spread - n_groups)
    if dtype == torch.uint8:
        base = base.abs()
    labels = base if pool is None else torch.tensor(pool, dtype=torch.long)
    G = labels.numel()
    rows = torch.randint(1, 5, (G,), generator=gen) if G else torch.zeros(0, dtype=torch.long)
    ids = torch.repeat_interleave(labels, rows)
    ids = ids[torch.randperm(ids.numel(), generator=gen)].to(dtype)
    K = draw(st.integers(0, 8)) if G else 0
    aids = labels[torch.randint(0, max(G, 1), (K,), generator=gen)].to(dtype) if G else \
        torch.zeros(0, dtype=dtype)
    rdtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    r = torch.randint(0, 3, (ids.numel(),), generator=gen).to(rdtype) / 2
    a = torch.randint(0, 3, (K,), generator=gen).to(rdtype) / 2
    return r, ids, a, aids


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=labelled_batch(), backend=st.sampled_from(BACKENDS),
       anchors=st.booleans(), norm_by_std=st.booleans(), singleton=st.sampled_from(["zero", "raw"]))
def test_bitwise_equal_to_the_general_path(monkeypatch, batch, backend, anchors, norm_by_std,
                                           singleton):
    r, ids, a, aids = batch
    args = (r, ids, a, aids) if anchors else (r, ids)
    general, one = both_paths(monkeypatch, *args, norm_by_std=norm_by_std, singleton=singleton,
                              backend=backend, return_stats=True)
    assert_same(general, one)
    for force in (False, True):  # the Groups themselves, labels included
        monkeypatch.setattr(groups, "_FORCE_ONE_READ", force)
        rr, aa, g = groups.prepare(r, ids, a if anchors else None, aids if anchors else None)
        if force:
            assert torch.equal(g.index, g0.index) and torch.equal(g.anchor_index, g0.anchor_index)
            assert g.num_groups == g0.num_groups and torch.equal(g.labels, g0.labels)
            assert torch.equal(rr, r0) and torch.equal(aa, a0)
        else:
            r0, a0, g0 = rr, aa, g


@pytest.mark.parametrize("case", [
    "nan_reward", "inf_anchor", "huge_reward", "missing_anchor", "short_ids", "short_aids",
    "nan_and_missing", "nan_and_short", "empty_with_anchor", "empty"])
def test_same_errors_in_the_same_order(monkeypatch, case):
    r = torch.tensor([1.0, 0.0, 0.5, 1.0])
    ids = torch.tensor([7, 3, 7, 3])
    a, aids = torch.tensor([0.0, 1.0]), torch.tensor([3, 7])
    if case in ("nan_reward", "nan_and_missing", "nan_and_short"):
        r[2] = float("nan")
    if case == "inf_anchor":
        a[0] = float("inf")
    if case == "huge_reward":
        r = r.double()
        r[1] = 1e200
    if case in ("missing_anchor", "nan_and_missing"):
        aids = torch.tensor([3, 11])
    if case in ("short_ids", "nan_and_short"):
        ids = ids[:3]
    if case == "short_aids":
        aids = aids[:1]
    if case == "empty_with_anchor":
        r, ids = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if case == "empty":
        r, ids, a, aids = (torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0),
                           torch.zeros(0, dtype=torch.long))
    general, one = both_paths(monkeypatch, r, ids, a, aids, return_stats=True)
    assert_same(general, one)
    assert isinstance(one, ValueError) == (case != "empty")


# ops that read a tensor's value on the host (a sync on a GPU), or whose output shape does
_SYNCING = {"nonzero", "bincount", "_unique2", "unique_dim", "unique_consecutive",
            "_local_scalar_dense", "masked_select", "item", "is_nonzero", "equal",
            "repeat_interleave"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
@pytest.mark.parametrize("anchors", [False, True])
def test_one_host_read_and_no_syncing_op(monkeypatch, backend, anchors):
    """The forced path on CPU tensors, through the Triton launcher (the CUDA body's layout:
    sort + searchsorted): one explicit read, and no op that would sync on a GPU."""
    monkeypatch.setattr(groups, "_FORCE_ONE_READ", True)
    reads = []
    real = groups._read_host
    monkeypatch.setattr(groups, "_read_host", lambda t: reads.append(t.numel()) or real(t))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (300,), generator=gen) * 3
    r = torch.rand(300, generator=gen)
    a, aids = (torch.rand(40, generator=gen), ids[:40].flip(0)) if anchors else (None, None)
    want = mars.mono_anchored_advantage(r, ids, a, aids, backend="reference")
    reads.clear()
    with OpLog() as log:
        got = mars.mono_anchored_advantage(r, ids, a, aids, backend=backend)
    assert reads == [4]
    assert {"sort", "searchsorted", "cumsum"} <= set(log.ops)  # the log sees the path's ops
    bad = sorted(set(log.ops) & _SYNCING)
    assert not bad, f"ops that read values on the host: {bad}"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # the detector works: the general path (the reference's layout) is caught
    monkeypatch.setattr(groups, "_FORCE_ONE_READ", False)
    with OpLog() as log:
        groups.prepare(r, ids, a, aids)
        mars.mono_anchored_advantage(r, ids, a, aids, backend="reference")
    assert set(log.ops) & _SYNCING


def test_general_path_stays_on_cpu_by_default():
    assert not groups._FORCE_ONE_READ
    r, ids = torch.rand(4), torch.tensor([0, 1, 0, 1])
    assert not groups._one_read_eligible(r, ids, None, None)
    # labels the one-read path does not take: uint64, lists, labels on another device
    assert not groups._one_read_eligible(r.to("meta"), ids.to(torch.uint64).to("meta"), None,
                                         None)
    assert not groups._one_read_eligible(r.to("meta"), [0, 1, 0, 1], None, None)
    assert not groups._one_read_eligible(r.to("meta"), ids, None, None)
    assert groups._one_read_eligible(r.to("meta"), ids.to("meta"), None, None)


# --------------------------------------------------------------------------------- GPU

def count_syncs(fn):
    """(result, number of synchronising CUDA calls torch reports in fn)."""
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    return out, sum("synchroniz" in str(w.message) for w in caught)


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_one_sync_per_call_and_none_in_the_op(backend):
    if not mars.backends()[backend].available:
        pytest.skip(mars.backends()[backend].reason)
    gen = torch.Generator().manual_seed(1)
    ids = (torch.arange(1024).repeat_interleave(16)[torch.randperm(1024 * 16, generator=gen)]
           * 7).cuda()
    r = torch.randint(0, 2, (ids.numel(),), generator=gen).float().cuda()
    aids = (torch.arange(1024).repeat_interleave(2) * 7).cuda()
    a = torch.randint(0, 2, (aids.numel(),), generator=gen).float().cuda()
    mars.mono_anchored_advantage(r, ids, a, aids, backend=backend)  # warm-up (compile, cache)
    out, n = count_syncs(lambda: mars.mono_anchored_advantage(r, ids, a, aids, backend=backend))
    assert n <= 1, f"{n} host syncs in one call"
    want = mars.mono_anchored_advantage(r.cpu(), ids.cpu(), a.cpu(), aids.cpu(),
                                        backend="reference")
    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=1e-6)
    _, _, g = groups.prepare(r, ids, a, aids)
    op = (torch.ops.mars.mono_anchored_advantage if backend == "cuda"
          else torch.ops.mars.mono_anchored_advantage_triton)
    args = (r, g.index, a, g.anchor_index, g.num_groups, True, 1e-6, True, False)
    _, n_op = count_syncs(lambda: op(*args))
    assert n_op == 0


@gpu
@pytest.mark.skipif(not mars.backends()["cuda"].available, reason="needs the CUDA kernels")
@pytest.mark.parametrize("bad", ["index_too_large", "negative_index", "empty_group"])
def test_gpu_op_checks_its_indices_on_the_device(bad):
    """Called directly with indices that break its contract, the CUDA op fails a
    device-side assert (in a subprocess: the assert ends the CUDA context)."""
    code = f"""
import torch, mars
r = torch.rand(6, device="cuda")
gi = torch.tensor([0, 1, 1, 2, 2, 0], device="cuda")
G = 3
if "{bad}" == "index_too_large": gi[3] = 3
if "{bad}" == "negative_index": gi[0] = -1
if "{bad}" == "empty_group": G = 4
out = torch.ops.mars.mono_anchored_advantage(r, gi, r[:0], gi[:0], G, True, 1e-6, True, False)
torch.cuda.synchronize()
print("no error", out[0].tolist())
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode != 0 and "no error" not in proc.stdout
    assert "device-side assert" in proc.stderr or "mono_anchored_advantage" in proc.stderr
