"""mars train: RL steps of the tiny model end to end through the command line (plain and
fused loss, Qwen2-VL and Qwen2.5-VL, GRPO / DAPO recipes), anchors matched by prompt id
(shuffled batches, prompts with different numbers of sources), dynamic sampling on the
pooled std, a failing reward that does not stop the run, gradient accumulation equal to
the whole batch, and the checkpoint that `mars eval` loads."""

import json
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from mars.cli import main as mars_main  # noqa: E402
from mars.rewards import RewardBreakdown, register_reward  # noqa: E402
from mars.rollout import Completion, GenerationRequest, RolloutEngine  # noqa: E402
from mars.train.config import load_config  # noqa: E402
from mars.train.advantages import (collect_batch, compute_advantages, informative_groups,  # noqa: E402
                                   score_rollouts)
from mars.train.rollouts import PromptSource, Rollout  # noqa: E402
from mars.train.timer import PhaseTimer  # noqa: E402
from mars.train.update import accumulate_gradients  # noqa: E402

FAST = ["max_steps=1", "warmup.steps=2", "warmup.batch_size=4", "task.eval_per_category=1", "rollout.n=3",
        "optim.prompts_per_step=2", "rollout.max_new_tokens=12", "log.progress=false", "optim.micro_batch_size=4",
        "optim.mini_batches=2"]
REQUIRED = ["step", "loss", "reward_multi", "reward_mono", "gain", "pooled_std", "adv_mean", "adv_std",
            "clip_frac_high", "clip_frac_low", "approx_kl", "response_length", "time_generate", "time_reward",
            "time_advantage", "time_old_logp", "time_update", "time_step", "tokens_per_s", "reward_errors"]


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("extra", [
    [],
    ["loss.fused=true", "model.tiny.arch=qwen2_5_vl", "loss.kl_coef=0.01", "rollout.mono=single",
     "loss.agg=seq-mean-token-sum-norm", "optim.micro_batch_size=2"],
])
def test_one_rl_step_end_to_end(tmp_path, capsys, extra):
    out = tmp_path / "run"
    assert mars_main(["train", f"output_dir={out}", *FAST, *extra]) == 0
    printed = capsys.readouterr().out
    assert "multi reward: step 1" in printed and f"checkpoint: {out}/checkpoints/step_000001" in printed
    recs = _records(out)
    step = [r for r in recs if r["step"] == 1][0]
    assert all(k in step for k in REQUIRED), [k for k in REQUIRED if k not in step]
    assert step["rollouts"] == 6 and step["anchors"] == 4 and step["optimizer_steps"] == 2
    assert step["gain"] is not None and step["eval_acc_multi"] is not None
    assert step["rollout_logp_diff"] < 1e-4  # the engine's log-probs are the trainer's
    if "loss.kl_coef=0.01" in extra:
        assert step["ref_kl"] >= 0
    cfg = load_config(str(out / "config.yaml"))
    assert cfg.max_steps == 1 and cfg.output_dir == str(out)
    ckpt = out / "checkpoints" / "step_000001"
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "trainer_state.json"} <= set(os.listdir(ckpt))
    assert (out / "metrics.png").stat().st_size > 0
    # the checkpoint is what `mars eval --model` loads
    rc = mars_main(["eval", "--model", str(ckpt), "--data", str(out / "heldout" / "heldout.json"), "--mono",
                    "--limit", "2", "--max-new-tokens", "12", "--no-progress", "--output", str(tmp_path / "ev")])
    assert rc == 0, capsys.readouterr()


