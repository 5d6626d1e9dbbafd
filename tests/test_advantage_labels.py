"""Adversarial labels and inputs of mars.mono_anchored_advantage (docs/advantage.md, "Labels"): every label
kind, dtype and container, absent anchors, values no cast may wrap or strip, checks that
hold under torch.compile, float64 accumulation in every backend, the 'auto' fallback.

The oracle groups rows by Python equality of the labels as given (a dict), independent of
mars's factorisation."""
import importlib
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mars
from mars import _ext

backends_module = importlib.import_module("mars.backends")  # mars.backends is the function

KERNELS = [b for b in ("cpu", "triton") if mars.backends()[b].available]
BACKENDS = ["reference"] + KERNELS
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT_RANGES = {  # dtype -> (lo, hi) of values it holds
    torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-2**15, 2**15 - 1),
    torch.int32: (-2**31, 2**31 - 1), torch.int64: (-2**63, 2**63 - 1),
    torch.uint64: (0, 2**64 - 1),
}
NP = {torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
      torch.int64: np.int64, torch.uint64: np.uint64}


def oracle(rewards, gids, arewards, agids, *, unbiased=True, eps=1e-6):
    """Per-row float64 advantages from Python dicts over the exact label values."""
    pools = {}
    for r, g in zip(rewards, gids):
        pools.setdefault(g, []).append(r)
    for m, g in zip(arewards, agids):
        assert g in pools
        pools[g].append(m)
    out = []
    for r, g in zip(rewards, gids):
        pool = pools[g]
        if len(pool) == 1:
            out.append(0.0)
            continue
        mu = math.fsum(pool) / len(pool)
        var = math.fsum((x - mu) ** 2 for x in pool) / (len(pool) - 1 if unbiased else len(pool))
        out.append((r - mu) / (math.sqrt(var) + eps))
    return torch.tensor(out, dtype=torch.float64)


def container(values, kind, dtype):
    """values (Python ints / strs) in one of the containers users pass."""
    if kind == "list":
        return list(values)
    if kind == "tuple":
        return tuple(values)
    if kind == "numpy":
        return np.array(values, dtype=NP[dtype] if dtype is not None else None)
    if kind == "object":
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
        return arr
    return torch.tensor(np.array(values, dtype=NP[dtype]))


@st.composite
def int_batches(draw):
    """(labels of rows, labels of anchors, containers, expected absent labels)."""
    gkind = draw(st.sampled_from(["list", "tuple", "numpy", "object", "tensor"]))
    akind = draw(st.sampled_from(["list", "tuple", "numpy", "object", "tensor"]))
    big = gkind in ("list", "tuple", "object") and akind in ("list", "tuple", "object")
    gdtype = draw(st.sampled_from(list(INT_RANGES))) if gkind in ("numpy", "tensor") else None
    adtype = draw(st.sampled_from(list(INT_RANGES))) if akind in ("numpy", "tensor") else None
    glo, ghi = INT_RANGES.get(gdtype, (-2**70, 2**70) if big else (-2**63, 2**63 - 1))
    alo, ahi = INT_RANGES.get(adtype, (-2**70, 2**70) if big else (-2**63, 2**63 - 1))
    # labels near the edges of the dtypes, where a cast would wrap
    edge = st.sampled_from([0, 1, 127, 128, 255, 256, -1, 2**31, 2**32, 2**63 - 1, 2**63,
                            2**64 - 1, 2**64, -2**63])
    label = st.one_of(edge, st.integers(-300, 300), st.integers(-2**70, 2**70))
    glabels = draw(st.lists(label.filter(lambda v: glo <= v <= ghi), min_size=1, max_size=6,
                            unique=True))
    rows = draw(st.lists(st.sampled_from(glabels), min_size=1, max_size=24))
    rows = list(dict.fromkeys(glabels)) + rows  # every label has a row
    present = [v for v in glabels if alo <= v <= ahi]
    extra = draw(st.lists(label.filter(lambda v: alo <= v <= ahi and v not in glabels),
                          max_size=2))
    anchors = draw(st.lists(st.sampled_from(present), max_size=8)) if present else []
    anchors = anchors + extra
    order = draw(st.permutations(range(len(anchors))))
    anchors = [anchors[i] for i in order]
    return (container(rows, gkind, gdtype), container(anchors, akind, adtype) if anchors
            else None, rows, anchors, set(extra))


