"""The colocated vLLM engine (mars.rollout.vllm) against a strict stand-in for vLLM 0.31.0.

vLLM cannot run here (no GPU), so ``StandInLLM`` follows vLLM 0.31.0's documented offline
API (vllm/entrypoints/llm.py, sampling_params.py, outputs.py, logprobs.py, inputs/llm.py,
v1/engine/llm_engine.py) and generates with a real tiny Qwen-VL loaded from the directory
it is given, as vLLM does:

* ``generate`` takes ``{"prompt_token_ids": [...], "multi_modal_data": {"image": [...]}}``
  with exactly ONE ``<|image_pad|>`` per image (pre-expanded ids are rejected), expands
  each with its own image processor (honouring ``mm_processor_kwargs``), and a
  ``SamplingParams`` or a list with one per prompt; it returns RequestOutput-shaped
  objects (expanded ``prompt_token_ids``; ``outputs[j].token_ids``, ``.logprobs`` as a list
  of ``{token_id: Logprob}``, ``.finish_reason``) with processed log-probs (after
  logit_bias, temperature and top-p);
* ``SamplingParams`` has the real field names and the real greedy rule (n must be 1);
* the vision "encoder cache" and the prefix cache remember the weight version: a
  generate that would reuse outputs of old weights raises instead of silently using them;
* ``sleep(level)`` needs ``enable_sleep_mode``; level 2 discards the weights (NaN here);
  ``load_weights`` into sleeping weights raises; ``generate`` while asleep raises;
* the model inside holds vLLM's parameter names (``language_model.model.*``, ``visual.*``,
  q/k/v and gate/up fused) and maps HF names with vLLM's own table; an unknown name or a
  wrong shape raises; ``llm_engine.model_executor`` only exists with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``.
"""

import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from mars.data import load_eval_json
from mars.rollout import (Completion, GenerationRequest, HFEngine, RolloutOutOfMemoryError, SamplingConfig,
                          VLLMEngine, build_rollout_engine)
from mars.rollout.hf import load_processor
from mars.rollout.vllm import MULTIPROCESSING_ENV, collapse_image_pads, hf_weight_name, vllm_weight_name

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)
from tiny_vlm import build_tiny_vlm  # noqa: E402

torch.set_num_threads(1)


# =============================================================================== the stand-in
# The fields of vllm 0.31.0's SamplingParams struct (vllm/sampling_params.py L285-446).
SAMPLING_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "watermarking", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "prompt_logprob_token_ids", "prompt_logprob_start", "logprob_token_ids", "flat_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "stream_interval", "skip_clone", "structured_outputs", "logit_bias", "allowed_token_ids",
    "extra_args", "bad_words", "skip_reading_prefix_cache", "thinking_token_budget", "repetition_detection",
    "routed_experts_prompt_start", "trace_decode_token_ids",
}
SAMPLING_DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop_token_ids=None,
                         max_tokens=16, logprobs=None, detokenize=True, skip_special_tokens=True, logit_bias=None)
# vllm.LLM's named parameters plus the EngineArgs the colocated engine passes through **kwargs.
LLM_KWARGS = {
    "tokenizer", "trust_remote_code", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization",
    "enforce_eager", "mm_processor_kwargs", "hf_overrides", "kv_cache_memory_bytes", "max_model_len",
    "enable_sleep_mode", "limit_mm_per_prompt", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
    "logprobs_mode", "distributed_executor_backend",
}
# Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper (vllm 0.31.0 qwen2_5_vl.py L1313-1321), written
# out here independently of mars.rollout.vllm.
MAPPER = [("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
          ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model.")]
STACKED = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
           (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1)]
SAMPLING_EPS = 1e-5


class StandInSamplingParams:
    """vllm.SamplingParams: keyword arguments with the real names only, the real greedy rule."""

    def __init__(self, **kwargs):
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
        for k, v in {**SAMPLING_DEFAULTS, **kwargs}.items():
            setattr(self, k, v)
        self.sent = dict(kwargs)
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < -1):
            raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.logit_bias is not None and not all(isinstance(k, int) for k in self.logit_bias):
            raise ValueError("logit_bias keys must be token ids")
        if self.temperature < SAMPLING_EPS:
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclass
class Logprob:  # vllm/logprobs.py
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm/outputs.py
    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:  # vllm/outputs.py (the fields read here)
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = True


