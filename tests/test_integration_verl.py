"""mars's verl integration against the real verl 0.9.1 package, on CPU (docs/verl.md).

- the ``verl.plugins`` entry point registers ``mars`` in both registries at ``import verl``
  (fresh process), idempotently, and fails loudly;
- the estimator gives verl's GRPO numbers without anchors and the pooled MARS numbers with
  them; the loss gives verl's vanilla numbers through verl's own call site (``ppo_loss``);
- the mono batch on a DataProto with several images per row, the combined generation batch
  (``__do_sample__``, padding to the workers' divisor), slicing back, anchors by uid;
- the anchors survive verl's ``_balance_batch`` and reach the estimator through verl's own
  ``compute_advantage``;
- the recipe's trainer imports and builds on the real verl, nothing stubbed (the ``verl``
  extra must bring what verl's ray_trainer imports without declaring: cachetools, fastapi,
  uvicorn), and its ``mars/*`` metrics are logged through verl's own ``fit`` in every
  reward mode (agent-loop scores, colocated reward model) with and without balance_batch;
- multi-output agent sessions through verl's own ``compute_advantage_for_multi_trajectories``
  get GRPO's session grouping.
verl's trainer modules run in subprocesses (their import is slow and sets global state).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from mars.integrations.verl import batch as B  # noqa: E402
from mars.integrations.verl.estimator import anchors_from_baselines, compute_mars_advantage  # noqa: E402
from mars.integrations.verl.loss import compute_policy_loss_mars  # noqa: E402
from mars.integrations.verl.rollout import MonoAnchorRollout  # noqa: E402

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.pop("VERL_USE_EXTERNAL_PLUGINS", None)
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env_extra or {}).get("PYTHONPATH", "").split(os.pathsep)
                                        + [ROOT] if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------- plug-in

def test_entry_point_registers_in_fresh_process_idempotent_and_loud_on_failure():
    r = _run("""
        import importlib, sys
        import verl   # loads the verl.plugins entry points
        from verl.trainer.ppo.core_algos import (ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY,
                                                 get_adv_estimator_fn, get_policy_loss_fn)
        assert "mars.integrations.verl.plugin" in sys.modules, "entry point not loaded"
        from mars.integrations.verl.estimator import compute_mars_advantage
        from mars.integrations.verl.loss import compute_policy_loss_mars
        assert get_adv_estimator_fn("mars") is compute_mars_advantage
        assert get_policy_loss_fn("mars") is compute_policy_loss_mars
        n = (len(ADV_ESTIMATOR_REGISTRY), len(POLICY_LOSS_REGISTRY))
        import mars.integrations.verl.plugin as p
        importlib.reload(p)                    # idempotent: same functions, no error
        del sys.modules["mars.integrations.verl.plugin"]
        p = importlib.import_module("mars.integrations.verl.plugin")
        import mars.integrations.verl.estimator as e
        importlib.reload(e); importlib.reload(p)   # a reload replaces our own entry
        assert get_adv_estimator_fn("mars") is e.compute_mars_advantage
        assert (len(ADV_ESTIMATOR_REGISTRY), len(POLICY_LOSS_REGISTRY)) == n
        print("REGISTERED", flush=True)

        # failure: someone else owns 'mars'; verl's own loader (re-run by reloading verl)
        # swallows the plug-in's exception at DEBUG level (verl/__init__.py L73-76)
        def someone_elses(**kw):
            raise AssertionError
        ADV_ESTIMATOR_REGISTRY["mars"] = someone_elses
        del sys.modules["mars.integrations.verl.plugin"]
        importlib.reload(verl)
        assert ADV_ESTIMATOR_REGISTRY["mars"] is someone_elses    # not replaced
        print("SWALLOWED", flush=True)
        print("=== after verl's loader ===", file=sys.stderr, flush=True)
        try:
            import mars.integrations.verl.plugin
        except ValueError as err:
            assert "different 'mars'" in str(err), err
            print("RAISED", flush=True)
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["REGISTERED", "SWALLOWED", "RAISED"], r.stdout + r.stderr
    # loud while loaded by verl's loader (before the marker), not only on a direct import
    by_verl = r.stderr.split("=== after verl's loader ===")[0]
    assert "ERROR" in by_verl and "mars verl plug-in failed" in by_verl, r.stderr
    assert "Traceback" in by_verl and "RuntimeWarning" in by_verl, r.stderr
    assert "already has a different 'mars'" in by_verl, r.stderr


# ---------------------------------------------------------------------------- estimator

