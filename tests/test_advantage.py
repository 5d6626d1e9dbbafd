"""mars.mono_anchored_advantage: reference vs float64 formulas, the worked examples of docs/advantage.md and
identities, every backend vs the reference, bad input, determinism, torch.compile."""
import math
import os
import statistics

import numpy as np
import pytest
import torch

import mars
from mars import reference
from conftest import HAS_GPU, gpu

# Backends that take CPU tensors here: Triton only through the interpreter (on a GPU
# machine the Triton kernels are tested on the device, below).
KERNEL_BACKENDS = [b for b in ("cpu", "triton") if mars.backends()[b].available
                   and (b != "triton" or os.environ.get("TRITON_INTERPRET", "0") != "0")]


def random_batch(gen, n_groups, max_rows=16, max_anchors=3, min_rows=1, label_kind="int"):
    """Groups of random sizes, rows shuffled across the batch, anchors shuffled too."""
    rows = torch.randint(min_rows, max_rows + 1, (n_groups,), generator=gen)
    nanch = torch.randint(0, max_anchors + 1, (n_groups,), generator=gen)
    labels = torch.repeat_interleave(torch.arange(n_groups), rows)
    alabels = torch.repeat_interleave(torch.arange(n_groups), nanch)
    labels = labels[torch.randperm(len(labels), generator=gen)]
    alabels = alabels[torch.randperm(len(alabels), generator=gen)]
    # binary-ish rewards with ties, plus continuous ones
    rewards = torch.where(torch.rand(len(labels), generator=gen) < 0.5,
                          torch.randint(0, 2, (len(labels),), generator=gen).double(),
                          torch.rand(len(labels), generator=gen, dtype=torch.float64) * 3 - 1)
    anchors = torch.randint(0, 2, (len(alabels),), generator=gen).double()
    if label_kind == "str":
        return rewards, [f"uid-{i}" for i in labels.tolist()], anchors, \
            np.array([f"uid-{i}" for i in alabels.tolist()])
    if label_kind == "sparse":  # large, non-contiguous int labels
        return rewards, labels * 7919 + 10**9, anchors, alabels * 7919 + 10**9
    return rewards, labels, anchors, alabels


def naive(rewards, labels, anchors, alabels, norm_by_std=True, eps=1e-6, unbiased=True,
          singleton="zero"):
    """The formula of docs/advantage.md with Python's statistics module, one group at a time."""
    labels, alabels = list(np.asarray(labels).tolist()), list(np.asarray(alabels).tolist())
    rewards, anchors = [float(x) for x in rewards], [float(x) for x in anchors]
    out = []
    for i, g in enumerate(labels):
        pool = [r for r, l in zip(rewards, labels) if l == g] + \
               [m for m, l in zip(anchors, alabels) if l == g]
        if len(pool) == 1:
            out.append(rewards[i] if singleton == "raw" else 0.0)
            continue
        mu = statistics.fmean(pool)
        sd = statistics.stdev(pool) if unbiased else statistics.pstdev(pool)
        out.append((rewards[i] - mu) / (sd + eps) if norm_by_std else rewards[i] - mu)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["int", "str", "sparse"])
@pytest.mark.parametrize("norm_by_std,unbiased,singleton", [
    (True, True, "zero"), (False, True, "raw"), (True, False, "raw"), (False, False, "zero")])
def test_reference_matches_formula(seed, kind, norm_by_std, unbiased, singleton):
    gen = torch.Generator().manual_seed(seed)
    r, g, a, ag = random_batch(gen, 9, max_rows=6, label_kind=kind)
    kw = dict(norm_by_std=norm_by_std, unbiased=unbiased, singleton=singleton)
    got = reference.mono_anchored_advantage(r, g, a, ag, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive(r, g, a, ag, **kw), atol=2e-6, rtol=1e-6)


def test_spec_worked_examples():
    G, K = 14, 2
    ids, aids = [0] * G, [0] * K
    adv = reference.mono_anchored_advantage(torch.ones(G), ids, torch.zeros(K), aids)
    assert torch.allclose(adv, torch.full((G,), 0.366), atol=5e-4)
    adv = reference.mono_anchored_advantage(torch.zeros(G), ids, torch.ones(K), aids)
    assert torch.allclose(adv, torch.full((G,), -0.366), atol=5e-4)
    half = torch.tensor([1.0] * 7 + [0.0] * 7)
    adv = reference.mono_anchored_advantage(half, ids, torch.ones(K), aids)
    assert round(adv[0].item(), 3) == 0.854 and round(adv[-1].item(), 3) == -1.098
    grpo = reference.mono_anchored_advantage(half, ids)
    assert round(grpo[0].item(), 3) == 0.964 and round(grpo[-1].item(), 3) == -0.964


