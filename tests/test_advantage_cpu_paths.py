"""The fast CPU paths of mars.mono_anchored_advantage (docs/advantage.md, "CPU: one op"): the one-op path for int
tensor labels (mars::advantage_int_labels: labels factorised and values checked in C++,
uniform groups in SIMD lanes) and the C++ string factoriser (mars::string_labels). Each
must give bit for bit what the general path gives (forced by switching the fast path
off), raise the same errors, and match the float64 reference; string groups must follow
Python equality of the labels, whatever their container, identity, hash or code points."""
import math

import numpy as np
import pytest
import torch

import mars
from mars import advantage as adv_module
from mars import groups, reference

pytestmark = pytest.mark.skipif(not (adv_module._INT_LABELS_OP and groups._STRING_OP),
                                reason="C++ extension without the fast ops")
FIELDS = reference.AdvantageOutput._fields


def general(monkeypatch, *args, **kw):
    """The call through the general path (both fast paths off), or the ValueError."""
    with monkeypatch.context() as m:
        m.setattr(adv_module, "_INT_LABELS_OP", False)
        m.setattr(groups, "_STRING_OP", False)
        return call(*args, **kw)


def call(*args, **kw):
    try:
        return mars.mono_anchored_advantage(*args, return_stats=True, **kw)
    except ValueError as exc:
        return exc


def assert_bitwise(a, b):
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
        return
    for name, x, y in zip(FIELDS, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.nan_to_num(), y.nan_to_num()), name
        assert torch.equal(x.isnan(), y.isnan()), name
        assert torch.equal(torch.signbit(x.float()), torch.signbit(y.float())), name


def assert_reference(out, r, g, a, ag, **kw):
    want = reference.mono_anchored_advantage(r.double(), g, None if a is None else a.double(),
                                             ag, return_stats=True, **kw)
    torch.testing.assert_close(out.advantages.double(), want.advantages.double(), atol=1e-6, rtol=1e-6)
    assert torch.equal(out.count, want.count) and torch.equal(out.group_index, want.group_index)
    torch.testing.assert_close(out.mean.double(), want.mean.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.std.double(), want.std.double(), atol=1e-6, rtol=1e-6)


def batch(gen, n_groups, rows, anchors, labels="dense", dtype=torch.float32):
    """rows / anchors: an int (every group) or a (lo, hi) range per group. Labels dense
    0..G-1, 'gaps' (every third value), 'sparse' (beyond the one-pass range), 'negative'."""
    def sizes(spec):
        if isinstance(spec, int):
            return torch.full((n_groups,), spec, dtype=torch.long)
        return torch.randint(spec[0], spec[1] + 1, (n_groups,), generator=gen)
    base = {"dense": torch.arange(n_groups), "gaps": torch.arange(n_groups) * 3 + 5,
            "sparse": torch.arange(n_groups) * 10**12 - 7, "negative": torch.arange(n_groups) - 40
            }[labels]
    g = torch.repeat_interleave(base, sizes(rows))
    ag = torch.repeat_interleave(base, sizes(anchors))
    g, ag = g[torch.randperm(len(g), generator=gen)], ag[torch.randperm(len(ag), generator=gen)]
    r = torch.where(torch.rand(len(g), generator=gen) < 0.5,
                    torch.randint(0, 2, (len(g),), generator=gen).double(),
                    torch.rand(len(g), generator=gen, dtype=torch.float64) * 3 - 1).to(dtype)
    a = torch.randint(0, 2, (len(ag),), generator=gen).to(dtype)
    return r, g, a, ag


# ------------------------------------------------------------------------ int labels

CASES = [  # (groups, rows, anchors, labels)
    (64, 16, 2, "dense"), (37, 5, 0, "dense"), (50, 8, 1, "gaps"), (30, (1, 9), (0, 3), "dense"),
    (20, 4, (0, 2), "sparse"), (25, 3, 2, "negative"), (1, 7, 1, "dense"), (9, 1, 0, "dense"),
    (12, 1, 1, "gaps"), (40, (1, 2), 0, "gaps"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(norm_by_std=False), dict(singleton="raw"),
                                  dict(unbiased=False, eps=0.0)])