def _groups(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    index = np.array([f"uid-{i}" for i, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(index), generator=g).numpy()
    index = index[perm]                                    # rows of a group scattered
    L = 7
    mask = (torch.rand(len(index), L, generator=g) > 0.3).float()
    mask[:, 0] = 1
    scores = torch.randint(0, 3, (len(index),), generator=g).float() / 2
    tlr = torch.zeros(len(index), L)
    last = (mask * torch.arange(L)).argmax(-1)
    tlr[torch.arange(len(index)), last] = scores           # verl puts the score on the last token
    return index, tlr, mask


@pytest.mark.parametrize("norm", [True, False])
def test_estimator_without_anchors_is_verls_grpo(norm):
    index, tlr, mask = _groups(0, [5, 1, 4, 4, 2, 1, 3])   # incl. one-row groups
    cfg = verl.trainer.config.AlgoConfig(norm_adv_by_std_in_grpo=norm)
    import mars.integrations.verl.estimator as est
    est._warned_no_anchors = False
    with pytest.warns(UserWarning, match="no reward_baselines"):   # verl's trainers give none
        got, ret = compute_mars_advantage(token_level_rewards=tlr, response_mask=mask, index=index,
                                          config=cfg)
    want, _ = core_algos.compute_grpo_outcome_advantage(tlr, mask, index,
                                                        norm_adv_by_std_in_grpo=norm)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert ret is got
    # the value really comes from the config
    flipped = verl.trainer.config.AlgoConfig(norm_adv_by_std_in_grpo=not norm)
    other, _ = compute_mars_advantage(tlr, mask, index=index, config=flipped)
    assert not torch.allclose(other, got)


def _pooled(r, anchors, eps=1e-6):
    s = np.concatenate([r, anchors])
    return (r - s.mean()) / (s.std(ddof=1) + eps)


def test_estimator_with_anchors_pools_by_uid():
    index, tlr, mask = _groups(1, [4, 4, 1, 3])
    uids = sorted(set(index))
    anchors = {uids[0]: [1.0, 0.0], uids[1]: [0.5], uids[2]: [0.0, 1.0], uids[3]: []}
    rb = torch.full((len(index), 2), float("nan"))
    for i, u in enumerate(index):
        rb[i, :len(anchors[u])] = torch.tensor(anchors[u])
    adv, _ = compute_mars_advantage(tlr, mask, index=index, reward_baselines=rb,
                                    config={"norm_adv_by_std_in_grpo": True})
    scores = tlr.sum(-1).numpy()
    for u in uids:
        rows = index == u
        if anchors[u]:
            want = _pooled(scores[rows], np.array(anchors[u]))
        else:  # no anchors: that group is plain GRPO
            want = (scores[rows] - scores[rows].mean()) / (scores[rows].std(ddof=1) + 1e-6)
        np.testing.assert_allclose((adv[rows] * mask[rows]).sum(-1).numpy() / mask[rows].sum(-1).numpy(),
                                   want, rtol=1e-5, atol=1e-6)
    # same numbers as mars.mono_anchored_advantage given the anchors directly
    import mars
    a, lab = anchors_from_baselines(index, rb)
    direct = mars.mono_anchored_advantage(torch.tensor(scores), index, a, lab, singleton="raw")
    torch.testing.assert_close(adv, direct[:, None] * mask)
    # docs/advantage.md's worked example: 14 correct, anchors [0, 0] -> every A = +0.366
    idx = np.array(["p"] * 14, dtype=object)
    t = torch.ones(14, 1)
    a14, _ = compute_mars_advantage(t, torch.ones(14, 1), index=idx,
                                    reward_baselines=torch.zeros(14, 2))
    torch.testing.assert_close(a14, torch.full((14, 1), 0.366), atol=5e-4, rtol=0)


def test_estimator_rejects_bad_anchor_handover():
    index = np.array(["a", "a", "b"], dtype=object)
    tlr, mask = torch.ones(3, 2), torch.ones(3, 2)
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, float("nan")]])   # rows of 'a' disagree
    with pytest.raises(ValueError, match="uid 'a'"):
        compute_mars_advantage(tlr, mask, index=index, reward_baselines=bad)
    with pytest.raises(ValueError, match="index"):
        compute_mars_advantage(tlr, mask, index=None)
    with pytest.raises(ValueError, match="infinite"):
        compute_mars_advantage(tlr, mask, index=index,
                               reward_baselines=torch.tensor([[float("inf")]] * 2 + [[0.0]]))
    # REMAX-shaped [bs] baselines = one anchor per prompt
    a, _ = compute_mars_advantage(tlr, mask, index=index, reward_baselines=torch.tensor([0.0, 0.0, 1.0]))
    b, _ = compute_mars_advantage(tlr, mask, index=index, reward_baselines=torch.tensor([[0.0], [0.0], [1.0]]))
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------- loss

def _actor_config(**kw):
    from verl.workers.config import ActorConfig, PolicyLossConfig
    mode = kw.pop("loss_mode")
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=mode), **kw)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean",
                                 "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("global_info", [False, True])