class StandInModel:
    """The vLLM-side model: vLLM parameter names over the HF module's tensors;
    ``load_weights`` maps HF names as vLLM's Qwen-VL mapper and fused loaders do."""

    def __init__(self, hf_model):
        self.hf = hf_model
        self.unfused = {}  # vLLM name before fusion -> (fused vLLM name, shard, HF parameter)
        for name, p in hf_model.named_parameters():
            v = self._map(name)
            fused, shard = v, None
            if v.startswith("language_model.model.layers."):
                for src, dst, sh in STACKED:
                    if src in v:
                        fused, shard = v.replace(src, dst), sh
                        break
            self.unfused[v] = (fused, shard, p)
        self.shards = {}
        for fused, shard, _ in self.unfused.values():
            self.shards.setdefault(fused, set()).add(shard)
        self.pushed = []  # (HF name, shape) of every weight received
        self.reloading = False  # inside initialize / finalize_layerwise_reload

    @staticmethod
    def _map(name):
        for src, dst in MAPPER:
            if name.startswith(src):
                return dst + name[len(src):]
        return name

    def named_parameters(self):
        for fused in self.shards:
            parts = [p for f, _, p in self.unfused.values() if f == fused]
            yield fused, torch.cat([p.detach().reshape(-1) for p in parts])

    def load_weights(self, weights):
        if self.reloading is not True:  # real vLLM: the kernels' repacked (empty) parameters refuse it
            raise AssertionError("load_weights outside initialize_layerwise_reload: Attempted to load weight "
                                 "into parameter (torch.Size([0]))")
        loaded, got = set(), {}
        with torch.no_grad():
            for name, tensor in weights:
                v = self._map(name)
                if v not in self.unfused:
                    raise ValueError(f"There is no module or parameter named '{v}' in StandInModel")
                fused, shard, p = self.unfused[v]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(p.shape)}")
                p.copy_(tensor)
                self.pushed.append((name, tuple(tensor.shape)))
                got.setdefault(fused, set()).add(shard)
        for fused, shards in got.items():
            if shards == self.shards[fused]:  # a fused parameter counts once all its shards arrived
                loaded.add(fused)
        return loaded


def _initialize_layerwise_reload(model):
    if model.reloading is not None:
        raise RuntimeError("initialize_layerwise_reload twice")
    model.reloading = True


def _finalize_layerwise_reload(model, model_config):
    if model.reloading is not True:
        raise RuntimeError("finalize_layerwise_reload without initialize_layerwise_reload")
    model.reloading = False


# vllm 0.31.0's vllm/model_executor/model_loader/reload/__init__.py (the names the push imports)
LAYERWISE = SimpleNamespace(initialize_layerwise_reload=_initialize_layerwise_reload,
                            finalize_layerwise_reload=_finalize_layerwise_reload)


@dataclass
class StandInPlatform:
    """vllm.platforms.current_platform: the fields the colocated engine asks."""

    device_name: str = "cuda"
    sleep_mode: bool = True
    attention_head_sizes: tuple = ()

    def is_sleep_mode_available(self):
        return self.sleep_mode

    def is_cpu(self):
        return self.device_name == "cpu"