@pytest.mark.parametrize("seed", range(3))
def test_spec_identities(seed):
    gen = torch.Generator().manual_seed(seed)
    G, K = 11, 3
    r = torch.rand(G, generator=gen, dtype=torch.float64)
    m = torch.rand(K, generator=gen, dtype=torch.float64)
    N = G + K
    out = reference.mono_anchored_advantage(r, [5] * G, m, [5] * K, return_stats=True)
    gain = r.mean() - m.mean()
    assert out.gain[0].item() == pytest.approx(gain.item(), abs=1e-6)
    centred = reference.mono_anchored_advantage(r, [5] * G, m, [5] * K, norm_by_std=False)
    torch.testing.assert_close(centred.double(), (r - r.mean()) + K / N * gain, atol=1e-6, rtol=0)
    sigma = out.std[0].double()
    assert out.advantages.double().sum().item() == pytest.approx(
        (G * K / N * gain / (sigma + 1e-6)).item(), abs=1e-5)
    assert out.count[0].item() == N


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_identical_values_give_exact_zero(eps):
    for backend in ["reference"] + KERNEL_BACKENDS:
        r = torch.full((10,), 0.1)
        adv = mars.mono_anchored_advantage(r, [0] * 5 + [1] * 5, torch.full((3,), 0.1), [0, 1, 1],
                                           backend=backend, eps=eps)
        assert (adv == 0).all(), backend