def test_loss_through_verls_call_site_equals_vanilla(agg, global_info):
    """verl's own ppo_loss (workers/utils/losses.py) calling our registered loss by name."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    g = torch.Generator().manual_seed(3)
    bs, P, R = 6, 3, 9
    resp_len = torch.tensor([9, 2, 5, 1, 7, 4])
    am = torch.zeros(bs, P + R, dtype=torch.long)
    am[:, :P] = 1
    for i in range(bs):
        am[i, P:P + resp_len[i]] = 1
    adv = torch.randn(bs, 1, generator=g).expand(bs, R).clone()
    old = -torch.rand(bs, R, generator=g) * 2
    data = TensorDict({"prompts": torch.ones(bs, P, dtype=torch.long),
                       "responses": torch.ones(bs, R, dtype=torch.long), "attention_mask": am,
                       "response_mask": am[:, P:].bool(), "old_log_probs": old, "advantages": adv,
                       "rollout_is_weights": torch.rand(bs, R, generator=g) * 2}, batch_size=[bs])
    if global_info:   # as the engine sets them: dp_size 2, whole-batch counts
        tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(resp_len.sum()) * 2 + 3,
                             global_batch_size=2 * bs + 1)
    else:
        tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    # log-probs far enough from old ones that all clip branches and the dual clip occur
    logp = (-torch.rand(int(am.sum()), generator=g) * 2).requires_grad_()
    out = {}
    for mode in ("vanilla", "mars"):
        cfg = _actor_config(loss_mode=mode, loss_agg_mode=agg, clip_ratio_low=0.2,
                            clip_ratio_high=0.28, clip_ratio_c=2.5,
                            loss_scale_factor=16 if global_info else None)
        loss, metrics = ppo_loss(cfg, {"log_probs": logp}, data)
        (grad,) = torch.autograd.grad(loss, logp)
        out[mode] = (loss.detach(), grad, {k: v.aggregate() for k, v in metrics.items()})
    (lv, gv, mv), (lm, gm, mm) = out["vanilla"], out["mars"]
    torch.testing.assert_close(lm, lv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm, gv, rtol=1e-5, atol=1e-7)
    assert set(mm) == set(mv) >= {"actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"}
    for k in mv:
        assert mm[k] == pytest.approx(mv[k], rel=1e-5, abs=1e-7), k
    assert mv["actor/pg_clipfrac"] > 0 and mv["actor/pg_clipfrac_lower"] > 0  # branches exercised


def test_loss_direct_call_and_errors():
    g = torch.Generator().manual_seed(4)
    old, adv = -torch.rand(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    logp = (-torch.rand(3, 4, generator=g)).requires_grad_()
    cfg = _actor_config(loss_mode="mars")
    loss, metrics = compute_policy_loss_mars(old_log_prob=old, log_prob=logp, advantages=adv,
                                             response_mask=mask, config=cfg)
    want, wm = core_algos.compute_policy_loss_vanilla(old, logp, adv, mask, config=_actor_config(loss_mode="vanilla"))
    torch.testing.assert_close(loss, want)
    assert all(isinstance(v, float) for v in metrics.values()) and metrics.keys() == wm.keys()
    with pytest.raises(ValueError, match="actor config"):
        compute_policy_loss_mars(old, logp, adv, mask, config=None)
    bad = _actor_config(loss_mode="mars")
    bad.global_batch_info["dp_size"] = 4
    with pytest.raises(ValueError, match="batch_num_tokens"):
        compute_policy_loss_mars(old, logp, adv, mask, config=bad)
    w = torch.ones(3, 4)
    w[0, 0] = -1.0
    with pytest.raises(ValueError, match="is_weights"):
        compute_policy_loss_mars(old, logp, adv, mask, config=cfg, rollout_is_weights=w)


# ---------------------------------------------------------------------------- batches

def _img(name, **extra):
    return {"type": "image", "image": name, **extra}


def _gen_batch(n=3):
    """verl's gen_batch as fit builds it (RLHFDataset rows, _get_gen_batch, repeat(n))."""
    rp = np.empty(4, dtype=object)
    rp[0] = [{"role": "user", "content": [_img("rgb0.png"), _img("ir0.png"),
                                          {"type": "text", "text": "Where is the person?"}]}]
    rp[1] = [{"role": "user", "content": "text only"}]
    rp[2] = [{"role": "system", "content": "You are careful."},
             {"role": "user", "content": [_img("v0.png", max_pixels=4096),
                                          {"type": "text", "text": "and"}, _img("v1.png"),
                                          _img("v2.png")]}]
    rp[3] = [{"role": "user", "content": [_img("only.png"), {"type": "text", "text": "?"}]}]
    batch = DataProto.from_single_dict({
        "raw_prompt": rp, "dummy_tensor": torch.zeros(4, 1, dtype=torch.uint8),
        "data_source": np.array(["llvip", "t", "views", "one"], dtype=object),
        "reward_model": np.array([{"ground_truth": f"gt{i}"} for i in range(4)], dtype=object),
        "extra_info": np.array([{"index": i} for i in range(4)], dtype=object),
        "agent_name": np.array(["single_turn_agent"] * 4, dtype=object)})
    batch.non_tensor_batch["uid"] = np.array([f"u{i}" for i in range(4)], dtype=object)
    keep = {"data_source", "reward_model", "extra_info", "uid"}
    gen = batch.pop(batch_keys=[], non_tensor_batch_keys=list(set(batch.non_tensor_batch) - keep))
    gen.non_tensor_batch.update(batch.non_tensor_batch)
    gen.meta_info["global_steps"] = 1
    return gen.repeat(repeat_times=n, interleave=True)


def test_mono_batch_several_images_per_row():
    gen = _gen_batch()
    before = repr(list(gen.non_tensor_batch["raw_prompt"]))
    mono = B.build_mono_batch(gen)
    assert list(mono.uids) == ["u0", "u0", "u2", "u2", "u2", "u3"]
    assert list(mono.sources) == [0, 1, 0, 1, 2, 0]
    rp = mono.data.non_tensor_batch["raw_prompt"]
    imgs = [[p["image"] for m in msgs if isinstance(m["content"], list)
             for p in m["content"] if p.get("type") == "image"] for msgs in rp]
    assert imgs == [["rgb0.png"] * 2, ["ir0.png"] * 2, ["v0.png"] * 3, ["v1.png"] * 3,
                    ["v2.png"] * 3, ["only.png"]]
    # text, roles and the system message kept; extra image keys travel with the image
    assert rp[2][0] == {"role": "system", "content": "You are careful."}
    assert [p for p in rp[2][1]["content"] if p["type"] == "text"] == [{"type": "text", "text": "and"}]
    assert rp[2][1]["content"][0] == _img("v0.png", max_pixels=4096)
    assert rp[3][1]["content"][0] == _img("v1.png") and "max_pixels" not in rp[3][1]["content"][0]
    # every other field is the prompt's, so the reward manager scores the same ground truth
    assert [d["ground_truth"] for d in mono.data.non_tensor_batch["reward_model"]] == \
        ["gt0", "gt0", "gt2", "gt2", "gt2", "gt3"]
    assert repr(list(gen.non_tensor_batch["raw_prompt"])) == before      # input untouched
    single = B.build_mono_batch(gen, mode="single", min_sources=2)
    assert list(single.uids) == ["u0", "u0", "u2", "u2", "u2"]
    assert [B.count_sources(m) for m in single.data.non_tensor_batch["raw_prompt"]] == [1] * 5
    assert single.data.non_tensor_batch["raw_prompt"][3][1]["content"] == [
        {"type": "text", "text": "and"}, _img("v1.png")]
    with pytest.raises(ValueError, match="out of range"):
        B.mono_messages(gen.non_tensor_batch["raw_prompt"][0], 2)
    with pytest.raises(ValueError, match="mode"):
        B.build_mono_batch(gen, mode="both")