def test_int_one_op_equals_general_path(monkeypatch, poison, case, dtype, opts):
    n, rows, anchors, labels = case
    gen = torch.Generator().manual_seed(hash((case, str(dtype))) % 2**31)
    r, g, a, ag = batch(gen, n, rows, anchors, labels, dtype)
    fast = call(r, g, a, ag, **opts)
    assert_bitwise(fast, general(monkeypatch, r, g, a, ag, **opts))
    assert_reference(fast, r, g, a, ag, **opts)
    if not len(a):  # no anchors given at all
        assert_bitwise(call(r, g, **opts), general(monkeypatch, r, g, **opts))


def test_int_one_op_constant_groups_with_eps_zero(monkeypatch, poison):
    """sigma + eps == 0: advantage 0 (never 0/0, and +0.0), in the uniform lanes too."""
    r = torch.tensor([1.0, 1.0, 2.0, 3.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    for a, ag in ((torch.zeros(0), torch.zeros(0, dtype=torch.long)),
                  (torch.tensor([5.0]), torch.tensor([2]))):
        fast = call(r, g, a, ag, eps=0.0)
        assert_bitwise(fast, general(monkeypatch, r, g, a, ag, eps=0.0))
        assert fast.advantages[[0, 1, 4, 5]].tolist() == [0.0] * 4
        assert not torch.signbit(fast.advantages[[0, 1, 4, 5]]).any()


@pytest.mark.parametrize("ldtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16,
                                    torch.uint32])
def test_int_one_op_narrow_label_dtypes(monkeypatch, ldtype):
    gen = torch.Generator().manual_seed(3)
    r, g, a, ag = batch(gen, 20, (2, 6), (0, 2), "dense")
    g, ag = g.to(ldtype), ag.to(ldtype)
    assert_bitwise(call(r, g, a, ag), general(monkeypatch, r, g, a, ag))


@pytest.mark.parametrize("bad", ["nan", "inf_anchor", "huge", "missing", "nan_and_missing",
                                 "short", "anchor_dtype"])
def test_int_one_op_errors_are_the_general_paths(monkeypatch, bad):
    r = torch.tensor([1.0, 0.0, 0.5, 1.0]).double()
    g, a, ag = torch.tensor([7, 3, 7, 3]), torch.tensor([0.0, 1.0]).double(), torch.tensor([3, 7])
    if bad in ("nan", "nan_and_missing"):
        r[2] = math.nan
    if bad == "inf_anchor":
        a[1] = -math.inf
    if bad == "huge":
        r[0] = -1e151
    if bad in ("missing", "nan_and_missing"):
        ag = torch.tensor([3, 8])
    if bad == "short":
        g = g[:3]
    if bad == "anchor_dtype":  # another float dtype: the general path promotes
        a = a.float()
    fast, slow = call(r, g, a, ag), general(monkeypatch, r, g, a, ag)
    assert_bitwise(fast, slow)
    assert isinstance(fast, ValueError) == (bad != "anchor_dtype")


def test_int_one_op_is_taken(monkeypatch):
    """CPU tensors with int tensor labels never reach the Python factorisation."""
    r, g = torch.rand(6), torch.tensor([0, 1, 0, 1, 2, 2])
    want = general(monkeypatch, r, g, torch.rand(0), torch.zeros(0, dtype=torch.long))
    monkeypatch.setattr(adv_module, "prepare", lambda *a, **k: pytest.fail("general path"))
    assert torch.equal(mars.mono_anchored_advantage(r, g), want.advantages)
    mars.mono_anchored_advantage(r, g, torch.rand(2), torch.tensor([2, 0]))


def test_uniform_lanes_equal_streaming_and_sorted():
    """Uniform groups take the lanes path; adding one extra group makes the same rows take
    the streaming path (1 thread), and > 64k values the sorted one (2 threads): the rows'
    results must not change by a bit."""
    gen = torch.Generator().manual_seed(11)
    r, g, a, ag = batch(gen, 4100, 16, 2, "dense")
    r = r + torch.rand(len(r), generator=gen) * 1e-3
    op = torch.ops.mars.mono_anchored_advantage
    G = 4100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        lanes = op(r, g, a, ag, G, True, 1e-6, True, False)
        r2, g2 = torch.cat([r, torch.tensor([0.5])]), torch.cat([g, torch.tensor([G])])
        stream = op(r2, g2, a, ag, G + 1, True, 1e-6, True, False)
        torch.set_num_threads(2)
        sort = op(r, g, a, ag, G, True, 1e-6, True, False)
    finally:
        torch.set_num_threads(threads)
    assert len(r) + len(a) > 65536
    assert torch.equal(lanes[0], stream[0][:-1]) and torch.equal(lanes[0], sort[0])
    for x, y, z in zip(lanes[1:], stream[1:], sort[1:]):
        assert torch.equal(x.nan_to_num(), y[:-1].nan_to_num())
        assert torch.equal(x.nan_to_num(), z.nan_to_num())


def test_dense_op_checks_its_indices_in_the_lanes_path():
    r, a = torch.rand(4), torch.rand(1)
    op = torch.ops.mars.mono_anchored_advantage
    with pytest.raises(ValueError, match=r"group_index\[2\] = 5 is outside \[0, 2\)"):
        op(r, torch.tensor([0, 1, 5, 1]), a, torch.tensor([0]), 2, True, 1e-6, True, False)
    with pytest.raises(ValueError, match="group 2 has no rows"):
        op(r, torch.tensor([0, 1, 0, 1]), a, torch.tensor([0]), 3, True, 1e-6, True, False)
    with pytest.raises(ValueError, match=r"anchor_index\[0\] = 2 is outside"):
        op(r, torch.tensor([0, 1, 0, 1]), a, torch.tensor([2]), 2, True, 1e-6, True, False)


# --------------------------------------------------------------------------- strings

def containers(values):
    """The same labels as a list, a tuple, an object array and a unicode array."""
    obj = np.empty(len(values), dtype=object)
    obj[:] = list(values)
    return {"list": list(values), "tuple": tuple(values), "object": obj,
            "unicode": np.array(values, dtype=str) if len(values) else np.zeros(0, str)}


def fresh(s: str) -> str:
    """An equal string that is another object (no interning, no shared identity)."""
    return "".join(list(s))


LABEL_SETS = {
    "ascii": ["uid-%d" % i for i in range(7)],
    "unicode": ["é", "e\u0301", "日本", "😀", "\ud83d\ude00", "ß", "ss", "\ud800"],
    "empty_and_prefix": ["", "a", "ab", "abc", "a b", " a"],
    "interior_nul": ["a\0b", "a", "b\0", "\0"],  # NULs: the general (exact) path
    "long": ["x" * 40 + str(i) for i in range(5)] + ["x" * 41],
}


@pytest.mark.parametrize("name", list(LABEL_SETS))
@pytest.mark.parametrize("gkind", ["list", "tuple", "object", "unicode"])
@pytest.mark.parametrize("akind", ["list", "object", "unicode"])
def test_string_labels_equal_general_path_and_oracle(monkeypatch, name, gkind, akind):
    pool = LABEL_SETS[name]
    if gkind == "unicode" or akind == "unicode":
        pool = [s for s in pool if not s.endswith("\0")]  # numpy strips trailing NULs
    gen = torch.Generator().manual_seed(len(name) * 7 + len(gkind) + 3 * len(akind))
    rows = torch.randint(0, len(pool), (40,), generator=gen).tolist()
    rows += [i for i in range(len(pool)) if i not in rows]
    labels = [fresh(pool[i]) for i in rows]
    alabels = [fresh(pool[i]) for i in torch.randint(0, len(pool), (6,), generator=gen).tolist()]
    r = torch.rand(len(labels), generator=gen, dtype=torch.float64)
    a = torch.rand(len(alabels), generator=gen, dtype=torch.float64)
    g, ag = containers(labels)[gkind], containers(alabels)[akind]
    fast = call(r, g, a, ag)
    assert_bitwise(fast, general(monkeypatch, r, g, a, ag))
    # the oracle: Python equality of the labels, groups in sorted order
    distinct = sorted(set(labels))
    assert fast.group_index.tolist() == [distinct.index(s) for s in labels]
    assert fast.count.tolist() == [labels.count(s) + alabels.count(s) for s in distinct]
    assert_reference(fast, r, fast.group_index, a, torch.tensor([distinct.index(s) for s in alabels]))
    # the Groups' labels are the general path's too
    got = groups.factorize(g, ag, len(r), len(a), r.device)
    with monkeypatch.context() as m:
        m.setattr(groups, "_STRING_OP", False)
        want = groups.factorize(g, ag, len(r), len(a), r.device)
    assert got.labels.dtype == want.labels.dtype and got.labels.tolist() == want.labels.tolist()


def test_containers_give_identical_results():
    labels = ["p%d" % (i % 5) for i in range(23)]
    alabels = ["p3", "p0", "p3"]
    r, a = torch.rand(23, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    outs = [call(r, g, a, ag) for g in containers(labels).values()
            for ag in containers(alabels).values()]
    for out in outs[1:]:
        assert_bitwise(out, outs[0])


def test_string_hash_collisions_stay_exact(monkeypatch):
    """Every label hashing alike (hash mask 0): the table's exact comparisons keep them
    apart; results identical to the full hash."""
    labels = [fresh("k%d" % (i % 9)) for i in range(50)] + ["", "k", "k1\u00e9"]
    alabels = ["k3", "", "k1\u00e9"]
    r, a = torch.rand(len(labels), dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    for g in containers(labels).values():
        full = call(r, g, a, alabels)
        with monkeypatch.context() as m:
            m.setattr(groups, "_STRING_HASH_MASK", 0)
            collided = call(r, g, a, alabels)
        assert_bitwise(collided, full)
        assert collided.count.numel() == 12


def test_string_op_direct():
    """mars::string_labels on NUL-separated UTF-8 and on unicode rows, with and without
    hash collisions; malformed layouts are refused."""
    words = ["b", "", "a", "b", "ab", "é", "a"]
    data = np.frombuffer(bytearray("\0".join(words).encode()), np.uint8)
    seps = torch.from_numpy(np.flatnonzero(data == 0))
    adata = torch.tensor(list("ab\0zz".encode()), dtype=torch.uint8)
    aseps = torch.tensor([2])
    for mask in (-1, 0, 1):
        index, aindex, first = torch.ops.mars.string_labels(
            torch.from_numpy(data), seps, 0, adata, aseps, 0, len(words), 2, mask)
        assert index.tolist() == [3, 0, 1, 3, 2, 4, 1]  # "", a, ab, b, é
        assert aindex.tolist() == [2, -1] and first.tolist() == [1, 2, 4, 0, 5]
    u = np.array(words)
    rows = torch.from_numpy(u.view(np.int32))
    arows = torch.from_numpy(np.array(["ab", "zz"]).view(np.int32))
    index, aindex, first = torch.ops.mars.string_labels(
        rows, torch.zeros(0, dtype=torch.long), u.dtype.itemsize // 4, arows,
        torch.zeros(0, dtype=torch.long), 2, len(words), 2, -1)
    assert index.tolist() == [3, 0, 1, 3, 2, 4, 1] and aindex.tolist() == [2, -1]
    with pytest.raises(ValueError, match="separators"):
        torch.ops.mars.string_labels(torch.from_numpy(data), seps[:2], 0, adata, aseps, 0,
                                     len(words), 2, -1)


def test_string_errors_are_the_general_paths(monkeypatch):
    r, a = torch.rand(4), torch.rand(2)
    for g, ag in ((["a", "b", "a", "b"], ["b", "c"]), (np.array(["a", "b", "a", "b"]), ["zz", "a"]),
                  (["a", "b", "a", 1], ["a"]), (["a", "b", "a", "b"], [1, 2]),
                  (["a", "b", "a"], ["a", "b"]), (["a", "b", "a", "b"], np.array([b"a", b"b"]))):
        fast = call(r, g, a, ag)
        assert isinstance(fast, ValueError)
        assert_bitwise(fast, general(monkeypatch, r, g, a, ag))