class StandInLLM:
    """vllm.LLM (see the module docstring). ``calls``: every API call in order."""

    created = []
    platform = StandInPlatform()

    def __init__(self, model, **kwargs):
        unknown = set(kwargs) - LLM_KWARGS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        if not isinstance(model, str):
            raise TypeError(f"LLM(model=) takes a path or hub name, got {type(model).__name__}")
        from transformers import AutoModelForImageTextToText

        self.kwargs = kwargs
        self.path = model
        self.calls = []
        self.hf = AutoModelForImageTextToText.from_pretrained(model).eval()
        processor, tok, improc = load_processor(model)
        if processor is not None:  # with torchvision installed: a full processor
            tok, improc = processor.tokenizer, processor.image_processor
        self.tokenizer = tok
        mm = kwargs.get("mm_processor_kwargs") or {}
        self.image_processor = type(improc).from_pretrained(model, **mm) if mm else improc
        self.model = StandInModel(self.hf)
        self.enable_sleep_mode = kwargs.get("enable_sleep_mode", False)
        self.limit = (kwargs.get("limit_mm_per_prompt") or {}).get("image", 999)
        self.seed = kwargs.get("seed", 0)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.logprobs_mode = kwargs.get("logprobs_mode", "raw_logprobs")  # vLLM's default
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode {self.logprobs_mode!r} not emulated")
        self.asleep = set()  # the allocations asleep: "weights", "kv_cache"
        self.offloaded = None
        self.version = 0  # bumped by every load_weights
        self.encoder_cache = {}  # image key -> weight version of its vision outputs
        self.prefix_cache = {}  # prompt key -> weight version of its KV blocks
        engine = SimpleNamespace(reset_encoder_cache=self._reset_encoder_cache,
                                 engine_core=SimpleNamespace(shutdown=lambda: self.calls.append(("shutdown",))))
        if os.environ.get(MULTIPROCESSING_ENV, "1") == "0":
            engine.model_executor = SimpleNamespace()  # exists in-process only (vllm llm_engine.py)
        self.llm_engine = engine
        self.pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        eos = self.hf.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [self.tokenizer.eos_token_id])
        StandInLLM.created.append(self)

    # ---- API
    def get_tokenizer(self):
        return self.tokenizer

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        """Runs ``method(worker, *args, **kwargs)`` on the one in-process worker, whose
        ``model_runner.get_model()`` is the model; the layerwise reload functions it
        imports are the stand-in's (``layerwise_module``), which check their order."""
        self.calls.append(("collective_rpc",))
        if not callable(method):
            raise TypeError("the stand-in runs callables only")
        if not hasattr(self.llm_engine, "model_executor"):
            raise RuntimeError("collective_rpc would pickle the weights to the engine process")
        if "weights" in self.asleep:
            raise RuntimeError("load into sleeping (unmapped) weights")
        worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: self.model,
                                                              model_config=SimpleNamespace(model=self.path)))
        before = [p.clone() for p in self.hf.parameters()]
        self.model.reloading = None
        out = method(worker, *args, **(kwargs or {}))
        if self.model.reloading is not False:
            raise RuntimeError("load_weights was not wrapped in initialize / finalize_layerwise_reload")
        if any(not torch.equal(a, b) for a, b in zip(before, self.hf.parameters())):
            self.version += 1
        return [out]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))
        self.prefix_cache.clear()
        return True

    def reset_mm_cache(self):
        self.calls.append(("reset_mm_cache",))

    def _reset_encoder_cache(self):
        self.calls.append(("reset_encoder_cache",))
        self.encoder_cache.clear()

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))
        if not self.enable_sleep_mode:
            raise RuntimeError("Sleep mode is not enabled (LLM(enable_sleep_mode=True))")
        if level not in (0, 1, 2):
            raise ValueError(f"bad sleep level {level}")
        self.asleep = {"weights", "kv_cache"}
        self.prefix_cache.clear()
        with torch.no_grad():
            if level == 1:
                self.offloaded = [p.clone() for p in self.hf.parameters()]
            for p in self.hf.parameters():  # the GPU copy is gone either way
                p.fill_(float("nan"))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))
        if tags is not None and not set(tags) <= {"weights", "kv_cache", "scheduling"}:
            raise ValueError(f"bad wake_up tags {tags}")
        tags = {"weights", "kv_cache"} if tags is None else set(tags)
        if "weights" in tags and "weights" in self.asleep and self.offloaded is not None:
            with torch.no_grad():
                for p, q in zip(self.hf.parameters(), self.offloaded):
                    p.copy_(q)
            self.offloaded = None
        self.asleep -= tags

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None,
                 tokenization_kwargs=None, mm_processor_kwargs=None):
        self.calls.append(("generate", len(prompts)))
        if self.asleep:
            raise RuntimeError(f"generate while asleep ({sorted(self.asleep)}): the scheduler is paused")
        if isinstance(prompts, (dict, str)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not all(isinstance(p, StandInSamplingParams) for p in params):
            raise TypeError("sampling_params must be SamplingParams")
        self.last = (list(prompts), list(params))
        self.last_outputs = [self._one(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        return list(self.last_outputs)

    # ---- internals
    def _one(self, i, prompt, sp):
        if not isinstance(prompt, dict):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}")
        allowed = {"prompt_token_ids", "prompt", "multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids",
                   "cache_salt"}
        if set(prompt) - allowed:
            raise ValueError(f"prompt {i}: unknown keys {sorted(set(prompt) - allowed)}")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(type(t) is int for t in ids):
                raise TypeError(f"prompt {i}: prompt_token_ids must be a list of ints")
        else:
            ids = self.tokenizer(prompt["prompt"], add_special_tokens=False)["input_ids"]
        images = (prompt.get("multi_modal_data") or {}).get("image", [])
        images = [images] if not isinstance(images, list) else images
        if len(images) > self.limit:
            raise ValueError(f"prompt {i}: {len(images)} images > limit_mm_per_prompt {self.limit}")
        runs = collapse_image_pads(ids, self.pad)[1]
        if any(r > 1 for r in runs):
            raise ValueError(f"prompt {i}: pre-expanded <|image_pad|> runs {runs}: they would be expanded again")
        if len(runs) != len(images):
            raise ValueError(f"prompt {i}: {len(runs)} <|image_pad|> for {len(images)} images")
        pv = grid = None
        full = []
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            pv, grid = vis["pixel_values"], vis["image_grid_thw"]
            merge = self.image_processor.merge_size
            k = 0
            for t in ids:
                if t == self.pad:
                    full += [self.pad] * (int(grid[k].prod()) // merge ** 2)
                    k += 1
                else:
                    full.append(t)
            for im in images:  # the encoder cache: keyed by image content
                key = hash(im.tobytes())
                if self.encoder_cache.get(key, self.version) != self.version:
                    raise RuntimeError("stale encoder cache: vision outputs of old weights reused")
                self.encoder_cache[key] = self.version
        else:
            full = list(ids)
        pkey = tuple(full)
        if self.prefix_cache.get(pkey, self.version) != self.version:
            raise RuntimeError("stale prefix cache: KV blocks of old weights reused")
        self.prefix_cache[pkey] = self.version
        # vLLM: a request with a seed has its own generator, the others share the engine's
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else self.rng
        outs = [self._sample(full, pv, grid, sp, gen, j) for j in range(sp.n)]
        return RequestOutput(str(i), prompt.get("prompt"), full, outs)

    def _sample(self, full, pv, grid, sp, gen, j):
        stop = self.eos | set(sp.stop_token_ids or [])
        ids, lps, finish = [], [], "length"
        greedy = sp.temperature < SAMPLING_EPS
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                x = torch.tensor([full + ids])
                mm = torch.tensor([[1 if t == self.pad else 0 for t in full] + [0] * len(ids)])
                logits = self.hf(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=mm,
                                 pixel_values=pv, image_grid_thw=grid).logits[0, -1].float()
                if not torch.isfinite(logits).all():
                    raise RuntimeError("non-finite logits: the weights are garbage (discarded by sleep level 2?)")
                raw = logits.log_softmax(-1)  # raw_logprobs: before logit bias, temperature and top-p
                if sp.logit_bias:
                    for t, b in sp.logit_bias.items():
                        logits[t] += b
                if greedy:
                    lp = logits.log_softmax(-1)
                    tok = int(lp.argmax())
                else:
                    scaled = logits / sp.temperature
                    if sp.top_p < 1:
                        srt, idx = scaled.sort(descending=True)
                        probs = srt.softmax(-1)
                        drop = (probs.cumsum(-1) - probs) >= sp.top_p
                        scaled = scaled.clone()
                        scaled[idx[drop]] = float("-inf")
                    lp = scaled.log_softmax(-1)  # processed_logprobs: after temperature and top-p
                    tok = int(torch.multinomial(lp.exp(), 1, generator=gen))
                ids.append(tok)
                lps.append(float((raw if self.logprobs_mode == "raw_logprobs" else lp)[tok]))
                if tok in stop:
                    finish = "stop"
                    break
        logprobs = None if sp.logprobs is None else [{t: Logprob(v, 1)} for t, v in zip(ids, lps)]
        text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
        return CompletionOutput(j, text, ids, sum(lps), logprobs, finish, None)


# =============================================================================== fixtures
@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv(MULTIPROCESSING_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "vllm.model_executor.model_loader.reload", LAYERWISE)
    StandInLLM.created.clear()


@pytest.fixture(scope="module")
def samples():
    return load_eval_json(os.path.join(DATA, "spatialqa_eval.json")) + \
        load_eval_json(os.path.join(DATA, "nuscenes_eval.json"))


def tiny(arch="qwen2_vl"):
    if arch == "qwen2_vl":
        return build_tiny_vlm()
    from mars.train.tiny import build_tiny
    from tiny_vlm import WORDS

    return build_tiny(WORDS, arch=arch, image_size=56)


def colocated(model, tok, improc, **kw):
    kw.setdefault("enable_sleep_mode", True)
    return VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=StandInLLM,
                                sampling_params_cls=StandInSamplingParams, **kw)


def mixed_requests(encoder, s, n=3, max_new=5, temperature=1.0, top_p=0.9):
    """The trainer's step for one prompt: G sampled rollouts (with the trainer's encoded,
    image-expanded prompt) and one greedy anchor per source (no encoded prompt)."""
    sampled = SamplingConfig(max_new_tokens=max_new, temperature=temperature, top_p=top_p, n=n)
    greedy = SamplingConfig(max_new_tokens=max_new)
    return [GenerationRequest(s, sampled, encoder.encode(s))] + \
        [GenerationRequest(v, greedy) for v in s.mono_variants("duplicate")]


# =============================================================================== tests
def test_one_generate_call_with_token_prompts(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc)
    llm = engine.llm
    s = samples[3]  # 6 images
    reqs = mixed_requests(engine.encoder, s)
    out = engine.generate_ids(reqs)
    assert [c for c in llm.calls if c[0] == "generate"] == [("generate", 7)]  # one call: rollouts + anchors
    prompts, params = llm.last
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    hf_ids = engine.encoder.encode(s).input_ids.tolist()
    # the rollout prompt is the trainer's ids with each image's pad run cut to one token
    assert prompts[0]["prompt_token_ids"] == collapse_image_pads(hf_ids, pad)[0] != hf_ids
    for p, r in zip(prompts, reqs):
        assert set(p) == {"prompt_token_ids", "multi_modal_data"}
        assert p["prompt_token_ids"].count(pad) == len(p["multi_modal_data"]["image"]) == r.sample.num_images
        assert p["multi_modal_data"]["image"] == list(r.sample.images)
    vision = vision_ids(tok)
    assert params[0].sent == {"n": 3, "temperature": 1.0, "top_p": 0.9, "max_tokens": 5, "seed": None,
                              "logprobs": 0, "logit_bias": {i: -100.0 for i in vision},
                              "stop_token_ids": [tok.eos_token_id]}
    assert all(p.n == 1 and p.temperature == 0.0 and p.logprobs == 0 for p in params[1:])
    assert [len(o) for o in out] == [3] + [1] * 6
    for o, ro in zip(out, [o.outputs for o in llm.last_outputs]):
        for c, ref in zip(o, ro):
            assert isinstance(c, Completion)
            assert c.token_ids == ref.token_ids and c.text == ref.text and c.finish_reason == ref.finish_reason
            assert c.logprobs == [d[t].logprob for d, t in zip(ref.logprobs, ref.token_ids)]
            assert not set(vision) & set(c.token_ids)


def ref_logprobs(model, encoder, sample, ids, temperature=1.0, banned=()):
    """The policy's log-probs of ``ids`` after ``sample``'s prompt at ``temperature``, over
    the vocabulary without ``banned``."""
    p = encoder.encode(sample)
    ids = torch.tensor(ids)
    full = torch.cat([p.input_ids, ids])[None]
    mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(ids), dtype=torch.long)])[None]
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=mm,
                       pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw).logits[0, len(p) - 1:-1]
    logits = logits.float() / temperature
    if banned:
        logits[:, list(banned)] = float("-inf")
    return logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]