@pytest.mark.parametrize("divisor", [1, 4, 8])
def test_combined_batch_pads_to_divisor_and_slices_back(divisor):
    from tensordict import TensorDict
    gen = _gen_batch()
    gen.batch = TensorDict({"row_id": torch.arange(12)}, batch_size=[12])   # a tensor field too
    mono = B.build_mono_batch(gen)
    assert mono.data.batch["row_id"].tolist() == [0, 0, 6, 6, 6, 9]         # the uid's first row
    combined, layout = B.combine_for_generation(gen, mono.data, divisor)
    assert len(combined) % divisor == 0 and layout.total == len(combined)
    assert (layout.n_sampled, layout.n_mono) == (12, 6) and layout.n_pad == (-18) % divisor
    flags = combined.non_tensor_batch[B.DO_SAMPLE_KEY]
    assert flags.dtype == bool and flags[:12].all() and not flags[12:].any()
    combined.chunk(divisor)           # verl's AgentLoopManager split must not assert
    assert B.DO_SAMPLE_KEY not in gen.non_tensor_batch
    # an engine stand-in: output row i = input row i plus tensors
    out = DataProto.from_dict(
        tensors={"responses": torch.arange(len(combined))[:, None].repeat(1, 3),
                 "rm_scores": torch.zeros(len(combined), 3), "row_id": combined.batch["row_id"]},
        non_tensors=dict(combined.non_tensor_batch), meta_info={"timing": {}})
    sampled, mono_out = B.split_generation_output(out, layout)
    assert len(sampled) == 12 and len(mono_out) == 6
    assert sampled.non_tensor_batch.keys() == gen.non_tensor_batch.keys()
    for k, v in gen.non_tensor_batch.items():     # the sampled rows come back unchanged
        assert all(a is b for a, b in zip(sampled.non_tensor_batch[k], v)), k
    assert sampled.batch["responses"][:, 0].tolist() == list(range(12))
    assert torch.equal(sampled.batch["row_id"], gen.batch["row_id"])
    assert mono_out.batch["responses"][:, 0].tolist() == list(range(12, 18))
    with pytest.raises(ValueError, match="rows"):
        B.split_generation_output(out.slice(0, 10), layout)
    with pytest.raises(ValueError, match="__do_sample__"):
        B.combine_for_generation(combined, None, divisor)


def test_reward_baselines_by_uid_nan_padding_and_order():
    uids = np.array(["b", "a", "c", "a", "b"], dtype=object)
    rb = B.reward_baselines_by_uid(uids, np.array(["a", "a", "b"], dtype=object), [0, 1, 0],
                                   torch.tensor([0.25, 0.75, 1.0]))
    nan = float("nan")
    torch.testing.assert_close(rb, torch.tensor([[1.0, nan], [0.25, 0.75], [nan, nan],
                                                 [0.25, 0.75], [1.0, nan]]), equal_nan=True)
    with pytest.raises(ValueError, match="no sampled row"):
        B.reward_baselines_by_uid(uids, np.array(["z"], dtype=object), [0], torch.tensor([1.0]))
    with pytest.raises(ValueError, match="two anchors"):
        B.reward_baselines_by_uid(uids, np.array(["a", "a"], dtype=object), [0, 0], torch.ones(2))


class _FakeAgentLoopManager:
    """Stands in for verl's AgentLoopManager: chunks like it (DataProto.chunk asserts an
    equal split), answers every row in order with the fields the agent loop returns
    (agent_loop.py L1057-1148; response lengths vary), greedy rows per __do_sample__, and
    scores each answer as the reward workers would (rm_scores on the last response token)."""

    def __init__(self, num_workers, score, with_scores=True):
        self.num_workers, self.score, self.with_scores, self.calls = num_workers, score, with_scores, []
        self.name = "fake"

    def generate_sequences(self, prompts):
        self.calls.append(prompts)
        prompts.chunk(self.num_workers)
        n = len(prompts)
        greedy = ~prompts.non_tensor_batch.get(B.DO_SAMPLE_KEY, np.ones(n, bool))
        scores = torch.tensor([self.score(m, g) for m, g in zip(prompts.non_tensor_batch["raw_prompt"], greedy)])
        resp_len = 1 + (torch.arange(n) * 7 + len(self.calls)) % 4
        rmask = (torch.arange(4)[None, :] < resp_len[:, None]).long()
        tensors = {"prompts": torch.ones(n, 2, dtype=torch.long),
                   "responses": torch.ones(n, 4, dtype=torch.long),
                   "attention_mask": torch.cat([torch.ones(n, 2, dtype=torch.long), rmask], 1),
                   "response_mask": rmask}
        if self.with_scores:
            rm = torch.zeros(n, 4)
            rm[torch.arange(n), resp_len - 1] = scores
            tensors["rm_scores"] = rm
        return DataProto.from_dict(tensors=tensors, non_tensors=dict(prompts.non_tensor_batch),
                                   meta_info={"timing": {"gen": 1.0}})


def _score(msgs, greedy):
    """reward of an answer: greedy answers see only the first image's name."""
    names = [p["image"] for m in msgs if isinstance(m["content"], list) for p in m["content"]
             if p.get("type") == "image"]
    return (0.25 if greedy else 0.5) + (0.125 if names and names[0].startswith(("rgb", "v0")) else 0.0)


