"""mars.rollout: the HF backend on a tiny local Qwen2-VL (prompt with the right number
of image tokens, batching, loading from a directory) and the vLLM adapter against a
stand-in object that follows vLLM's documented ``LLM.generate`` API."""

import os
import sys
from types import SimpleNamespace

import pytest

from mars.data import load_eval_json
from mars.rollout import HFEngine, RolloutEngine, SamplingConfig, VLLMEngine, build_engine
from mars.rollout.prompts import qwen_chat_prompt

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)

pytest.importorskip("transformers")
from tiny_vlm import build_tiny_vlm, save_tiny_vlm  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_vlm()


@pytest.fixture(scope="module")
def samples():
    return load_eval_json(os.path.join(DATA, "spatialqa_eval.json")) + load_eval_json(os.path.join(DATA, "nuscenes_eval.json"))


def test_sampling_config_checks():
    with pytest.raises(ValueError, match="n > 1 needs temperature > 0"):
        SamplingConfig(n=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_qwen_prompt_layout(samples):
    s = samples[0]
    text = qwen_chat_prompt(s.messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Here")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert qwen_chat_prompt(s.mono(1, "single").messages, system=None).count("<|image_pad|>") == 1


def test_hf_image_tokens_match_grid(tiny, samples):
    model, tok, improc = tiny
    engine = HFEngine(model, tokenizer=tok, image_processor=improc)
    for s in (samples[0], samples[3], samples[3].mono(2, "single")):
        enc = engine._encode([s])
        n_pad = int((enc["input_ids"] == model.config.image_token_id).sum())
        assert n_pad == int(enc["image_grid_thw"].prod(-1).sum()) // improc.merge_size ** 2
        assert enc["image_grid_thw"].shape[0] == s.num_images


def test_hf_generate_batched_equals_single(tiny, samples):
    model, tok, improc = tiny
    cfg = SamplingConfig(max_new_tokens=5)
    one = HFEngine(model, tokenizer=tok, image_processor=improc, batch_size=1).generate(samples, cfg)
    many = HFEngine(model, tokenizer=tok, image_processor=improc, batch_size=3).generate(samples, cfg)
    assert len(one) == len(samples) and all(len(o) == 1 and isinstance(o[0], str) for o in one)
    assert one == many
    sampled = HFEngine(model, tokenizer=tok, image_processor=improc).generate(
        samples[:1], SamplingConfig(max_new_tokens=3, temperature=1.0, n=3, seed=0))
    assert len(sampled) == 1 and len(sampled[0]) == 3


def test_hf_from_pretrained_directory(tmp_path, samples, tiny):
    save_tiny_vlm(tmp_path / "tiny")
    engine = build_engine(str(tmp_path / "tiny"), backend="hf", device="cpu")
    assert isinstance(engine, HFEngine)
    ref = HFEngine(tiny[0], tokenizer=tiny[1], image_processor=tiny[2])
    cfg = SamplingConfig(max_new_tokens=4)
    assert engine.generate(samples[:2], cfg) == ref.generate(samples[:2], cfg)


def test_hf_engine_needs_processor():
    with pytest.raises(ValueError, match="needs a processor"):
        HFEngine(object())


class FakeSamplingParams:
    """Stand-in for vllm.SamplingParams: records its keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Stand-in for vllm.LLM: generate(prompts, sampling_params=, use_tqdm=) -> RequestOutputs."""

    def __init__(self, tokenizer=None):
        self.requests, self.params, self._tok = [], None, tokenizer

    def get_tokenizer(self):
        return self._tok

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.requests.extend(prompts)
        self.params = sampling_params
        n = sampling_params.kwargs["n"]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f"out{i}.{j}") for j in range(n)])
                for i, _ in enumerate(prompts)]