def vision_ids(tok):
    return sorted(tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>"))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_greedy_and_logprobs_match_hf_engine(samples, arch):
    model, tok, improc = tiny(arch)
    engine = colocated(model, tok, improc)
    hf = HFEngine(model, tokenizer=tok, image_processor=improc)
    greedy = SamplingConfig(max_new_tokens=6)
    jobs = samples + samples[3].mono_variants("single")
    reqs = [GenerationRequest(s, greedy, hf.encoder.encode(s) if k % 2 else None) for k, s in enumerate(jobs)]
    a, b = engine.generate_ids(reqs), hf.generate_ids(reqs)
    banned = vision_ids(tok)
    for x, y, s in zip(a, b, jobs):  # the same greedy tokens as the HF engine from the same weights
        assert x[0].token_ids == y[0].token_ids and x[0].finish_reason == y[0].finish_reason
        # processed log-probs: of the distribution sampled from (vision tokens banned), temperature 1
        torch.testing.assert_close(torch.tensor(x[0].logprobs),
                                   ref_logprobs(model, hf.encoder, s, x[0].token_ids, 1.0, banned), atol=1e-5, rtol=1e-5)
    # sampled, top_p 1: the processed log-probs are the policy's at the temperature
    s = samples[0]
    cfg = SamplingConfig(max_new_tokens=5, temperature=0.7, n=2, seed=1)
    for c in engine.generate_ids([GenerationRequest(s, cfg, hf.encoder.encode(s))])[0]:
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_logprobs(model, hf.encoder, s, c.token_ids, 0.7, banned),
                                   atol=1e-4, rtol=1e-4)