def test_rollout_wrapper_one_call_and_anchors_by_uid():
    fake = _FakeAgentLoopManager(8, _score)
    roll = MonoAnchorRollout(fake, num_workers=8)
    gen = _gen_batch()
    out = roll.generate_sequences(gen)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 24          # 12 + 6 + 6 padding
    assert len(out) == 12 and roll.name == "fake"                     # delegation
    rb = out.batch["reward_baselines"]
    want = {"u0": [0.375, 0.25, nan := float("nan")], "u1": [nan, nan, nan],
            "u2": [0.375, 0.25, 0.25], "u3": [0.25, nan, nan]}
    for u, row in zip(out.non_tensor_batch["uid"], rb):
        torch.testing.assert_close(row, torch.tensor(want[u]), equal_nan=True)
    m = roll.pop_metrics()
    assert m["mars/anchor_rollouts"] == 6 and m["mars/anchored_prompts"] == 3 and m["mars/pad_rollouts"] == 6
    # validation passes straight through
    val = _gen_batch()
    val.meta_info["validate"] = True
    fake.num_workers = 12
    assert len(roll.generate_sequences(val)) == 12 and B.DO_SAMPLE_KEY not in fake.calls[-1].non_tensor_batch


def test_rollout_wrapper_colocated_reward_scores_later():
    fake = _FakeAgentLoopManager(4, _score, with_scores=False)
    roll = MonoAnchorRollout(fake, num_workers=4)
    out = roll.generate_sequences(_gen_batch())
    assert "reward_baselines" not in out.batch.keys() and roll.pending is not None

    def reward_manager(data):   # the trainer's _compute_reward_colocate stand-in
        rm = torch.zeros(len(data), 4)
        rm[:, -1] = torch.tensor([_score(m, True) for m in data.non_tensor_batch["raw_prompt"]])
        return DataProto.from_dict(tensors={"rm_scores": rm})

    out.reorder(torch.tensor([11, 0, 5, 3, 1, 2, 4, 6, 7, 8, 9, 10]))
    result = DataProto.from_dict(tensors={"rm_scores": torch.zeros(12, 4)})
    roll.finish_pending(reward_manager, out, result)
    assert roll.pending is None
    for u, row in zip(out.non_tensor_batch["uid"], result.batch["reward_baselines"]):
        if u == "u2":
            torch.testing.assert_close(row, torch.tensor([0.375, 0.25, 0.25]))


# ------------------------------------------------- verl's _balance_batch + compute_advantage

