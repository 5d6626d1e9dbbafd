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