def test_raw_logprobs_mode_gives_the_trainers_logprobs_at_temperature_1(samples):
    """logprobs_mode="raw_logprobs" (before logit bias, temperature and top-p): at
    temperature 1 exactly the full-vocabulary log-probs the trainer computes."""
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc, logprobs_mode="raw_logprobs")
    assert engine.llm.kwargs["logprobs_mode"] == "raw_logprobs"
    s = samples[3]
    out = engine.generate_ids(mixed_requests(engine.encoder, s, n=2, temperature=1.0, top_p=0.9))
    for c in out[0]:
        torch.testing.assert_close(torch.tensor(c.logprobs), ref_logprobs(model, engine.encoder, s, c.token_ids),
                                   atol=1e-5, rtol=1e-5)
    v = s.mono_variants("duplicate")[0]
    torch.testing.assert_close(torch.tensor(out[1][0].logprobs), ref_logprobs(model, engine.encoder, v, out[1][0].token_ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,level", [("qwen2_vl", 1), ("qwen2_5_vl", 1), ("qwen2_5_vl", 2)])
def test_update_weights_sleep_push_wake_reset(samples, arch, level):
    model, tok, improc = tiny(arch)
    engine = colocated(model, tok, improc, sleep_level=level)
    llm = engine.llm
    greedy = SamplingConfig(max_new_tokens=6)
    reqs = [GenerationRequest(s, greedy) for s in samples[:4]]
    engine.generate_ids(reqs)  # fills the encoder / prefix caches with the old weights' outputs
    with torch.no_grad():  # an "optimizer step"
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    llm.calls.clear()
    engine.sleep()
    engine.update_weights(model)
    assert llm.calls == [("sleep", level), ("wake_up", ("weights",)), ("collective_rpc",), ("wake_up", ("kv_cache",)),
                         ("reset_prefix_cache",), ("reset_mm_cache",), ("reset_encoder_cache",)]
    assert [n for n, _ in llm.model.pushed] == [n for n, _ in model.named_parameters()]
    assert [s for _, s in llm.model.pushed] == [tuple(p.shape) for p in model.parameters()]
    for (n, p), q in zip(model.named_parameters(), llm.hf.parameters()):
        assert torch.equal(p, q), n
    a = engine.generate_ids(reqs)  # the same images again: no stale vision outputs
    b = HFEngine(model, tokenizer=tok, image_processor=improc).generate_ids(reqs)
    assert [x[0].token_ids for x in a] == [y[0].token_ids for y in b]
    assert engine.weight_version == 1  # vLLM loaded the copy colocated() wrote: no push at creation
    assert engine.asleep is None


def test_stand_in_catches_a_missing_cache_reset(samples):
    """Pushing weights without the resets makes the stand-in raise on a repeated image:
    what the engine's reset_caches prevents."""
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc)
    reqs = [GenerationRequest(samples[0], SamplingConfig(max_new_tokens=2))]
    engine.generate_ids(reqs)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    engine.reset_caches = lambda: None  # a push that forgets the caches
    engine.update_weights(model)
    with pytest.raises(RuntimeError, match="stale encoder cache"):
        engine.generate_ids(reqs)


def test_sleep_level_2_generate_repushes_weights(samples):
    model, tok, improc = tiny("qwen2_5_vl")
    engine = colocated(model, tok, improc, sleep_level=2)
    reqs = [GenerationRequest(s, SamplingConfig(max_new_tokens=4)) for s in samples[:2]]
    before = engine.generate_ids(reqs)
    engine.sleep()
    assert torch.isnan(next(engine.llm.hf.parameters())).all()  # level 2 discarded them
    after = engine.generate_ids(reqs)  # wakes up with the model's weights pushed again
    assert [x[0].token_ids for x in after] == [x[0].token_ids for x in before]
    engine.sleep()
    engine.model = None
    with pytest.raises(RuntimeError, match="level 2"):
        engine.generate_ids(reqs)
    # without sleep mode, sleep() is a no-op and the LLM is never asked to sleep
    plain = colocated(model, tok, improc, enable_sleep_mode=False)
    plain.sleep()
    assert not any(c[0] == "sleep" for c in plain.llm.calls)
    assert plain.llm.kwargs["enable_sleep_mode"] is False


def test_colocated_arguments_checkpoint_and_env(samples, tmp_path):
    model, tok, improc = tiny()
    policy = SimpleNamespace(model=model, tokenizer=tok, processor=None, image_processor=improc)
    engine = build_rollout_engine("vllm", policy, max_batch_rows=12, gpu_memory_utilization=0.25,
                                  max_model_len=512, limit_mm_per_prompt=6, seed=3, llm_cls=StandInLLM,
                                  sampling_params_cls=StandInSamplingParams)
    llm = engine.llm
    assert llm.kwargs == {"gpu_memory_utilization": 0.25, "enable_sleep_mode": True, "limit_mm_per_prompt": {"image": 6},
                          "seed": 3, "dtype": "float32", "enforce_eager": False, "logprobs_mode": "processed_logprobs",
                          "max_model_len": 512, "max_num_seqs": 12}
    assert os.environ[MULTIPROCESSING_ENV] == "0"
    ckpt = llm.path
    assert os.path.isfile(os.path.join(ckpt, "config.json")) and os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
    engine.close()
    assert not os.path.exists(ckpt)
    # a model loaded from a directory: vLLM loads that directory, the object's weights are pushed
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    improc.save_pretrained(tmp_path)
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    with torch.no_grad():
        next(loaded.parameters()).mul_(2)
    e2 = colocated(loaded, tok, improc)
    assert e2.llm.path == str(tmp_path) and e2.weight_version == 1
    assert torch.equal(next(e2.llm.hf.parameters()), next(loaded.parameters()))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        colocated(model, tok, improc, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level"):
        colocated(model, tok, improc, sleep_level=3)


def test_cpu_platform_drops_sleep_mode_and_refuses_small_heads(samples, capsys):
    """On a platform without sleep mode (vLLM's CPU build) the engine runs without it and
    says so in one line; a text head size the CPU attention lacks is refused up front."""
    from mars.train.tiny import build_tiny
    from tiny_vlm import WORDS

    class CPULLM(StandInLLM):
        platform = StandInPlatform("cpu", sleep_mode=False, attention_head_sizes=(32, 64, 80))

        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            torch.set_num_threads = lambda n: None  # what vLLM's CPU worker does (a no-op that warns)

    model, tok, improc = build_tiny(WORDS, num_heads=2, image_size=56)
    set_threads = torch.set_num_threads
    engine = VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=CPULLM,
                                  sampling_params_cls=StandInSamplingParams)
    notice = [ln for ln in capsys.readouterr().err.splitlines() if "sleep mode" in ln]
    assert len(notice) == 1 and "cpu" in notice[0] and "rollout.vllm.enable_sleep_mode" in notice[0]
    assert engine.llm.kwargs["enable_sleep_mode"] is False and not engine.enable_sleep_mode
    assert torch.set_num_threads is set_threads  # the trainer's `threads` setting still applies
    engine.sleep()  # a no-op now
    assert engine.asleep is None and not any(c[0] == "sleep" for c in engine.llm.calls)
    assert engine.generate_ids([GenerationRequest(samples[0], SamplingConfig(max_new_tokens=2))])
    small, tok16, improc16 = build_tiny(WORDS, num_heads=4, image_size=56)  # 64 / 4 = 16
    with pytest.raises(ValueError, match=r"head sizes \[32, 64, 80\], this model's is 16.*model.tiny.num_heads=2"):
        VLLMEngine.colocated(small, tokenizer=tok16, image_processor=improc16, llm_cls=CPULLM,
                             sampling_params_cls=StandInSamplingParams)
    assert len(CPULLM.created) == 1  # refused before vLLM was asked
    assert "sleep mode" not in capsys.readouterr().err
    # a GPU platform has sleep mode and is not asked about head sizes
    gpu = VLLMEngine.colocated(small, tokenizer=tok16, image_processor=improc16, llm_cls=StandInLLM,
                               sampling_params_cls=StandInSamplingParams)
    assert gpu.llm.kwargs["enable_sleep_mode"] is True
    assert "sleep mode" not in capsys.readouterr().err


def test_prompt_and_response_must_fit_max_model_len(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc, max_model_len=64)
    assert engine.max_model_len == 64
    s = samples[0]
    enc = engine.encoder.encode(s)
    n = len(enc.input_ids)
    ok = 64 - n
    assert ok >= 1, n
    engine.generate_ids([GenerationRequest(s, SamplingConfig(max_new_tokens=ok), enc)])
    with pytest.raises(ValueError, match=rf"{n} prompt tokens \+ {ok + 1} new tokens = 65 > the engine's "
                                         r"max_model_len 64 \(rollout.vllm.max_model_len"):
        engine.generate_ids([GenerationRequest(s, SamplingConfig(max_new_tokens=ok + 1), enc)])


def test_trainer_engine_options_and_refusals(monkeypatch):
    """max_model_len defaults to prompt + response capped at the model's positions; the
    tiny model with 16-wide heads and torchrun are refused with the keys to change."""
    from mars.train.config import ConfigError, load_config
    from mars.train.loop import train
    from mars.train.policy import engine_options

    model, _, _ = tiny()  # max_position_embeddings 1024
    cfg = load_config(None, ["rollout.engine=vllm", "model.tiny.num_heads=2"], check_files=False)
    assert engine_options(cfg, model)["max_model_len"] == 1024  # 4096 + 16 capped
    assert engine_options(cfg)["max_model_len"] == 4096 + 16
    cfg = load_config(None, ["rollout.engine=vllm", "model.tiny.num_heads=2", "rollout.max_prompt_length=200"],
                      check_files=False)
    assert engine_options(cfg, model)["max_model_len"] == 216
    cfg = load_config(None, ["rollout.engine=vllm", "model.tiny.num_heads=2", "rollout.vllm.max_model_len=300"],
                      check_files=False)
    assert engine_options(cfg, model)["max_model_len"] == 300
    with pytest.raises(ConfigError, match=r"model.tiny.num_heads.*gives 16: set model.tiny.num_heads=2"):
        load_config(None, ["rollout.engine=vllm", "model.tiny.num_heads=4"], check_files=False)
    load_config(None, ["rollout.engine=vllm"], check_files=False)  # the default's head size is 32
    load_config(None, ["rollout.engine=hf", "model.tiny.num_heads=4"], check_files=False)  # HF: any head size
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["rollout.engine=vllm", "model.tiny.num_heads=2"], check_files=False)
    with pytest.raises(ConfigError, match="torchrun.*rollout.engine=hf"):
        train(cfg)


