"""The public names (docs/README.md, "Public names") and the keyword defaults of the
advantage and the losses (docs/advantage.md, docs/loss.md)."""
import inspect

import mars


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_advantage_signature():
    for fn in (mars.mono_anchored_advantage, mars.reference.mono_anchored_advantage):
        params = list(inspect.signature(fn).parameters)
        assert params[:4] == ["rewards", "group_ids", "anchor_rewards", "anchor_group_ids"]
        d = _defaults(fn)
        assert d["anchor_rewards"] is None and d["anchor_group_ids"] is None
        assert (d["norm_by_std"], d["eps"], d["unbiased"], d["singleton"], d["return_stats"]) == \
            (True, 1e-6, True, "zero", False)
    assert _defaults(mars.mono_anchored_advantage)["backend"] == "auto"
    assert mars.AdvantageOutput._fields == ("advantages", "mean", "std", "count", "gain",
                                            "group_index")


def test_loss_signatures():
    for fn in (mars.loss.policy_loss, mars.reference.policy_loss):
        params = list(inspect.signature(fn).parameters)
        assert params[:4] == ["logp", "old_logp", "advantages", "mask"]
        d = _defaults(fn)
        assert d["ref_logp"] is None and d["dual_clip"] is None
        assert (d["clip_low"], d["clip_high"], d["kl_coef"], d["kl_type"], d["agg"]) == \
            (0.2, 0.2, 0.0, "k3", "token-mean")
        assert (d["num_tokens"], d["num_seqs"], d["loss_scale"], d["ratio_level"],
                d["log_ratio_clamp"]) == (None, None, None, "token", 20.0)
    params = list(inspect.signature(mars.loss.fused_linear_policy_loss).parameters)
    assert params[:6] == ["hidden", "weight", "ids", "old_logp", "advantages", "mask"]
    d = _defaults(mars.loss.fused_linear_policy_loss)
    assert d["bias"] is None and d["temperature"] == 1.0 and d["chunk_size"] is None
    d = _defaults(mars.loss.token_logprobs)
    assert d["bias"] is None and d["temperature"] == 1.0
    assert callable(mars.loss.MarsLoss) and callable(mars.loss.FusedLinearMarsLoss)


def test_lazy_modules():
    assert callable(mars.evaluate)
    assert callable(mars.rewards.get_reward) and hasattr(mars.data, "load_samples")
    assert set(mars.backends()) == {"reference", "cpu", "cuda", "triton"}


def test_compiled_ops_have_their_kernels():
    """CPU kernels always; CUDA kernels for every op or for none (CI compiles them without
    a GPU; .ci/run checks they are there), and mars.backends() tells which."""
    import pytest
    import torch
    if not mars.backends()["cpu"].available:
        pytest.skip("C++ extension not built")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("mono_anchored_advantage", "policy_loss"):
        assert has(f"mars::{op}", "CPU"), op
    assert has("mars::dense_labels", "CPU")
    cuda = {has(f"mars::{op}", "CUDA") for op in ("mono_anchored_advantage", "policy_loss")}
    assert len(cuda) == 1, "CUDA kernels for some ops only"
    reason = mars.backends()["cuda"].reason
    assert ("not compiled" in reason) != cuda.pop(), reason


def test_a_triton_whose_interpreter_cannot_run_the_kernels_is_named(monkeypatch):
    """Triton 3.6 (torch 2.11's pin) interprets every mars kernel into an InterpreterError:
    on CPU tensors under TRITON_INTERPRET=1 such a triton is an unavailable backend, and
    asking for it is a RuntimeError naming the version and the fix, before any kernel runs."""
    import pytest
    import torch

    from mars import _ext

    if not _ext.HAS_TRITON or torch.cuda.is_available():
        pytest.skip("needs triton and no GPU (on a GPU the kernels compile with any triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _ext.interpreter_error("3.7.1") is None and _ext.interpreter_error("3.10.0") is None
    assert _ext.interpreter_error(None) is None  # no metadata (a source build): let it try
    monkeypatch.setattr(_ext, "TRITON_INTERPRETER_ERROR", _ext.interpreter_error("3.6.0"))
    why = mars.backends()["triton"]
    assert not why.available and "triton 3.6.0" in why.reason and "triton>=3.7" in why.reason
    B, T = 3, 5
    logp = torch.randn(B, T, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"triton 3\.6\.0's interpreter.*triton>=3\.7"):
        mars.loss.policy_loss(logp, logp.detach(), torch.randn(B), torch.ones(B, T), backend="triton")
    with pytest.raises(RuntimeError, match=r"triton>=3\.7"):
        mars.mono_anchored_advantage(torch.randn(4), torch.tensor([0, 0, 1, 1]), backend="triton")
    monkeypatch.setattr(_ext, "TRITON_INTERPRETER_ERROR", _ext.interpreter_error("3.7.1"))
    assert mars.backends()["triton"].available
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "set TRITON_INTERPRET=1" in mars.backends()["triton"].reason


def test_the_op_modules_keep_their_public_names(monkeypatch):
    """mars.<op> is mars.ops.<op> itself (docs/layers.md): the same module object, so an
    attribute patched through one name is what the other's functions read."""
    import importlib

    import mars.ops.groups

    for name in ("_ext", "groups", "reference", "backends", "policy_loss", "advantage", "fused_linear", "loss"):
        public, ops = importlib.import_module(f"mars.{name}"), importlib.import_module(f"mars.ops.{name}")
        assert public is ops and getattr(mars, name, ops) in (ops, mars.backends), name
    assert mars.reference.AdvantageOutput is mars.AdvantageOutput
    assert mars.loss.policy_loss is mars.ops.policy_loss.policy_loss
    monkeypatch.setattr(mars.groups, "_FORCE_ONE_READ", True)
    assert mars.ops.groups._FORCE_ONE_READ is True