def test_dapo_recipe_step(tmp_path):
    out = tmp_path / "dapo"
    assert mars_main(["train", f"output_dir={out}", *FAST, "max_steps=2", "algorithm.dynamic_sampling=true",
                      "algorithm.max_gen_batches=2", "algorithm.overlong_buffer=4", "loss.clip_high=0.28",
                      "loss.dual_clip=10", "optim.warmup_steps=2", "optim.mini_batches=1", "eval.every=0",
                      "data.eval=null", "save_every=1"]) == 0
    recs = [r for r in _records(out) if r["step"] >= 1]
    assert len(recs) == 2 and all(1 <= r["gen_batches"] <= 2 and r["groups_kept"] <= 2 for r in recs)
    assert all(r["groups_drawn"] == 2 * r["gen_batches"] for r in recs)
    assert recs[0]["lr"] == pytest.approx(load_config(None).optim.lr)  # warm-up: 1/2, then 2/2 after 1 step
    assert os.path.isdir(out / "checkpoints" / "step_000001") and os.path.isdir(out / "checkpoints" / "step_000002")


# --------------------------------------------------------------------------- anchors by prompt id
def _rows(spec, seed=0):
    """spec: {group: (multi rewards, anchor rewards)} -> Rollouts (no model needed)."""
    rows = []
    for g, (rs, ms) in spec.items():
        rows += [Rollout(g, f"{g}/r{j}", None, None, Completion([1], "x"), reward=r) for j, r in enumerate(rs)]
        rows += [Rollout(g, f"{g}/mono{k}", None, None, Completion([1], "x"), anchor=True, source=k, reward=m)
                 for k, m in enumerate(ms)]
    random.Random(seed).shuffle(rows)
    return rows


def _expected(spec, row):
    """docs/advantage.md's formula in float64: pool the group's rollouts and anchors."""
    rs, ms = spec[row.group]
    pool = torch.tensor(list(rs) + list(ms), dtype=torch.float64)
    mu = pool.mean()
    sigma = pool.std(unbiased=True) if pool.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return float((row.reward - mu) / (sigma + 1e-6)) if pool.numel() > 1 else 0.0


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]),
                       st.tuples(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=1, max_size=5),
                                 st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5]), min_size=0, max_size=4)),
                       min_size=1, max_size=5),
       st.integers(0, 10 ** 6))
def test_anchors_reach_their_prompt_by_id(spec, seed):
    cfg = load_config(None)
    rows = _rows(spec, seed)  # shuffled: rollouts and anchors of groups interleaved at random
    out, labels = compute_advantages(rows, cfg)
    trained = [r for r in rows if not r.anchor]
    for r, a in zip(trained, out.advantages.tolist()):
        assert a == pytest.approx(_expected(spec, r), abs=1e-5)
    for g, gain in zip(labels, out.gain.tolist()):
        rs, ms = spec[g]
        if ms:
            assert gain == pytest.approx(sum(rs) / len(rs) - sum(ms) / len(ms), abs=1e-6)


def test_anchor_mismatch_by_position_would_differ():
    # two prompts with 2 and 3 sources: matching anchors by position gives other numbers
    spec = {"p0": ([1.0, 1.0, 1.0], [0.0, 0.0]), "p1": ([0.0, 1.0], [1.0, 1.0, 1.0])}
    rows = _rows(spec, 3)
    out, _ = compute_advantages(rows, load_config(None))
    got = {r.uid: a for r, a in zip([r for r in rows if not r.anchor], out.advantages.tolist())}
    assert got["p0/r0"] == pytest.approx(_expected(spec, next(r for r in rows if r.uid == "p0/r0")), abs=1e-5)
    assert got["p0/r0"] > 0.5  # all right, both anchors wrong: +sign(gain), GRPO would give 0
    assert got["p1/r1"] == pytest.approx(_expected(spec, next(r for r in rows if r.uid == "p1/r1")), abs=1e-5)