def test_anchor_handover_survives_balance_batch_and_reaches_estimator():
    """fit's data path (ray_trainer.py L1470-1667) with verl's own _get_gen_batch,
    _balance_batch (through the recipe trainer's override) and compute_advantage; only the
    engine is the stand-in above. Both reward paths: scored in the agent loop, and a
    colocated reward model scoring after the replicas sleep."""
    r = _run(textwrap.dedent("""
        import json, sys
        import numpy as np, torch
        from omegaconf import OmegaConf
        sys.path.insert(0, "tests")
        from test_integration_verl import _FakeAgentLoopManager, _gen_batch, _score
        from verl import DataProto
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage
        import mars
        from mars.integrations.verl.rollout import MonoAnchorRollout
        from mars.integrations.verl.trainer import RayMARSTrainer

        res = {"issub": issubclass(RayMARSTrainer, RayPPOTrainer)}
        for colocated in (False, True):
            G = 3
            gen = _gen_batch(G)                         # uid, raw_prompt, ... (n=3 repeats)
            # the dataset-side batch that fit unions the generation output into
            batch = DataProto.from_dict(tensors={"row_id": torch.arange(len(gen))},
                                        non_tensors={k: gen.non_tensor_batch[k] for k in
                                                     ("uid", "data_source", "reward_model", "extra_info")})
            t = RayMARSTrainer.__new__(RayMARSTrainer)
            t.config = OmegaConf.create({"actor_rollout_ref": {"actor": {"ppo_mini_batch_size": 4}}})
            t.actor_rollout_wg, t.use_prefix_grouper = None, False
            t._get_dp_size = lambda wg, role: 2
            fake = _FakeAgentLoopManager(8, _score, with_scores=not colocated)
            t.async_rollout_manager = MonoAnchorRollout(fake, num_workers=8)
            out = t.async_rollout_manager.generate_sequences(gen)   # fit L1513
            batch = batch.union(out)                                # fit L1541
            metrics = {}
            t._balance_batch(batch, metrics=metrics)                # fit L1550
            if colocated:                                           # fit L1563-1565
                def compute_rm_score(data):
                    rm = torch.zeros(len(data), 4)
                    last = data.batch["response_mask"].sum(-1) - 1
                    rm[torch.arange(len(data)), last] = torch.tensor(
                        [_score(m, False) for m in data.non_tensor_batch["raw_prompt"]])
                    return DataProto.from_dict(tensors={"rm_scores": rm})
                class RLM:
                    pass
                t.reward_loop_manager = RLM()
                seen = []
                def score(data):
                    seen.append(len(data))
                    if len(seen) == 1:       # the sampled rows: verl's reward manager
                        return compute_rm_score(data)
                    rm = torch.zeros(len(data), 4)  # the mono rows: greedy scores
                    last = data.batch["response_mask"].sum(-1) - 1
                    rm[torch.arange(len(data)), last] = torch.tensor(
                        [_score(m, True) for m in data.non_tensor_batch["raw_prompt"]])
                    return DataProto.from_dict(tensors={"rm_scores": rm})
                t.reward_loop_manager.compute_rm_score = score
                batch = batch.union(t._compute_reward_colocate(batch))
            moved = int((batch.batch["row_id"] != torch.arange(len(batch))).sum())
            batch.batch["token_level_rewards"] = batch.batch["rm_scores"]
            algo = OmegaConf.create({"norm_adv_by_std_in_grpo": True})
            batch = compute_advantage(batch, adv_estimator="mars", config=algo, num_repeat=G)
            # expected: the pooled statistics by uid, from the prompts themselves
            uids = batch.non_tensor_batch["uid"]
            r = batch.batch["rm_scores"].sum(-1)
            a_uid, a_val = [], []
            for u in dict.fromkeys(uids):
                msgs = gen.non_tensor_batch["raw_prompt"][list(gen.non_tensor_batch["uid"]).index(u)]
                from mars.integrations.verl.batch import count_sources, mono_messages
                for k in range(count_sources(msgs)):
                    a_uid.append(u); a_val.append(_score(mono_messages(msgs, k), True))
            want = mars.mono_anchored_advantage(r, uids, torch.tensor(a_val), np.array(a_uid, dtype=object),
                                                singleton="raw")
            got = batch.batch["advantages"]
            err = float((got - want[:, None] * batch.batch["response_mask"]).abs().max())
            plain = mars.mono_anchored_advantage(r, uids)       # GRPO: would differ
            differs = float((got.sum(-1) / batch.batch["response_mask"].sum(-1) - plain).abs().max())
            res[str(colocated)] = {"moved": moved, "err": err, "differs": differs,
                                   "calls": len(fake.calls)}
        print(json.dumps(res))
    """), timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["issub"]
    for key in ("False", "True"):
        assert res[key]["moved"] > 0, "verl's _balance_batch did not re-order the rows"
        assert res[key]["err"] < 1e-6, res
        assert res[key]["differs"] > 0.05, "anchors had no effect"
        assert res[key]["calls"] == 1, "sampled and greedy rows must share one generate call"


# ---------------------------------------------------------------------------- the recipe's trainer

def _recipe_trainer_code(overrides):
    """Python source (for _run) that composes the recipe's config with `overrides` and
    builds RayMARSTrainer as MarsTaskRunner.run does, on the real verl with nothing
    stubbed; datasets are RLHFDataset-like rows, ray and the worker groups are not
    started (verl's init_workers is replaced by one that sets the agent-loop manager)."""
    return textwrap.dedent("""
        import json, os, sys
        from types import SimpleNamespace
        import numpy as np, torch
        sys.path.insert(0, "tests")
        from test_integration_verl import _FakeAgentLoopManager, _img, _score
        from hydra import compose, initialize_config_dir
        from verl import DataProto
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer, Role
        from verl.utils.dataset.rl_dataset import collate_fn
        import mars.integrations.verl.plugin  # noqa: F401
        from mars.integrations.verl.rollout import MonoAnchorRollout
        from mars.integrations.verl.trainer import RayMARSTrainer

        PROMPTS = [
            [{"role": "user", "content": [_img("rgb0.png"), _img("ir0.png"), {"type": "text", "text": "Where?"}]}],
            [{"role": "user", "content": "text only"}],
            [{"role": "user", "content": [_img("v0.png"), {"type": "text", "text": "and"}, _img("v1.png"),
                                          _img("v2.png")]}],
            [{"role": "user", "content": [_img("only.png"), {"type": "text", "text": "?"}]}],
        ]

        class Rows(torch.utils.data.Dataset):   # the RLHFDataset fields fit reads
            def __len__(self):
                return len(PROMPTS)
            def __getitem__(self, i):
                return {"raw_prompt": PROMPTS[i], "dummy_tensor": torch.zeros(1, dtype=torch.uint8),
                        "data_source": "d", "reward_model": {"ground_truth": "g"},
                        "extra_info": {"index": i}, "agent_name": "single_turn_agent",
                        "multi_modal_inputs": {}}

        MANAGER = {"with_scores": True}
        def parent_init_workers(self):          # verl's: starts ray workers, sets the manager
            self.async_rollout_manager = _FakeAgentLoopManager(8, _score, **MANAGER)
        RayPPOTrainer.init_workers = parent_init_workers

        def build(overrides):
            cfg_dir = os.path.join(os.getcwd(), "mars", "integrations", "verl", "config")
            with initialize_config_dir(config_dir=cfg_dir, version_base=None):
                cfg = compose("mars_trainer", overrides=["trainer.device=cpu"] + overrides)
            t = RayMARSTrainer(config=cfg, tokenizer=None, role_worker_mapping={Role.ActorRollout: object},
                               resource_pool_manager=SimpleNamespace(get_n_gpus=lambda: 1),
                               train_dataset=Rows(), val_dataset=Rows(), collate_fn=collate_fn)
            t.init_workers()
            return t
    """) + textwrap.dedent(overrides)


def test_recipe_trainer_imports_and_builds_on_real_verl():
    """The recipe's trainer module imports with the installed verl and its undeclared
    imports (the verl extra), and RayMARSTrainer builds from the recipe's config: a
    RayPPOTrainer with the mars options, verl's dataloaders, and after init_workers the
    anchor rollout wrapped around verl's manager with the config's worker count."""
    r = _run(_recipe_trainer_code("""
        import importlib.util
        t = build(["actor_rollout_ref.rollout.agent.num_workers=3", "data.train_batch_size=2",
                   "mars.mono_mode=single", "mars.min_sources=2"])
        roll = t.async_rollout_manager
        print(json.dumps({
            "stubbed": [m for m in ("cachetools", "fastapi", "uvicorn")
                        if not getattr(sys.modules.get(m), "__file__", None)],
            "issub": isinstance(t, RayPPOTrainer), "opts": t.mars_opts, "steps": t.total_training_steps,
            "epochs": t.config.trainer.total_epochs,
            "estimator": t.config.algorithm.adv_estimator,
            "loss": t.config.actor_rollout_ref.actor.policy_loss.loss_mode,
            "wrapped": isinstance(roll, MonoAnchorRollout), "inner": type(roll._manager).__name__,
            "workers": roll.num_workers, "mode": roll.mono_mode, "min": roll.min_sources,
            "hooks": [m for m in ("init_workers", "_compute_reward_colocate", "_update_actor")
                      if m in RayMARSTrainer.__dict__]}))
    """), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["stubbed"] == [], "verl's trainer imports must come from real packages"
    assert res["issub"] and res["estimator"] == "mars" and res["loss"] == "mars"
    assert res["opts"] == {"anchors": True, "mono_mode": "single", "min_sources": 2}
    assert res["steps"] == 2 * res["epochs"]        # verl's dataloader: 4 rows, batches of 2
    assert res["wrapped"] and res["inner"] == "_FakeAgentLoopManager"
    assert (res["workers"], res["mode"], res["min"]) == (3, "single", 2)
    assert res["hooks"] == ["init_workers", "_compute_reward_colocate", "_update_actor"]


def test_recipe_metrics_logged_in_every_reward_mode_through_verls_fit():
    """verl 0.9.1's own RayPPOTrainer.fit, two steps, on RayMARSTrainer: rewards scored in
    the agent loop or by a colocated reward model (which fit calls after _balance_batch),
    trainer.balance_batch true and false. Every step logs the mars/* metrics, the same in
    every mode, with the anchors' count and rewards of the step's prompts. Stand-ins: the
    agent-loop manager, the worker calls (old log-probs, the actor update's worker call
    under the recipe's _update_actor) and the colocated reward model."""
    r = _run(_recipe_trainer_code("""
        from verl.utils import tracking
        from mars.integrations.verl.batch import count_sources, mono_messages

        logged = []
        tracking.Tracking.log = lambda self, data, step, backend=None: logged.append(dict(data))
        def parent_update_actor(self, batch):   # verl's: the worker update's reduced metrics
            return DataProto.from_single_dict(data={}, meta_info={"metrics": {"actor/pg_loss": [0.5, 0.25]}})
        RayPPOTrainer._update_actor = parent_update_actor

        res = {}
        for colocated in (False, True):
            for balance in (True, False):
                MANAGER["with_scores"] = not colocated
                t = build(["actor_rollout_ref.rollout.agent.num_workers=8", "actor_rollout_ref.rollout.n=3",
                           "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.train_batch_size=2",
                           "trainer.total_epochs=1", "trainer.logger=[console]", "trainer.val_before_train=false",
                           "trainer.test_freq=-1", "trainer.save_freq=-1",
                           f"trainer.balance_batch={str(balance).lower()}"])
                t.actor_rollout_wg, t.use_reference_policy, t.use_critic = None, False, False
                t._get_dp_size = lambda wg, role: 2
                t._load_checkpoint = lambda: None
                t.checkpoint_manager = SimpleNamespace(update_weights=lambda step: None,
                                                       sleep_replicas=lambda: None)
                def old_log_prob(batch):
                    z = torch.zeros_like(batch.batch["response_mask"], dtype=torch.float32)
                    return DataProto.from_dict(tensors={"old_log_probs": z, "entropys": z}), 0.0
                t._compute_old_log_prob = old_log_prob
                seen = []
                if colocated:
                    t.use_rm = True
                    def compute_rm_score(data):   # per step: the sampled rows, then the mono rows
                        greedy = len(seen) % 2 == 1
                        seen.append(len(data))
                        rm = torch.zeros(len(data), 4)
                        last = data.batch["response_mask"].sum(-1) - 1
                        rm[torch.arange(len(data)), last] = torch.tensor(
                            [_score(m, greedy) for m in data.non_tensor_batch["raw_prompt"]])
                        return DataProto.from_dict(tensors={"rm_scores": rm})
                    t.reward_loop_manager = SimpleNamespace(compute_rm_score=compute_rm_score)
                logged.clear()
                t.fit()
                res[f"colocated={colocated},balance={balance}"] = {
                    "steps": [{k: float(v) for k, v in d.items() if k.startswith("mars/")} for d in logged],
                    "actor": [d.get("actor/pg_loss") for d in logged], "rm_calls": len(seen)}
        # what the anchors of all prompts add up to (one epoch sees each prompt once)
        want = {"n": 0, "sum": 0.0, "prompts": 0}
        for p in PROMPTS:
            k = count_sources(p)
            want["n"] += k
            want["prompts"] += k > 0
            want["sum"] += sum(_score(mono_messages(p, j), True) for j in range(k))
        print(json.dumps({"res": res, "want": want}))
    """), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    res, want = out["res"], out["want"]
    assert len(res) == 4
    keys = {"mars/anchor_rollouts", "mars/anchored_prompts", "mars/pad_rollouts",
            "mars/anchor_reward/mean", "mars/gain/mean"}
    first = None
    for mode, got in res.items():
        assert len(got["steps"]) == 2, mode
        for step in got["steps"]:
            assert set(step) == keys, (mode, step)
        assert got["actor"] == [0.375, 0.375], mode     # the worker's metrics still reduced as before
        n = sum(s["mars/anchor_rollouts"] for s in got["steps"])
        total = sum(s["mars/anchor_reward/mean"] * s["mars/anchor_rollouts"] for s in got["steps"])
        assert n == want["n"] and sum(s["mars/anchored_prompts"] for s in got["steps"]) == want["prompts"]
        assert total == pytest.approx(want["sum"], rel=1e-6), mode
        if mode.startswith("colocated=True"):
            assert got["rm_calls"] == 4, "two steps: the sampled rows, then the pending mono rows"
        first = first or got["steps"]
        assert got["steps"] == first, f"{mode}: the metrics must not depend on the reward mode"


# transfer_queue (TransferQueue) is what verl's v1 trainers run on; verl does not declare
# it and the recipe (legacy trainer) never imports it. verl/trainer/ppo/v1/__init__.py
# imports it, so where it is absent a stand-in lets the package import: the function
# tested here does not touch it.
_TRANSFER_QUEUE_STAND_IN = """
import importlib.util, sys, types
if importlib.util.find_spec("transfer_queue") is None:
    _m = types.ModuleType("transfer_queue"); _m.__path__ = []
    def _stand_in(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {})
    _m.__getattr__ = _stand_in
    sys.modules["transfer_queue"] = _m
"""


def test_multi_output_sessions_get_grpos_grouping():
    """verl's own compute_advantage_for_multi_trajectories (v1 trainers, agent sessions of
    several outputs keyed {uid}_{session}_{index}): adv_estimator=mars gives GRPO's numbers
    without anchors (a session counts once, by its final output; all its outputs get that
    advantage; an empty final response gives 0) and, with anchors, the pooled MARS numbers
    of the final outputs."""
    r = _run(_TRANSFER_QUEUE_STAND_IN + textwrap.dedent("""
        import json
        import numpy as np, torch
        from omegaconf import OmegaConf
        from verl import DataProto
        from verl.trainer.ppo.core_algos import AdvantageEstimator
        from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
        import mars, mars.integrations.verl.plugin  # noqa: F401

        keys = ["a_0_0", "a_0_1", "a_1_0", "a_2_1", "a_2_0", "a_2_2", "b_0_0", "b_1_0", "b_1_1", "c_0_0"]
        uids = np.array([k.split("_")[0] for k in keys], dtype=object)
        final = {"a_0": 1.0, "a_1": 0.0, "a_2": 3.0, "b_0": 2.0, "b_1": 0.5, "c_0": 1.5}
        rm, mask = torch.zeros(len(keys), 4), torch.ones(len(keys), 4)
        for i, k in enumerate(keys):   # intermediate outputs carry other rewards than the final one
            rm[i, -1] = final[k.rsplit("_", 1)[0]] if k in ("a_0_1", "a_1_0", "a_2_2", "b_0_0", "b_1_1",
                                                             "c_0_0") else 7.0 + i
        mask[2] = 0                   # a_1's only output: empty response
        mask[6, :2] = 0
        cfg = OmegaConf.create({"norm_adv_by_std_in_grpo": True})

        def run(est, baselines=None):
            d = DataProto.from_dict(tensors={"token_level_rewards": rm.clone(), "response_mask": mask.clone(),
                                             **({"reward_baselines": baselines} if baselines is not None else {})},
                                    non_tensors={"uid": uids.copy()})
            return compute_advantage_for_multi_trajectories(d, batch_keys=keys, adv_estimator=est,
                                                            num_repeat=3, config=cfg).batch["advantages"]
        grpo = run(AdvantageEstimator.GRPO)
        ours = run("mars")
        anchors = {"a": [0.5, 2.0], "b": [1.0, float("nan")], "c": [float("nan"), float("nan")]}
        rb = torch.tensor([anchors[u] for u in uids])
        anchored = run("mars", rb)
        # expected with anchors: the final outputs' pooled advantages, spread over sessions
        fin = {}
        for i, k in enumerate(keys):
            s, idx = k.rsplit("_", 1)
            if s not in fin or fin[s][0] < int(idx):
                fin[s] = (int(idx), i)
        rows = [i for _, i in fin.values()]
        a_lab = [u for u in ("a", "b") for v in anchors[u] if v == v]
        a_val = [v for u in ("a", "b") for v in anchors[u] if v == v]
        adv = mars.mono_anchored_advantage(rm[rows].sum(-1), uids[rows], torch.tensor(a_val),
                                           np.array(a_lab, dtype=object), singleton="raw")
        lone = torch.tensor([u == "c" for u in uids[rows]])
        adv = torch.where(lone, rm[rows].sum(-1) / (1 + 1e-6), adv)
        adv = adv * mask[rows].bool().any(-1)
        by_session = {s: adv[j] for j, s in enumerate(fin)}
        want = torch.stack([by_session[k.rsplit("_", 1)[0]] for k in keys])[:, None] * mask
        print(json.dumps({"grpo_err": float((grpo - ours).abs().max()),
                          "anchored_err": float((anchored - want).abs().max()),
                          "anchors_matter": float((anchored - ours).abs().max()),
                          "grpo_col": (grpo.sum(-1) / mask.sum(-1).clamp(min=1)).tolist()}))
    """), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["grpo_err"] < 1e-6, res
    assert res["anchored_err"] < 1e-6 and res["anchors_matter"] > 0.1, res
    # a session's outputs share one advantage: a_2's three rows, b_1's two
    col = res["grpo_col"]
    assert col[3] == col[4] == col[5] and col[7] == col[8] and col[2] == 0.0


# ---------------------------------------------------------------------------- recipe config

def test_recipe_config_composes_on_verls_and_refuses_v1():
    from hydra import compose, initialize_config_dir

    import mars.integrations.verl.main as recipe
    import mars.rewards.verl_compat as compat

    cfg_dir = os.path.join(ROOT, "mars", "integrations", "verl", "config")
    with initialize_config_dir(config_dir=cfg_dir, version_base=None):
        cfg = compose("mars_trainer", overrides=["actor_rollout_ref.rollout.n=14"])
        v1 = compose("mars_trainer", overrides=["trainer.use_v1=true"])
    assert cfg.algorithm.adv_estimator == "mars"
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "mars"
    assert cfg.trainer.use_v1 is False and cfg.actor_rollout_ref.rollout.n == 14
    assert cfg.actor_rollout_ref.actor.clip_ratio_c == 3.0          # verl's defaults underneath
    assert cfg.reward.custom_reward_function.path is None
    recipe.apply_mars_defaults(cfg)
    assert cfg.reward.custom_reward_function.path == os.path.abspath(compat.__file__)
    assert cfg.reward.custom_reward_function.name == "compute_score"
    with pytest.raises(ValueError, match="use_v1"):
        recipe.main(v1)            # hydra.main passes a given config straight through
    from mars.integrations.verl.options import mars_options
    assert mars_options(cfg) == {"anchors": True, "mono_mode": "duplicate", "min_sources": 1}
    with pytest.raises(ValueError, match="unknown mars option 'anchor'"):
        mars_options({"mars": {"anchor": False}})
    with pytest.raises(ValueError, match="mono_mode"):
        mars_options({"mars": {"mono_mode": "all"}})