def test_stats_fields():
    r = torch.tensor([1.0, 0.0, 1.0, 3.0])
    out = reference.mono_anchored_advantage(r, ["b", "a", "b", "c"], torch.tensor([0.0]), ["a"],
                                            return_stats=True)
    # groups in sorted label order: a = {0, anchor 0}, b = {1, 1}, c = {3}
    assert out.count.tolist() == [2, 2, 1]
    assert out.group_index.tolist() == [1, 0, 1, 2]
    assert out.mean.tolist() == [0.0, 1.0, 3.0]
    assert out.std.tolist() == [0.0, 0.0, 0.0]
    assert out.gain[0].item() == 0.0 and math.isnan(out.gain[1].item())
    assert out.advantages.tolist() == [0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- backends vs reference
SHAPES = [  # (groups, max rows per group, max anchors per group)
    (1, 1, 0), (1, 1, 1), (3, 5, 6), (17, 64, 2), (100, 7, 6), (1000, 16, 2)]


def _cases():
    for backend in KERNEL_BACKENDS:
        for shape in SHAPES:
            yield backend, shape
    if "cpu" in KERNEL_BACKENDS:
        yield "cpu", (3000, 64, 6)  # ~10^5 rows


@pytest.mark.parametrize("backend,shape", list(_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_backend_matches_reference(poison, backend, shape, dtype):
    gen = torch.Generator().manual_seed(hash((backend, shape, str(dtype))) % 2**31)
    n_groups, max_rows, max_anchors = shape
    r, g, a, ag = random_batch(gen, n_groups, max_rows, max_anchors)
    r, a = r.to(dtype), a.to(dtype)
    for kw in (dict(), dict(norm_by_std=False, singleton="raw"), dict(unbiased=False, eps=1e-3)):
        want = reference.mono_anchored_advantage(r, g, a, ag, return_stats=True, **kw)
        got = mars.mono_anchored_advantage(r, g, a, ag, backend=backend, return_stats=True, **kw)
        for name, x, y in zip(want._fields, got, want):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert not (torch.isnan(x) & ~torch.isnan(y)).any(), f"{name}: unwritten output"
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_and_label_kinds(backend):
    gen = torch.Generator().manual_seed(7)
    r, g, a, ag = random_batch(gen, 40, 9, 4)
    wide = torch.stack([r, -r], 1)  # column 0 is a non-contiguous view of r
    want = reference.mono_anchored_advantage(r, g, a, ag)
    got = mars.mono_anchored_advantage(wide[:, 0], g, a, ag, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    as_str = mars.mono_anchored_advantage(r, [str(x) for x in g.tolist()], a,
                                          [str(x) for x in ag.tolist()], backend=backend)
    as_np = mars.mono_anchored_advantage(r.numpy(), g.numpy(), a.numpy(), ag.numpy(), backend=backend)
    torch.testing.assert_close(as_str, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_np, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_deterministic(backend):
    gen = torch.Generator().manual_seed(3)
    r, g, a, ag = random_batch(gen, 300, 20, 3)
    r = r.float() + torch.rand(len(r), generator=gen) * 1e-3
    x = mars.mono_anchored_advantage(r, g, a, ag, backend=backend, return_stats=True)
    y = mars.mono_anchored_advantage(r, g, a, ag, backend=backend, return_stats=True)
    for u, v in zip(x, y):
        assert torch.equal(u.nan_to_num(), v.nan_to_num())


def test_singleton_modes():
    r = torch.tensor([0.7, 0.2, 0.4])
    ids = [0, 1, 1]
    for backend in ["reference"] + KERNEL_BACKENDS:
        zero = mars.mono_anchored_advantage(r, ids, singleton="zero", backend=backend)
        raw = mars.mono_anchored_advantage(r, ids, singleton="raw", backend=backend)
        assert zero[0].item() == 0.0 and raw[0].item() == pytest.approx(0.7)
        # with an anchor the pool has two values: the anchor is used even when G == 1
        anch = mars.mono_anchored_advantage(r, ids, torch.tensor([0.3]), [0], backend=backend)
        assert anch[0].item() == pytest.approx(0.2 / (math.sqrt(0.08) + 1e-6), rel=1e-5)


def test_empty_batch():
    out = mars.mono_anchored_advantage(torch.zeros(0), [])
    assert out.shape == (0,) and out.dtype == torch.float32


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_argument():
    r = torch.tensor([1.0, float("nan"), 0.0, float("inf")])
    with pytest.raises(ValueError, match=r"rewards has non-finite values at rows \[1, 3\]"):
        mars.mono_anchored_advantage(r, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="anchor_rewards has non-finite"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], torch.tensor([float("nan")]), [0])
    with pytest.raises(ValueError, match=r"anchor_group_ids: labels \['zz'\] do not occur"):
        mars.mono_anchored_advantage(torch.ones(2), ["a", "b"], torch.ones(2), ["a", "zz"])
    with pytest.raises(ValueError, match=r"anchor_group_ids: labels \[9\] do not occur"):
        mars.mono_anchored_advantage(torch.ones(2), torch.tensor([0, 1]), torch.ones(1),
                                     torch.tensor([9]))
    with pytest.raises(ValueError, match="group_ids has 3 labels for 2 rewards"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0, 1])
    with pytest.raises(ValueError, match="anchor_group_ids has 1 labels for 2 anchor_rewards"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], torch.ones(2), [0])
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        mars.mono_anchored_advantage(torch.ones(2, 3), [0, 0])
    with pytest.raises(ValueError, match="anchor_rewards is on meta but rewards is on cpu"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], torch.ones(1, device="meta"), [0])
    with pytest.raises(ValueError, match="same kind"):
        mars.mono_anchored_advantage(torch.ones(2), ["a", "a"], torch.ones(1), [0])
    with pytest.raises(ValueError, match="group_ids must hold integer or string labels"):
        mars.mono_anchored_advantage(torch.ones(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="singleton must be"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], singleton="nan")
    with pytest.raises(ValueError, match="backend must be one of"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], backend="tpu")
    with pytest.raises(ValueError, match="anchor_rewards given without anchor_group_ids"):
        mars.mono_anchored_advantage(torch.ones(2), [0, 0], torch.ones(1))


def test_backends_report():
    table = mars.backends()
    assert set(table) == {"reference", "cpu", "cuda", "triton"}
    for name, b in table.items():
        assert isinstance(b.available, bool) and b.reason, name
    if not HAS_GPU:
        assert not table["cuda"].available and "GPU" in table["cuda"].reason or \
            "CUDA" in table["cuda"].reason


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
def test_torch_compile_fullgraph():
    def f(r, g, a, ag):
        return mars.mono_anchored_advantage(r, g, a, ag, backend="cpu") * 2.0
    gen = torch.Generator().manual_seed(1)
    r, g, a, ag = random_batch(gen, 12, 6, 2)
    r, a = r.float(), a.float()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(r, g, a, ag), f(r, g, a, ag))


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    r = torch.rand(20, generator=gen)
    g = torch.randint(0, 4, (20,), generator=gen)
    g[:4] = torch.arange(4)
    # every group gets an anchor: a NaN gain would fail opcheck's equality (NaN != NaN)
    args = (r, g, torch.rand(5, generator=gen), torch.tensor([0, 2, 3, 1, 2]), 4, True, 1e-6,
            True, False)
    torch.library.opcheck(torch.ops.mars.mono_anchored_advantage.default, args)