# --------------------------------------------------------------------------- dynamic sampling
def test_dynamic_sampling_keeps_agreeing_group_with_other_anchors():
    spec = {"agree_vs_anchors": ([1.5] * 4, [0.5, 0.5]),   # multi std 0, pooled std > 0: kept
            "all_equal": ([1.5] * 4, [1.5, 1.5]),          # pooled std 0: dropped
            "no_anchor_equal": ([0.5] * 4, []),            # GRPO group with equal rewards: dropped
            "mixed": ([0.5, 1.5, 1.5, 0.5], [1.5])}        # kept
    out, labels = compute_advantages(_rows(spec), load_config(None))
    assert informative_groups(out, labels) == {"agree_vs_anchors", "mixed"}


class ScriptedEngine(RolloutEngine):
    """Answers by sample: multi rollouts say `answer[group sample id]`, anchors say the truth."""

    def __init__(self, multi_answer):
        self.multi_answer, self.calls = multi_answer, []

    def generate_ids(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            s = r.sample
            ans = s.ground_truth if s.variant != "multi" else self.multi_answer(s)
            text = f"<think> look </think> <answer> {ans} </answer>"
            out.append([Completion([5, 6, 7], text, None, "stop") for _ in range(r.config.n)])
        return out


class _Enc:
    pad_token_id = 0

    def encode(self, sample):
        return None


def _len_one(p):
    return 1


def test_dynamic_sampling_resamples_and_keeps_anchors(tmp_path, monkeypatch):
    import mars.train.advantages as advantages
    from mars.train import task as embedded

    monkeypatch.setattr(advantages, "encode_prompts", lambda enc, drawn, cfg: ([(g, s, None) for g, s in drawn], 0))
    cfg = load_config(None, ["algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=3",
                             "optim.prompts_per_step=4", "rollout.n=3"])
    prompts = PromptSource(cfg, embedded.EmbeddedTask(cfg.task.mix, seed=0))
    # every multi rollout answers "yes": groups whose truth is "yes" agree with the anchors
    # only when both anchors are right (always, here): pooled std 0 -> dropped; "no" scenes
    # have multi all wrong and anchors right: pooled std > 0 -> kept, with their anchors
    engine = ScriptedEngine(lambda s: "yes")
    timer = PhaseTimer()
    batch, adv, stats, info = collect_batch(engine, _Enc(), prompts, cfg, timer, str(tmp_path / "e.jsonl"), 1)
    kept = {r.group for r in batch}
    assert info["groups_kept"] == len(kept) <= 4 and info["gen_batches"] >= 1
    assert all(r.sample.ground_truth == "no" for r in batch if not r.anchor)
    for g in kept:
        assert sum(r.anchor for r in batch if r.group == g) == 2  # anchors kept with their group
    assert len(engine.calls) == info["gen_batches"]  # one generate call per generation batch
    assert (adv < 0).all()  # all wrong, anchors right: every rollout pushed down
    assert "time_generate" in timer.as_metrics() and "time_reward" in timer.as_metrics()


# --------------------------------------------------------------------------- failing rewards
_CALLS = {"n": 0}


@register_reward("test_train_flaky", overwrite=True)
def _flaky(completion, ground_truth):
    _CALLS["n"] += 1
    if _CALLS["n"] % 3 == 0:
        raise RuntimeError("reward server down")
    if _CALLS["n"] % 3 == 1:
        return float("nan")
    return RewardBreakdown(0.5, 1.0)


def test_raising_reward_run_goes_on(tmp_path):
    out = tmp_path / "flaky"
    assert mars_main(["train", f"output_dir={out}", *FAST, "reward.name=test_train_flaky", "data.eval=null"]) == 0
    step = [r for r in _records(out) if r["step"] == 1][0]
    errors = [json.loads(line) for line in open(out / "reward_errors.jsonl")]
    assert step["reward_errors"] == len(errors) >= 6  # 2 of every 3 calls fail (NaN or raise)
    assert {e["step"] for e in errors} == {1}
    assert all(e["reward"] == "test_train_flaky" for e in errors)
    assert any("RuntimeError: reward server down" in e["error"] for e in errors)
    assert any("non-finite" in e["error"] for e in errors)
    assert all(("/r" in e["sample_id"] or "/mono" in e["sample_id"]) and e["sample_id"].startswith("p")
               for e in errors)


def test_score_rollouts_overlong_shaping():
    cfg = load_config(None, ["rollout.max_new_tokens=10", "algorithm.overlong_buffer=4"])
    from mars.data import Sample

    s = Sample("x", [], [], "yes", "vqa")
    text = "<think> a </think> <answer> yes </answer>"
    rows = [Rollout("g", f"g/r{L}", s, None, Completion([1] * L, text)) for L in (5, 6, 8, 10)]
    score_rollouts(rows, cfg)
    assert [r.reward for r in rows] == pytest.approx([1.5, 1.5, 1.5 - 0.5, 1.5 - 1.0])


# --------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("agg, fused", [("token-mean", False), ("seq-mean-token-mean", True),
                                        ("seq-mean-token-sum-norm", False)])