@FAST
@given(int_batches(), st.randoms(use_true_random=False), st.sampled_from(BACKENDS))
def test_int_labels_any_container_and_dtype(batch, rnd, backend):
    gids, agids, rows, anchors, absent = batch
    rewards = [float(rnd.randint(0, 3)) for _ in rows]
    arewards = [float(rnd.randint(0, 3)) for _ in anchors]
    r = torch.tensor(rewards)
    a = torch.tensor(arewards) if anchors else None
    if absent:
        with pytest.raises(ValueError, match="anchor_group_ids: labels .* do not occur"):
            mars.mono_anchored_advantage(r, gids, a, agids, backend=backend)
        return
    got = mars.mono_anchored_advantage(r, gids, a, agids, backend=backend)
    want = oracle(rewards, rows, arewards, anchors)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_narrow_dtype_labels_never_wrap():
    """An absent label that a cast to group_ids' dtype would wrap onto a present one."""
    r, a = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1.0])
    cases = [(torch.tensor([0, 0, 1, 1], dtype=torch.uint8), [256]),
             (torch.tensor([0, 0, 1, 1], dtype=torch.uint8), torch.tensor([-255])),
             (torch.tensor([0, 0, 1, 1], dtype=torch.int32), [2**32]),
             (torch.tensor([0, 0, 1, 1], dtype=torch.int8), torch.tensor([256], dtype=torch.int16)),
             (torch.tensor([2**64 - 1] * 2 + [0] * 2, dtype=torch.uint64), torch.tensor([-1])),
             (np.array([0, 0, 1, 1], dtype=np.uint8), [256]),
             ([0, 0, 1, 1], [2**64])]
    for gids, agids in cases:
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="do not occur in group_ids"):
                mars.mono_anchored_advantage(r, gids, a, agids, backend=backend)


def test_uint64_labels_above_int64():
    g = torch.tensor([2**64 - 1, 2**63, 2**64 - 1, 2**63], dtype=torch.uint64)
    r, a = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0])
    for backend in BACKENDS:
        out = mars.mono_anchored_advantage(r, g, a, torch.tensor([2**63, 2**63], dtype=torch.uint64),
                                           backend=backend, return_stats=True)
        want = oracle(r.tolist(), [2**64 - 1, 2**63, 2**64 - 1, 2**63], [1.0, 1.0], [2**63] * 2)
        torch.testing.assert_close(out.advantages.double(), want, atol=1e-6, rtol=1e-6)
        assert out.count.tolist() == [4, 2]  # sorted label order: 2**63 before 2**64 - 1


@st.composite
def str_batches(draw):
    alphabet = st.sampled_from(["a", "b", "\0", "1", " ", "é", "\u4e2d", "\U0001f600"])
    glabels = draw(st.lists(st.text(alphabet, max_size=4), min_size=1, max_size=6, unique=True))
    rows = list(glabels) + draw(st.lists(st.sampled_from(glabels), max_size=20))
    extra = draw(st.lists(st.text(alphabet, max_size=4).filter(lambda s: s not in glabels),
                          max_size=2))
    anchors = draw(st.lists(st.sampled_from(glabels), max_size=6)) + extra
    kind = draw(st.sampled_from(["list", "tuple", "object"]))
    return (container(rows, kind, None), container(anchors, kind, None) if anchors else None,
            rows, anchors, set(extra))


@FAST
@given(str_batches(), st.randoms(use_true_random=False), st.sampled_from(BACKENDS))
def test_string_labels_exact(batch, rnd, backend):
    """'a' and 'a\\0' are two labels (numpy's fixed-width strings would merge them)."""
    gids, agids, rows, anchors, absent = batch
    rewards = [float(rnd.randint(0, 3)) for _ in rows]
    arewards = [float(rnd.randint(0, 3)) for _ in anchors]
    r, a = torch.tensor(rewards), torch.tensor(arewards) if anchors else None
    if absent:
        with pytest.raises(ValueError, match="do not occur in group_ids"):
            mars.mono_anchored_advantage(r, gids, a, agids, backend=backend)
        return
    got = mars.mono_anchored_advantage(r, gids, a, agids, backend=backend)
    torch.testing.assert_close(got.double(), oracle(rewards, rows, arewards, anchors),
                               atol=1e-5, rtol=1e-5)


def test_nul_terminated_strings_are_distinct_groups():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = mars.mono_anchored_advantage(r, ["a", "a\0", "a", "a\0"], return_stats=True)
    assert out.count.tolist() == [2, 2]
    assert out.group_index.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("gids, agids, match", [
    (["1", "2"], [1], "same kind"),
    (["1", 1], None, "mixes label types"),
    ([1, "1"], None, "mixes label types"),
    ([b"p0", b"p1"], None, "bytes labels"),
    (np.array([b"p0", b"p1"]), None, "bytes labels"),
    (["p0", "p1"], [b"p0"], "bytes labels"),
    ([True, False], None, "integer or string labels"),
    ([1.0, 2.0], None, "integer or string labels"),
    ([1, None], None, "integer or string labels"),
    ("p0p1", None, "single str"),
    ([[0], [1]], None, "1-D"),
    (torch.tensor([0, 1]), ["0"], "same kind"),
    ([0, 1], torch.tensor([0.0]), "integer or string labels"),
])
def test_bad_labels_name_the_argument(gids, agids, match):
    r = torch.tensor([1.0, 0.0])
    a = torch.ones(len(agids)) if agids is not None else None
    with pytest.raises(ValueError, match=match):
        mars.mono_anchored_advantage(r, gids, a, agids)