def test_close_shuts_the_engine_down_once(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc)
    llm = engine.llm
    engine.close()
    engine.close()
    assert llm.calls.count(("shutdown",)) == 1 and engine.llm is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.update_weights(model)


def test_multiprocessing_engine_cannot_take_weights(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc)
    del engine.llm.llm_engine.model_executor  # as with VLLM_ENABLE_V1_MULTIPROCESSING=1 (trl#3859)
    with pytest.raises(RuntimeError, match=MULTIPROCESSING_ENV):
        engine.update_weights(model)


def test_push_must_cover_every_vllm_parameter(samples):
    model, tok, improc = tiny("qwen2_5_vl")
    engine = colocated(model, tok, improc)
    params = list(model.named_parameters())
    partial = SimpleNamespace(named_parameters=lambda: iter(params[:-1]))  # lm_head.weight left out
    with pytest.raises(RuntimeError, match=r"not loaded from the pushed weights: \['language_model.lm_head.weight'\]"):
        engine.update_weights(partial)
    only_q = SimpleNamespace(named_parameters=lambda: iter(p for p in params if ".k_proj." not in p[0]))
    with pytest.raises(RuntimeError, match="qkv_proj"):  # a fused parameter needs all of its shards
        engine.update_weights(only_q)
    extra = SimpleNamespace(named_parameters=lambda: iter(params + [("model.visual.extra.weight", params[0][1])]))
    with pytest.raises(ValueError, match="no module or parameter named 'visual.extra.weight'"):
        engine.update_weights(extra)