def test_micro_batches_accumulate_to_the_whole_batch(agg, fused):
    from mars.train.policy import build_policy
    from mars.rollout.encode import PromptEncoder
    from mars.train import task as embedded

    cfg = load_config(None, [f"loss.agg={agg}", f"loss.fused={str(fused).lower()}", "loss.kl_coef=0.1"])
    policy = build_policy(cfg, torch.device("cpu"))
    enc = PromptEncoder(tokenizer=policy.tokenizer, image_processor=policy.image_processor)
    t = embedded.EmbeddedTask(cfg.task.mix)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(5):
        s = t.sample(i)
        L = int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(8, len(policy.tokenizer), (L,), generator=g).tolist()
        rows.append(Rollout(f"p{i}", f"p{i}/r0", s, enc.encode(s), Completion(ids, "")))
    adv = torch.randn(5, generator=g)
    old = [torch.randn(len(r.completion.token_ids), generator=g) * 0.1 - 3 for r in rows]
    ref = [o + 0.05 for o in old]

    def grads(mb):
        c = load_config(None, [f"loss.agg={agg}", f"loss.fused={str(fused).lower()}", "loss.kl_coef=0.1",
                               f"optim.micro_batch_size={mb}"])
        policy.model.zero_grad(set_to_none=True)
        loss, metrics = accumulate_gradients(policy.model, rows, adv, old, ref, c, enc.pad_token_id, "cpu")
        return loss, metrics, [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]

    whole, parts = grads(5), grads(2)
    assert parts[0] == pytest.approx(whole[0], rel=1e-5, abs=1e-6)
    assert parts[1]["num_tokens"] == whole[1]["num_tokens"] == sum(len(r.completion.token_ids) for r in rows)
    assert len(whole[2]) == len(parts[2]) > 0
    for a, b in zip(whole[2], parts[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- --compare
def test_compare_pairs_methods_on_the_same_seeds(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert mars_main(["train", "--compare", f"output_dir={out}", *FAST, "max_steps=2", "compare.seeds=[0, 1]",
                      "log.plot_every=0", "eval.every=1", "log.samples_every=1"]) == 0
    printed = capsys.readouterr().out
    assert "Paired differences" in printed and "95% CI (t)" in printed and "GRPO+MARS vs GRPO" in printed
    assert "DAPO+MARS vs DAPO" in printed
    summary = json.load(open(out / "compare.json"))
    assert set(summary["methods"]) == {"grpo", "grpo_mars", "dapo", "dapo_mars"}
    for m in summary["methods"].values():
        assert m["seeds"] == [0, 1] and len(m["final_eval_per_seed"]["eval_acc_multi"]) == 2
        assert len(m["area_per_seed"]) == 2 and m["frac_zero_signal"] is not None
    for key in ("grpo_mars_vs_grpo", "dapo_mars_vs_dapo"):
        p = summary["pairs"][key]
        assert p["seeds"] == [0, 1] and p["final_acc"]["n"] == 2 and len(p["final_acc"]["ci_t"]) == 2
    # the difference is computed from the per-seed numbers of the runs written to disk
    finals = {m: [json.load(open(out / f"{m}_seed{s}" / "summary.json"))["final_eval"]["eval_acc_multi"]
                  for s in (0, 1)] for m in ("grpo", "grpo_mars")}
    want = sum(a - b for a, b in zip(finals["grpo_mars"], finals["grpo"])) / 2
    assert summary["pairs"]["grpo_mars_vs_grpo"]["final_acc"]["mean"] == pytest.approx(want, abs=1e-12)
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.md").exists()
    cfgs = {m: load_config(str(out / f"{m}_seed0" / "config.yaml")) for m in summary["methods"]}
    assert cfgs["grpo"].rollout.mono == "none" and cfgs["grpo_mars"].rollout.mono == "duplicate"
    assert cfgs["dapo"].algorithm.dynamic_sampling and cfgs["dapo_mars"].algorithm.dynamic_sampling
    assert cfgs["dapo"].loss.clip_high == cfgs["dapo_mars"].loss.clip_high == 0.28
    assert not cfgs["grpo"].algorithm.dynamic_sampling
    grpo, mars_ = _records(out / "grpo_seed0"), _records(out / "grpo_mars_seed0")
    assert all(r["anchors"] == 0 for r in grpo if r["step"] >= 1)
    assert all(r["anchors"] == 4 for r in mars_ if r["step"] >= 1)
    assert mars_[0]["warmup_time_s"] < grpo[0]["warmup_time_s"]  # the seed's warm start is shared
    assert grpo[0]["eval_acc_multi"] == mars_[0]["eval_acc_multi"]  # so both start from the same weights
    ids = [[json.loads(line)["id"] for line in open(out / m / "samples.jsonl")] for m in ("grpo_seed0", "grpo_mars_seed0")]
    assert [i for i in ids[1] if "/mono" not in i] == ids[0]  # and see the same prompts


def test_compare_workers_give_the_same_numbers(tmp_path, capsys):
    args = [*FAST, "max_steps=2", "compare.seeds=[0, 1]", "log.plot_every=0", "compare.methods=[grpo, grpo_mars]"]
    assert mars_main(["train", "--compare", f"output_dir={tmp_path / 'one'}", *args, "compare.workers=1"]) == 0
    assert mars_main(["train", "--compare", f"output_dir={tmp_path / 'two'}", *args, "compare.workers=2"]) == 0
    a, b = (json.load(open(tmp_path / d / "compare.json")) for d in ("one", "two"))
    assert set(a["methods"]) == {"grpo", "grpo_mars"} and a["pairs"].keys() == {"grpo_mars_vs_grpo"}
    for m in a["methods"]:
        assert a["methods"][m]["final_eval_per_seed"] == b["methods"][m]["final_eval_per_seed"]
    assert a["pairs"]["grpo_mars_vs_grpo"]["final_acc"] == b["pairs"]["grpo_mars_vs_grpo"]["final_acc"]
    # the report written again from the run directories alone has the same numbers
    from mars.train.compare import load_runs, write_report

    cfg = load_config(str(tmp_path / "one" / "config.yaml"))
    again = write_report(cfg, load_runs(cfg, str(tmp_path / "one")), str(tmp_path / "one")).summary
    assert again["pairs"] == a["pairs"] and again["methods"].keys() == a["methods"].keys()
    for m in a["methods"]:
        assert again["methods"][m]["final_eval_per_seed"] == a["methods"][m]["final_eval_per_seed"]
        assert again["methods"][m]["area_per_seed"] == a["methods"][m]["area_per_seed"]


@pytest.mark.parametrize("bad, msg", [("compare.methods=[grpo, ppo]", "compare.methods"),
                                      ("compare.workers=-1", "compare.workers"),
                                      ("compare.seeds=[1, 1]", "compare.seeds"),
                                      ("compare.target=1.5", "compare.target")])
def test_compare_settings_are_checked(bad, msg):
    from mars.train.config import ConfigError

    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        load_config(None, [bad])


# --------------------------------------------------------------------------- the embedded task
def test_embedded_task_scenes(tmp_path):
    import numpy as np

    from mars.data import load_eval_json
    from mars.train.task import CATEGORIES, EmbeddedTask, source_answer, write_eval_file

    t = EmbeddedTask({c: 1.0 for c in CATEGORIES}, seed=3)
    a, b = t.sample(7), EmbeddedTask({c: 1.0 for c in CATEGORIES}, seed=3).sample(7)
    assert a.extra_info == b.extra_info and (np.asarray(a.images[0]) == np.asarray(b.images[0])).all()
    for c, (time, obj, answer) in CATEGORIES.items():
        s = t.sample(0, "x", category=c)
        rgb, ir = (np.asarray(im, dtype=float) / 255 for im in s.images)
        assert s.ground_truth == answer and s.num_images == 2 and s.task == "vqa"
        assert (rgb.mean() < 0.1) == (time == "night")  # RGB sees nothing at night
        assert (ir.max() > 0.7) == (obj is not None)  # a hot blob for a person and for a heater
        assert np.allclose(ir[..., 0], ir[..., 1])  # infrared is grey
        if time == "day" and obj is not None:
            red = (rgb[..., 0] > 0.7).mean() > 0.05
            assert red == (obj == "person")
        assert source_answer(c, 1) == ("yes" if obj else "no")
        one = t.single_source(s, 0)
        assert one.num_images == 1 and one.ground_truth == source_answer(c, 0) and "rgb" in one.question
    # RGB alone misleads at night, infrared alone on heaters
    assert source_answer("night_person", 0) == "no" and source_answer("day_heater", 1) == "yes"
    held = t.balanced(2, "eval")
    path = write_eval_file(held, str(tmp_path / "h"))
    loaded = load_eval_json(path)
    assert [s.ground_truth for s in loaded] == [s.ground_truth for s in held]
    assert [s.id for s in loaded] == [s.id for s in held] and loaded[0].num_images == 2
    with pytest.raises(ValueError, match="unknown categories"):
        EmbeddedTask({"dusk": 1.0})


def test_one_step_on_the_published_formats(tmp_path):
    """data.train: the training parquet; data.eval: an evaluation JSON (mars.data)."""
    data = os.path.join(os.path.dirname(__file__), "data")
    out = tmp_path / "files"
    assert mars_main(["train", f"output_dir={out}", *FAST, f"data.train={data}/train.parquet",
                      f"data.eval={data}/spatialqa_eval.json", "rollout.max_new_tokens=8"]) == 0
    step = [r for r in _records(out) if r["step"] == 1][0]
    assert step["rollouts"] == 6 and step["anchors"] >= 4 and step["reward_errors"] == 0
    assert step["eval_acc_multi"] is not None and not (out / "heldout").exists()


def _tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries MARS_TEST_TAG=tag (Linux /proc)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if f"MARS_TEST_TAG={tag}".encode() in f.read().split(b"\0"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")
def test_compare_workers_stop_on_sigterm(tmp_path):
    """SIGTERM to `mars train --compare` with workers: every worker finishes its step, writes a
    checkpoint and exits; the command exits 143; no worker is left running."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = f"cmp-{os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, MARS_TEST_TAG=tag, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "cmp"
    args = [*FAST, "max_steps=200", "compare.seeds=[0, 1, 2]", "compare.workers=2", "log.plot_every=0",
            "compare.methods=[grpo_mars]", "eval.every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "mars", "train", "--compare", f"output_dir={out}", *args],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = [out / f"grpo_mars_seed{s}" / "metrics.jsonl" for s in (0, 1)]
    deadline = time.time() + 180
    while time.time() < deadline and not all(m.exists() and len(m.read_text().splitlines()) > 2 for m in metrics):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err and "--compare starts over" in err
    time.sleep(1.0)
    assert _tagged_processes(tag) == []
    for s in (0, 1):  # both running seeds stopped cleanly, each with a checkpoint of a finished step
        assert any(d.startswith("step_") for d in os.listdir(out / f"grpo_mars_seed{s}" / "checkpoints"))
    # the third seed was cancelled, or (already queued to a worker) stopped as soon as it started
    assert not (out / "grpo_mars_seed2" / "summary.json").exists()


# --------------------------------------------------------------------------- an earlier run is never lost
def _tree(path):
    return {str(p.relative_to(path)): (p.stat().st_size if p.is_file() else None) for p in path.rglob("*")}


def test_a_fresh_run_never_replaces_an_earlier_one_by_accident(tmp_path, capsys):
    out = tmp_path / "run"
    assert mars_main(["train", f"output_dir={out}", *FAST]) == 0
    capsys.readouterr()
    done = _tree(out)
    assert "checkpoints/step_000001/trainer_state.json" in done
    # without --overwrite: refused before anything is written, naming both ways out
    assert mars_main(["train", f"output_dir={out}", *FAST, "seed=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mars train: error: output_dir:") and "holds checkpoints of an earlier run" in err
    assert f"mars train --resume {out}" in err and "--overwrite" in err and "Traceback" not in err
    assert _tree(out) == done and "seed: 0" in (out / "config.yaml").read_text()
    # --overwrite with an input that fails to load: the earlier run is still whole
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user", "content": [{"type": "image", "image": "missing.png"}, '
                   '{"type": "text", "text": "is there a person ?"}], "ground_truth": "yes"}]')
    assert mars_main(["train", f"output_dir={out}", *FAST, f"data.train={bad}", "data.eval=null", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mars train: error: ") and "missing.png" in err and "Traceback" not in err
    assert _tree(out) == done
    # --overwrite with good inputs: replaced, and said so
    assert mars_main(["train", f"output_dir={out}", *FAST, "seed=3", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: removed 1 checkpoint(s) of an earlier run" in err
    assert "seed: 3" in (out / "config.yaml").read_text()
    assert mars_main(["train", "--resume", str(out), "--overwrite"]) == 2  # --resume keeps checkpoints
    assert "no --overwrite" in capsys.readouterr().err


def test_output_dir_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert mars_main(["train", f"output_dir={f}", *FAST]) == 2
    assert "output_dir: " in capsys.readouterr().err and f.read_text() == "x"
    assert mars_main(["train", f"output_dir={f}/below", *FAST]) == 2  # under a file: cannot be created
    assert "cannot be created" in capsys.readouterr().err


def test_divergence_crosses_compare_workers():
    import pickle

    from mars.train.config import load_config
    from mars.train.faults import Diverged

    exc = pickle.loads(pickle.dumps(Diverged(3, "grad_norm", float("nan"), load_config(None, []))))
    assert isinstance(exc, Diverged) and exc.step == 3 and "RL step 3: grad_norm = nan" in str(exc)


def test_compare_refuses_an_earlier_compare_without_overwrite(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["train", "--compare", f"output_dir={out}", *FAST, "compare.seeds=[0]", "compare.methods=[grpo]",
            "log.plot_every=0"]
    assert mars_main(args) == 0
    capsys.readouterr()
    before = _tree(out)
    assert mars_main(args) == 2
    err = capsys.readouterr().err
    assert "holds runs of an earlier --compare (grpo_seed0)" in err and "--overwrite" in err
    assert _tree(out) == before
    assert mars_main([*args, "--overwrite"]) == 0


def test_unreadable_model_path_is_one_line(tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert mars_main(["train", f"output_dir={tmp_path / 'run'}", *FAST, f"model.path={empty}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mars train: error: model.path: cannot load") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written