def test_mixed_containers_match():
    """A list of int anchors with tensor group_ids, a tensor of anchors with a list, numpy."""
    r, a = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0])
    want = mars.mono_anchored_advantage(r, [5, 5, 7, 7], a, [5, 7], backend="reference")
    for gids in ([5, 5, 7, 7], torch.tensor([5, 5, 7, 7], dtype=torch.int32),
                 np.array([5, 5, 7, 7], dtype=np.uint16)):
        for agids in ([5, 7], (5, 7), torch.tensor([5, 7]), np.array([5, 7], dtype=np.int8),
                      [np.int64(5), np.uint8(7)]):
            got = mars.mono_anchored_advantage(r, gids, a, agids)
            assert torch.equal(got, want), (type(gids), type(agids))


def test_label_device_mismatch():
    with pytest.raises(ValueError, match="anchor_group_ids is on meta"):
        mars.mono_anchored_advantage(torch.ones(2), torch.tensor([0, 0]), torch.ones(1),
                                     torch.tensor([0], device="meta"))


@pytest.mark.parametrize("bad", [[1.0, "x"], [[1.0], [2.0]]])
def test_bad_rewards_name_the_argument(bad):
    with pytest.raises(ValueError, match="rewards"):
        mars.mono_anchored_advantage(bad, [0, 0])


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-6, "1e-6", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checks_hold_under_torch_compile(backend):
    """A compiled call refuses what an eager call refuses (no is_compiling() shortcut)."""
    torch._dynamo.reset()

    def f(r, g, a, ag):
        return mars.mono_anchored_advantage(r, g, a, ag, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    g, ag = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 2])
    r, a = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0])
    torch.testing.assert_close(compiled(r, g, a, ag), f(r, g, a, ag))
    with pytest.raises(ValueError, match=r"rewards has non-finite values at rows \[1\]"):
        compiled(torch.tensor([1.0, float("nan"), 1.0, 1.0, 0.0, 1.0]), g, a, ag)
    with pytest.raises(ValueError, match=r"anchor_rewards has non-finite values at rows \[0\]"):
        compiled(r, g, torch.tensor([float("inf"), 0.0]), ag)
    with pytest.raises(ValueError, match=r"labels \[7\] do not occur"):
        compiled(r, g, a, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"labels \[-1\] do not occur"):
        compiled(r, g, a, torch.tensor([-1, 0]))
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("offset, spread", [(1e4, 1e-3), (3e3, 1e-4), (1.0, 1e-6), (0.0, 1.0)])
def test_backends_accumulate_in_float64(backend, offset, spread):
    """Large offsets with tiny spreads: fp32 sums lose the spread; every backend must give
    the reference's numbers (which sum in float64)."""
    gen = torch.Generator().manual_seed(int(offset) + 7)
    r = (offset + spread * torch.rand(3000, generator=gen, dtype=torch.float64)).float()
    g = torch.randint(0, 200, (3000,), generator=gen)
    g[:200] = torch.arange(200)
    a = (offset + spread * torch.rand(400, generator=gen, dtype=torch.float64)).float()
    ag = torch.randint(0, 200, (400,), generator=gen)
    ref = mars.mono_anchored_advantage(r, g, a, ag, backend="reference", return_stats=True)
    out = mars.mono_anchored_advantage(r, g, a, ag, backend=backend, return_stats=True)
    for name in ("advantages", "mean", "std", "gain"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-6, rtol=1e-6, equal_nan=True,
                                   msg=name)


def test_auto_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_C", False)
    monkeypatch.setattr(_ext, "C_ERROR", "compiled extension mars._C not importable (test)")
    monkeypatch.setattr(backends_module, "_warned_fallback", set())
    r = torch.tensor([1.0, 0.0])
    with pytest.warns(RuntimeWarning, match=r"reference .*mars\._C not importable \(test\)"):
        first = mars.mono_anchored_advantage(r, [0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = mars.mono_anchored_advantage(r, [0, 0])  # once only
        mars.mono_anchored_advantage(r, [0, 0], backend="reference")  # asked for: silent
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewards_beyond_float64_spread_refused(backend):
    """1e200 and -1e200 are finite, but their squared deviation is not: refuse, naming them."""
    r = torch.tensor([1e200, -1e200, 0.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rewards has values beyond .* rows \[0, 1\]"):
        mars.mono_anchored_advantage(r, [0, 0, 1, 1], backend=backend)
    big = torch.tensor([1e38, -1e38, 0.0, 1.0])  # near fp32 extremes: float64 holds their spread
    got = mars.mono_anchored_advantage(big, [0, 0, 1, 1], backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), oracle(big.tolist(), [0, 0, 1, 1], [], []))