class Corrupting(StandInLLM):
    """The stand-in with one field of its outputs broken."""

    corrupt = None

    def generate(self, prompts, sampling_params=None, **kw):
        out = super().generate(prompts, sampling_params, **kw)
        return type(self).corrupt(out)


def _drop_last_completion(out):
    out[0].outputs.pop()
    return out


def _no_logprobs(out):
    out[0].outputs[0].logprobs = None
    return out


def _wrong_token_logprob(out):
    c = out[0].outputs[0]
    c.logprobs[0] = {c.token_ids[0] + 1: Logprob(-1.0)}
    return out


def _short_logprobs(out):
    out[0].outputs[0].logprobs.pop()
    return out


def _aborted(out):
    out[0].outputs[0].finish_reason = "abort"
    return out


@pytest.mark.parametrize("corrupt,match", [
    (_drop_last_completion, r"returned 2 completions for requests\[0\] with n=3"),
    (_no_logprobs, "no log-probs"),
    (_wrong_token_logprob, "no log-prob of the sampled token"),
    (_short_logprobs, "log-prob positions"),
    (_aborted, "finish_reason='abort'"),
    (lambda out: out[:-1], "outputs for"),
])
def test_output_mismatches_raise(samples, corrupt, match):
    model, tok, improc = tiny()
    Corrupting.corrupt = staticmethod(corrupt)
    engine = VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=Corrupting,
                                  sampling_params_cls=StandInSamplingParams)
    with pytest.raises(RuntimeError, match=match):
        engine.generate_ids(mixed_requests(engine.encoder, samples[0], max_new=3))


def test_image_expansion_mismatch_names_mm_processor_kwargs(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc, mm_processor_kwargs={"min_pixels": 28 * 28, "max_pixels": 28 * 28})
    s = samples[0]
    with pytest.raises(RuntimeError, match="mm_processor_kwargs"):
        engine.generate_ids([GenerationRequest(s, SamplingConfig(max_new_tokens=2), engine.encoder.encode(s))])