# ---------------------------------------------------------------- peer parity (verl)
def _verl():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norm", [True, False])
def test_parity_with_verl_grpo(seed, norm):
    core_algos = _verl()
    gen = torch.Generator().manual_seed(seed)
    r, g, _, _ = random_batch(gen, 30, 8, 0, label_kind="str")
    B, T = len(r), 5
    length = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T)[None] < length[:, None]).float()
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), length - 1] = r.float()  # score on the last valid token
    want, _ = core_algos.compute_grpo_outcome_advantage(
        token_rewards, mask, np.array(g, dtype=object), norm_adv_by_std_in_grpo=norm)
    for backend in ["reference"] + KERNEL_BACKENDS:
        got = mars.mono_anchored_advantage(r.float(), g, norm_by_std=norm, singleton="raw",
                                           backend=backend)
        torch.testing.assert_close(got[:, None] * mask, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU
@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", SHAPES + [(3000, 64, 6)])
def test_gpu_backend_matches_reference(poison, backend, shape):
    gen = torch.Generator().manual_seed(11)
    r, g, a, ag = random_batch(gen, *shape)
    want = reference.mono_anchored_advantage(r, g, a, ag, return_stats=True)
    got = mars.mono_anchored_advantage(r.cuda(), g.cuda(), a.cuda(), ag.cuda(), backend=backend,
                                       return_stats=True)
    for name, x, y in zip(want._fields, got, want):
        torch.testing.assert_close(x.cpu(), y, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
    again = mars.mono_anchored_advantage(r.cuda(), g.cuda(), a.cuda(), ag.cuda(), backend=backend)
    assert torch.equal(again, got.advantages)


def test_string_labels_hash_collision_falls_back(monkeypatch):
    """Two labels whose hashes collide must still be two groups."""
    from mars import groups
    monkeypatch.setattr(groups, "_string_codes", lambda u: torch.zeros(len(u), dtype=torch.long))
    r = torch.tensor([1.0, 0.0, 0.5, 0.25])
    got = mars.mono_anchored_advantage(r, ["b", "a", "b", "a"], torch.tensor([1.0]), ["a"],
                                       return_stats=True)
    assert got.count.tolist() == [3, 2]
    assert got.group_index.tolist() == [1, 0, 1, 0]
    want = naive(r, ["b", "a", "b", "a"], [1.0], ["a"])
    torch.testing.assert_close(got.advantages.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("spread", [1, 10**12])  # dense range path / sort path
def test_dense_labels_op_matches_torch_unique(spread):
    gen = torch.Generator().manual_seed(spread % 97)
    labels = (torch.randint(-50, 50, (500,), generator=gen) * spread)
    labels[labels == 0] = spread  # 0 is absent but inside the labels' range
    labels[:2] = torch.tensor([-2**62, 2**62]) if spread > 1 else labels[:2]
    anchors = torch.cat([labels[torch.randint(0, 500, (40,), generator=gen)],
                         torch.tensor([0, 2**63 - 1])])  # two absent labels
    index, aindex, uniq = torch.ops.mars.dense_labels(labels, anchors)
    want_uniq, want_index = torch.unique(labels, sorted=True, return_inverse=True)
    assert torch.equal(uniq, want_uniq) and torch.equal(index, want_index)
    assert torch.equal(uniq[aindex[:40]], anchors[:40]) and aindex[40:].tolist() == [-1, -1]


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
def test_cpu_streaming_and_sorted_paths_are_bitwise_equal():
    """> 64k values take the sorted, threaded path with 2 threads and the streaming path
    with 1; both sum each group in row order, so they must agree to the bit."""
    gen = torch.Generator().manual_seed(5)
    r, g, a, ag = random_batch(gen, 4000, 40, 4)
    r = r.float() + torch.rand(len(r), generator=gen) * 1e-3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = mars.mono_anchored_advantage(r, g, a, ag, backend="cpu", return_stats=True)
        torch.set_num_threads(1)
        one = mars.mono_anchored_advantage(r, g, a, ag, backend="cpu", return_stats=True)
    finally:
        torch.set_num_threads(threads)
    assert len(r) + len(a) > 65536
    for x, y in zip(one, two):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())


def test_dapo_filter_on_pooled_std():
    """README's DAPO filter: a group whose rollouts agree but whose anchors differ keeps
    its signal (pooled std > 0); only a group where everything agrees is dropped."""
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    out = mars.mono_anchored_advantage(r, [0, 0, 0, 1, 1, 1], torch.tensor([0.0, 0.0]), [0, 1],
                                       return_stats=True)
    keep = out.std[out.group_index] > 0
    assert keep.tolist() == [True] * 3 + [False] * 3
    assert (out.advantages[:3] > 0).all() and (out.advantages[3:] == 0).all()