def test_vllm_adapter_requests(samples):
    llm = FakeLLM()
    engine = VLLMEngine(llm, sampling_params_cls=FakeSamplingParams)
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(samples, SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, n=2, seed=3))
    assert out == [[f"out{i}.0", f"out{i}.1"] for i in range(len(samples))]
    assert llm.params.kwargs == {"n": 2, "temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "seed": 3}
    for req, s in zip(llm.requests, samples):
        assert set(req) == {"prompt", "multi_modal_data"}
        images = req["multi_modal_data"]["image"]
        assert len(images) == s.num_images and all(im.mode == "RGB" for im in images)
        assert req["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == s.num_images
        assert req["prompt"].endswith("<|im_start|>assistant\n")


def test_vllm_adapter_uses_chat_template_and_prompt_fn(samples):
    class Tok:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return f"TEMPLATE {sum(p['type'] == 'image' for m in messages for p in m['content'])}"

    llm = FakeLLM(Tok())
    VLLMEngine(llm, sampling_params_cls=FakeSamplingParams).generate([samples[0].mono(0, "single")])
    assert llm.requests[0]["prompt"] == "TEMPLATE 1"
    llm = FakeLLM(Tok())
    VLLMEngine(llm, sampling_params_cls=FakeSamplingParams, prompt_fn=lambda m: "P").generate(samples[:1])
    assert llm.requests[0]["prompt"] == "P"


def test_build_engine_choices():
    fake = VLLMEngine(FakeLLM(), sampling_params_cls=FakeSamplingParams)
    assert build_engine(fake) is fake
    with pytest.raises(ValueError, match="backend must be one of"):
        build_engine("x", backend="tgi")
    with pytest.raises(TypeError, match="HFEngine"):
        build_engine(object())
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"mars\[vllm\]"):
            build_engine("x", backend="vllm")


# --------------------------------------------------------------------------- token ids for training
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mars.rollout import Completion, GenerationRequest  # noqa: E402
from mars.rollout.hf import RowSampler, _top_p_filter  # noqa: E402


def _recompute_logprobs(model, engine, sample, ids):
    import torch

    p = engine.encoder.encode(sample)
    full = torch.cat([p.input_ids, torch.tensor(ids, dtype=torch.long)])[None]
    mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(ids), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=mm,
                       pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits
    P = len(p)
    return logits[0, P - 1:-1].float().log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


def test_generate_ids_one_call_mixed_greedy_and_sampled(tiny, samples):
    import torch

    model, tok, improc = tiny
    engine = HFEngine(model, tokenizer=tok, image_processor=improc)
    calls = []
    orig = model.generate

    def counting(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return orig(*a, **kw)

    model.generate = counting
    try:
        s = samples[3]  # 6 images (nuScenes)
        sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, n=4)
        greedy = SamplingConfig(max_new_tokens=6)
        reqs = [GenerationRequest(s, sampled)] + [GenerationRequest(v, greedy) for v in s.mono_variants("single")]
        torch.manual_seed(0)
        out = engine.generate_ids(reqs)
    finally:
        model.generate = orig
    assert calls == [4 + 6]  # one model.generate for the G rollouts and the 6 anchors
    assert [len(o) for o in out] == [4] + [1] * 6
    alone = engine.generate_ids([GenerationRequest(v, greedy) for v in s.mono_variants("single")])
    for o, a in zip(out[1:], alone):  # greedy rows are greedy inside a sampled batch
        assert o[0].token_ids == a[0].token_ids
    banned = set(engine.banned_token_ids)
    assert banned and len(banned) == 4
    for o, req in zip(out, reqs):
        for c in o:
            assert isinstance(c, Completion) and 1 <= len(c.token_ids) <= 6
            assert not banned & set(c.token_ids)  # no sampled <|image_pad|> / <|vision_start|>
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert c.finish_reason == ("stop" if c.token_ids[-1] == tok.eos_token_id else "length")
            assert len(c.logprobs) == len(c.token_ids)
            ref = _recompute_logprobs(model, engine, req.sample, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-5, rtol=1e-5)


def test_generate_ids_max_batch_rows_and_text_api(tiny, samples):
    model, tok, improc = tiny
    cfg = SamplingConfig(max_new_tokens=4)
    a = HFEngine(model, tokenizer=tok, image_processor=improc).generate_ids([GenerationRequest(s, cfg) for s in samples])
    b = HFEngine(model, tokenizer=tok, image_processor=improc, max_batch_rows=2).generate_ids(
        [GenerationRequest(s, cfg) for s in samples])
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]
    texts = HFEngine(model, tokenizer=tok, image_processor=improc).generate(samples, cfg)
    assert texts == [[x[0].text] for x in a]
    with pytest.raises(TypeError, match="GenerationRequest"):
        HFEngine(model, tokenizer=tok, image_processor=improc).generate_ids([samples[0]])
    with pytest.raises(ValueError, match="max_batch_rows"):
        HFEngine(model, tokenizer=tok, image_processor=improc, max_batch_rows=0)


def test_mm_token_type_ids_reach_the_model(tiny, samples):
    model, tok, improc = tiny
    engine = HFEngine(model, tokenizer=tok, image_processor=improc)
    enc = engine._encode(samples[:2])
    assert "mm_token_type_ids" in enc  # else transformers silently uses 1-D positions
    assert (enc["mm_token_type_ids"] == (enc["input_ids"] == model.config.image_token_id)).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(0.05, 1.0))
def test_top_p_filter_keeps_the_nucleus(logits, top_p):
    import torch

    x = torch.tensor([logits], dtype=torch.float32)
    kept = torch.isfinite(_top_p_filter(x, torch.tensor([top_p])))[0]
    probs = x.softmax(-1)[0]
    mass = float(probs[kept].sum())
    assert kept.any()
    assert mass >= top_p - 1e-5  # the nucleus reaches top_p ...
    assert mass - float(probs[kept].min()) < top_p + 1e-5  # ... and is the smallest that does
    if (~kept).any():  # no dropped token is more likely than a kept one
        assert float(probs[~kept].max()) <= float(probs[kept].min()) + 1e-7


def test_row_sampler_greedy_rows_and_logprobs():
    import torch

    s = RowSampler(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.5]), banned=[1])
    scores = torch.tensor([[0.0, 9.0, 1.0, 2.0], [3.0, 0.0, 2.0, 1.0]])
    out = s(torch.zeros(2, 3, dtype=torch.long), scores)
    assert torch.isinf(out[0]).sum() == 3 and out[0, 3] == 0  # greedy: argmax of the allowed tokens
    assert torch.isinf(out[1, 1])  # banned in every row
    new = torch.tensor([[3], [0]])
    lp = s.logprobs(new)
    expect = torch.stack([scores[0].log_softmax(-1)[3], (scores[1] / 2).log_softmax(-1)[0]])
    torch.testing.assert_close(lp[:, 0], expect)  # before the ban and top-p, at the row's temperature


def test_engine_subclass_must_generate_something():
    with pytest.raises(TypeError, match="must implement generate_ids"):
        class Nothing(RolloutEngine):
            pass


# VLLMEngine.generate_ids (token prompts, one generate call, weight pushes): tests/test_rollout_vllm.py