def test_bad_prompts_raise(samples):
    model, tok, improc = tiny()
    engine = colocated(model, tok, improc)
    s = samples[0]
    p = engine.encoder.encode(s)
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> run\(s\) in the prompt for 2 image"):
        engine.generate_ids([GenerationRequest(s, SamplingConfig(), engine.encoder.encode(s.mono(0, "single")))])
    with pytest.raises(TypeError, match="GenerationRequest"):
        engine.generate_ids([s])
    # the stand-in itself refuses pre-expanded ids, as vLLM would expand them again
    with pytest.raises(ValueError, match="pre-expanded"):
        engine.llm.generate([{"prompt_token_ids": p.input_ids.tolist(), "multi_modal_data": {"image": s.images}}],
                            [StandInSamplingParams(max_tokens=2)])
    with pytest.raises(ValueError, match="n must be 1 when using greedy"):
        StandInSamplingParams(n=2, temperature=0.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        StandInSamplingParams(max_new_tokens=3)


def test_out_of_memory_is_reraised_with_the_settings(samples):
    model, tok, improc = tiny()

    def failing(exc):
        class LLM(StandInLLM):
            def __init__(self, model, **kw):
                raise exc
        return LLM

    cuda_oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    kv = ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization`")
    for exc in (cuda_oom, kv):
        with pytest.raises(RolloutOutOfMemoryError, match=r"rollout\.vllm\.gpu_memory_utilization") as info:
            VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=failing(exc))
        assert info.value.__cause__ is exc and "rollout.max_batch_rows" in str(info.value)
        assert isinstance(info.value, torch.OutOfMemoryError)  # the trainer's OOM handling sees it
    other = ValueError("unrelated")
    with pytest.raises(ValueError, match="unrelated"):
        VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=failing(other))

    class OOMGenerate(StandInLLM):
        def generate(self, *a, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory")

    engine = VLLMEngine.colocated(model, tokenizer=tok, image_processor=improc, llm_cls=OOMGenerate,
                                  sampling_params_cls=StandInSamplingParams)
    with pytest.raises(RolloutOutOfMemoryError, match="generating 1 prompt"):
        engine.generate_ids([GenerationRequest(samples[0], SamplingConfig(max_new_tokens=2))])


def test_factory_choices():
    model, tok, improc = tiny()
    policy = SimpleNamespace(model=model, tokenizer=tok, processor=None, image_processor=improc)
    hf = build_rollout_engine("hf", policy, max_batch_rows=4)
    assert isinstance(hf, HFEngine) and hf.max_batch_rows == 4 and hf.model is model
    with pytest.raises(TypeError, match="does not take"):
        build_rollout_engine("hf", policy, gpu_memory_utilization=0.3)
    with pytest.raises(ValueError, match="rollout.engine must be one of"):
        build_rollout_engine("tgi", policy)
    with pytest.raises(TypeError, match="policy has no model"):
        build_rollout_engine("hf", object())
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"mars\[vllm\]"):
            build_rollout_engine("vllm", policy)


def test_weight_names():
    assert hf_weight_name("_orig_mod.model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert vllm_weight_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "language_model.model.layers.0.mlp.up_proj.weight"
    assert vllm_weight_name("module.model.visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert vllm_weight_name("lm_head.weight") == "language_model.lm_head.weight"
    assert vllm_weight_name("model.embed_tokens.weight") == "language_model.model.embed_tokens.weight"
    with pytest.raises(ValueError, match="PEFT"):
        hf_weight_name("base_model.model.model.language_model.layers.0.q_proj.lora_A.weight")
    assert collapse_image_pads([1, 5, 5, 5, 2, 1, 5, 2, 5], 5) == ([1, 5, 2, 1, 5, 2, 5], [3, 1, 1])


def test_mars_train_with_the_vllm_engine(tmp_path, monkeypatch):
    """`mars train rollout.engine=vllm` on the stand-in: the held-out (greedy) evaluation and
    the greedy anchors' rewards equal rollout.engine=hf's at every step, so the weights
    reach the engine after the warm start and after every optimizer step. Both engines
    train the tiny model with 2 heads (head size 32, what vLLM's CPU attention runs)."""
    from mars.train.config import load_config
    from mars.train.loop import train

    # top_p 0.9 on a sure warm start: the two engines sample the same tokens, so their updates agree
    common = ["max_steps=2", "warmup.steps=10", "optim.prompts_per_step=2", "rollout.n=2",
              "task.eval_per_category=1", "log.plot_every=0", "log.samples_every=0", "eval.every=1",
              "rollout.top_p=0.9", "warmup.label_noise=0.05", "optim.mini_batches=1", "optim.lr=1e-4"]
    orig = VLLMEngine.colocated.__func__
    built = []

    def colocated(cls, model, **kw):
        built.append(kw)
        return orig(cls, model, llm_cls=StandInLLM, sampling_params_cls=StandInSamplingParams, **kw)

    monkeypatch.setattr(VLLMEngine, "colocated", classmethod(colocated))
    runs = {}
    for eng in ("hf", "vllm"):
        cfg = load_config(None, common + [f"rollout.engine={eng}", f"output_dir={tmp_path / eng}"], check_files=False)
        runs[eng] = train(cfg).records
    assert len(built) == 1 and built[0]["gpu_memory_utilization"] == 0.3
    llm = StandInLLM.created[-1]
    assert [c[0] for c in llm.calls].count("sleep") == 2  # once per RL step
    assert llm.calls[-1] == ("shutdown",)  # train() closed the engine
    for a, b in zip(runs["hf"], runs["vllm"]):
        evals = [k for k in a if k.startswith("eval_")]
        assert evals and {k: a[k] for k in evals} == {k: b[k] for k in evals}, a["step"]
        if a["step"]:
            assert a["reward_mono"] == b["reward_mono"]
            assert b["rollout_logp_diff"] is not None
