"""vLLM backend: a thin adapter over vLLM's documented offline API (pinned: vllm 0.31.0).

Evaluation (``mars eval``) builds it from a checkpoint path and sends text prompts:

    engine = VLLMEngine.from_pretrained(path)          # vllm.LLM(model=path, limit_mm_per_prompt=...)
    engine.generate(samples, SamplingConfig(...))      # {"prompt": text, "multi_modal_data": {...}}

Training builds it colocated with the trained policy and sends token prompts:

    engine = VLLMEngine.colocated(policy_model, processor=..., gpu_memory_utilization=0.3)
    out = engine.generate_ids([GenerationRequest(s, SamplingConfig(temperature=1, top_p=0.9, n=8)),
                               GenerationRequest(s.mono(0), SamplingConfig())])   # one llm.generate
    engine.sleep()                  # frees the engine's GPU memory for the policy update
    engine.update_weights(model)    # wake_up(weights) -> layerwise reload -> wake_up(kv_cache) -> reset caches

``generate_ids`` sends every request in **one** ``llm.generate`` call, each as a token
prompt ``{"prompt_token_ids": ids, "multi_modal_data": {"image": [PIL images]}}`` with
exactly ONE ``<|image_pad|>`` per image (vLLM's Qwen2-VL / Qwen2.5-VL processor expands
each to its image's feature count; pre-expanded ids would be expanded twice), and one
``SamplingParams`` per request: ``n=G`` with the sampling temperature / top_p for the
rollouts, greedy ``n=1`` for the anchors, ``logprobs=0`` (the sampled token's log-prob),
``logit_bias`` -100 on the vision placeholder tokens (a sampled ``<|image_pad|>`` breaks
the trainer's next forward) and the policy's eos ids as ``stop_token_ids``. A request
that carries an already encoded prompt (``GenerationRequest.prompt``, the trainer's
processor output with expanded image tokens) is sent with its image-pad runs collapsed
to one token each, so the text tokens vLLM sees are exactly those the trainer trains
on; the run lengths are checked against vLLM's own expansion
(``RequestOutput.prompt_token_ids``): a mismatch means the two image processors
disagree (``mm_processor_kwargs`` / min_pixels / max_pixels).

The completions are vLLM's generated ``token_ids`` (never re-tokenised text) and the
sampled tokens' log-probs ``outputs[j].logprobs[t][token_ids[t]].logprob``. The colocated
engine is created with ``logprobs_mode="processed_logprobs"`` (vLLM's default,
"raw_logprobs", ignores the temperature): log_softmax of the logits after the logit bias
and temperature and, for top_p < 1, renormalised over the nucleus (so they differ from
the trainer's full-vocabulary log-probs by the nucleus mass; the anchors' greedy rows
are at temperature 1).

Weights (``update_weights``): the HF parameters (transformers 5 names
``model.language_model.*``, ``model.visual.*``, ``lm_head.*``; torch.compile / DDP
wrapper prefixes stripped) go unchanged to the vLLM model's ``load_weights`` inside
vLLM's layerwise reload (``LLM.collective_rpc`` runs initialize_layerwise_reload ->
load_weights -> finalize_layerwise_reload in the worker, as vLLM's ``reload_weights``
does): kernels that post-process weights after loading (the CPU kernels repack every
linear weight and leave an empty parameter; quantized / FP8 layouts) need that, a plain
``load_weights`` fails on them. vLLM's ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen2VLForConditionalGeneration`` map those names with their ``hf_to_vllm_mapper`` and
fuse q/k/v and gate/up themselves. Every vLLM parameter must be loaded (as vLLM's own
checkpoint loader checks). The weights are passed by reference only without vLLM's V1
multiprocessing, which ``colocated`` turns off (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
as TRL's colocate mode needs it too). After a push
the prefix cache, the multimodal cache and the **encoder cache** are reset (else a
repeated image reuses vision-tower outputs of the old weights, vllm#44910).

Platform: where vLLM has no sleep mode (its CPU build; it has one on CUDA, ROCm, XPU)
``colocated`` runs without it and says so in one line; a text head size vLLM's CPU
attention does not run (it takes 32, 64, 80, ...) is refused before vLLM starts.
``generate_ids`` refuses a request whose prompt + max_new_tokens exceeds the engine's
``max_model_len``. ``close()`` shuts vLLM down (its in-process engine destroys the
process group it created).

Memory: vLLM's ``torch.OutOfMemoryError`` / out-of-memory ``RuntimeError`` / KV-cache
``ValueError`` for too little memory, at engine creation or in ``generate``, is re-raised
as :class:`RolloutOutOfMemoryError` (a ``torch.OutOfMemoryError``) naming ``rollout.vllm.gpu_memory_utilization`` and
``rollout.max_batch_rows`` (the original exception chained).

vLLM sources (0.31.0): vllm/entrypoints/llm.py (LLM, generate, sleep, wake_up,
reset_prefix_cache, reset_mm_cache, collective_rpc), vllm/v1/worker/gpu_model_runner.py
(reload_weights), vllm/model_executor/model_loader/reload/, vllm/v1/engine/llm_engine.py
(reset_encoder_cache, model_executor only without multiprocessing),
vllm/sampling_params.py, vllm/outputs.py, vllm/logprobs.py, vllm/inputs/llm.py
(TokensPrompt), vllm/model_executor/models/qwen2_5_vl.py (hf_to_vllm_mapper,
load_weights). See docs/vllm.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterator, Sequence

import torch

from .base import Completion, GenerationRequest, RolloutEngine, SamplingConfig, require
from .encode import IMAGE_TOKEN, PromptEncoder
from .prompts import DEFAULT_SYSTEM, qwen_chat_prompt

__all__ = ["VLLMEngine", "RolloutOutOfMemoryError", "collapse_image_pads", "hf_weight_name",
           "vllm_weight_name", "HF_TO_VLLM_PREFIXES", "MULTIPROCESSING_ENV"]

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
BANNED_BIAS = -100.0  # vLLM's from_optional clamps logit_bias to [-100, 100]
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper (vllm 0.31.0 qwen2_5_vl.py L1313-1321;
# the same table in qwen2_vl.py L1183-1192): first matching prefix wins.
HF_TO_VLLM_PREFIXES = (("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
                       ("lm_head.", "language_model.lm_head."), ("model.", "language_model.model."))
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP
OOM_HINT = ("vLLM ran out of GPU memory ({what}). The engine shares the GPU with the trained policy: "
            "rollout.vllm.gpu_memory_utilization is the fraction of the whole GPU vLLM takes for its "
            "weights + KV cache (raise it if the KV cache does not fit, lower it if the policy update "
            "runs out of memory), and rollout.max_batch_rows caps the sequences vLLM runs at once "
            "(max_num_seqs; lower it); rollout.vllm.max_model_len bounds the KV cache one sequence needs.")


def _vllm():
    """The vllm module (ImportError naming the ``mars[vllm]`` extra without it)."""
    vllm = require("vllm", "vllm")
    from .. import _compat

    if _compat.torchvision_fixed():  # vLLM's model-inspection subprocess needs the same fix
        from vllm.model_executor.models import registry

        registry._SUBPROCESS_COMMAND = _compat.vllm_subprocess_command()
    return vllm


class RolloutOutOfMemoryError(torch.OutOfMemoryError):
    """vLLM had too little GPU memory; the message says which settings to change, the
    original exception is ``__cause__``. A ``torch.OutOfMemoryError`` (so a RuntimeError),
    so code that handles CUDA out-of-memory errors handles it too."""


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return any(k in msg for k in ("out of memory", "gpu_memory_utilization", "gpu memory utilization",
                                  "kv cache memory", "no available memory for the cache blocks"))


@contextlib.contextmanager
def _oom_guard(what: str):
    try:
        yield
    except RolloutOutOfMemoryError:
        raise
    except Exception as exc:  # re-raised, with the settings to change when it is a memory error
        if _is_oom(exc):
            raise RolloutOutOfMemoryError(OOM_HINT.format(what=what) + f" Original error: {exc}") from exc
        raise


def collapse_image_pads(ids: Sequence[int], pad_id: int) -> tuple[list[int], list[int]]:
    """(ids with every run of ``pad_id`` shortened to one token, the runs' lengths in
    order). ``[s, P, P, P, e, s, P, e] -> ([s, P, e, s, P, e], [3, 1])``."""
    out: list[int] = []
    runs: list[int] = []
    prev_pad = False
    for t in ids:
        t = int(t)
        if t == pad_id:
            if prev_pad:
                runs[-1] += 1
                continue
            runs.append(1)
            prev_pad = True
        else:
            prev_pad = False
        out.append(t)
    return out, runs


def hf_weight_name(name: str) -> str:
    """The name a transformers-5 Qwen2-VL / Qwen2.5-VL parameter is sent to vLLM's
    ``load_weights`` under: ``name`` without torch.compile / DDP wrapper prefixes. Raises
    ValueError for a name vLLM's mapper has no prefix for (e.g. a PEFT-wrapped model)."""
    stripped = True
    while stripped:
        stripped = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, stripped = name[len(p):], True
    if not name.startswith(("model.", "lm_head.")):
        raise ValueError(f"parameter {name!r}: vLLM's Qwen-VL weight mapper knows names under 'model.' "
                         "(model.language_model.*, model.visual.*) and 'lm_head.' only; merge adapters "
                         "(PEFT) before pushing weights")
    return name


def vllm_weight_name(hf_name: str) -> str:
    """What vLLM's Qwen-VL ``hf_to_vllm_mapper`` turns ``hf_name`` into (before it fuses
    q/k/v and gate/up): e.g. ``model.language_model.layers.0.mlp.up_proj.weight`` ->
    ``language_model.model.layers.0.mlp.up_proj.weight``, ``model.visual.x`` -> ``visual.x``,
    ``lm_head.weight`` -> ``language_model.lm_head.weight``."""
    name = hf_weight_name(hf_name)
    for src, dst in HF_TO_VLLM_PREFIXES:
        if name.startswith(src):
            return dst + name[len(src):]
    raise AssertionError(name)  # hf_weight_name admits only mapped prefixes


class VLLMEngine(RolloutEngine):
    """llm: a ``vllm.LLM`` (or an object with the same API).

    sampling_params_cls: defaults to ``vllm.SamplingParams``.
    prompt_fn: ``messages -> prompt text`` override (one ``<|image_pad|>`` per image).
    processor / tokenizer / image_processor: the trained policy's, used to render and
        tokenise token prompts the way the trainer does (default: ``llm.get_tokenizer()``
        and its chat template, else the Qwen-VL formatter).
    enable_sleep_mode, sleep_level: what :meth:`sleep` does (nothing without sleep mode;
        level 1 offloads the weights to CPU, level 2 discards them: the next generate
        re-pushes ``model``'s).
    model: the trained HF model (kept to re-push weights after a level-2 sleep; set by
        :meth:`update_weights`).
    stop_token_ids: extra stop ids for ``generate_ids`` (the policy's eos ids).
    batch_size: samples per ``generate`` call ``mars eval`` passes."""

    def __init__(self, llm, *, sampling_params_cls=None, prompt_fn: Callable[[list], str] | None = None,
                 batch_size: int = 64, use_tqdm: bool = False, processor=None, tokenizer=None,
                 image_processor=None, system: str | None = DEFAULT_SYSTEM, enable_sleep_mode: bool = False,
                 sleep_level: int = 1, model=None, stop_token_ids: Sequence[int] | None = None):
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (offload weights to CPU) or 2 (discard them), got {sleep_level!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.llm = llm
        self._params_cls = sampling_params_cls
        self.prompt_fn = prompt_fn
        self.batch_size = batch_size
        self.use_tqdm = use_tqdm
        self.encoder = None
        if processor is not None or (tokenizer is not None and image_processor is not None):
            self.encoder = PromptEncoder(processor, tokenizer=tokenizer, image_processor=image_processor,
                                         system=system)
            tokenizer = self.encoder.tokenizer
        self._tokenizer = tokenizer
        self.system = system
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.sleep_level = sleep_level
        self.model = model
        self.stop_token_ids = [int(t) for t in stop_token_ids] if stop_token_ids else None
        self.asleep: int | None = None  # the level the engine sleeps at, None when awake
        self.weight_version = 0  # pushes so far
        self._tmpdir = None  # a checkpoint colocated() wrote, removed by close()
        self.max_model_len: int | None = None  # prompt + response tokens vLLM takes per sequence (when known)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, *, max_images: int = 6, batch_size: int = 64, **llm_kwargs):
        """``vllm.LLM(model=path, limit_mm_per_prompt={"image": max_images}, **llm_kwargs)``
        (the engine ``mars eval`` uses). Beside a torchvision that needed mars's import fix
        (mars/_compat.py) vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
        unless set): an engine process it spawned would not have the fix."""
        vllm = _vllm()
        from .. import _compat

        if _compat.torchvision_fixed():
            os.environ.setdefault(MULTIPROCESSING_ENV, "0")
        llm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
        with _oom_guard("creating the engine"):
            llm = vllm.LLM(model=path, **llm_kwargs)
        return cls(llm, batch_size=batch_size)

    @classmethod
    def colocated(cls, model, *, processor=None, tokenizer=None, image_processor=None,
                  model_path: str | None = None, gpu_memory_utilization: float = 0.3,
                  enable_sleep_mode: bool = True, sleep_level: int = 1, max_model_len: int | None = None,
                  limit_mm_per_prompt: int | dict = 6, seed: int = 0, dtype: str = "auto",
                  max_num_seqs: int | None = None, enforce_eager: bool = False,
                  mm_processor_kwargs: dict | None = None, logprobs_mode: str = "processed_logprobs",
                  batch_size: int = 64, system: str | None = DEFAULT_SYSTEM, llm_cls=None,
                  sampling_params_cls=None, **llm_kwargs) -> "VLLMEngine":
        """A ``vllm.LLM`` on the trainer's GPU, for ``generate_ids`` + ``update_weights``.

        model: the trained HF model (its weights are pushed right away unless the engine
            was loaded from a copy just written) or a checkpoint path.
        processor / tokenizer / image_processor: the policy's (see the class docstring).
        model_path: the checkpoint vLLM loads its config / tokenizer / image processor
            from (default: ``model.name_or_path`` when it is a local directory, else the
            model, tokenizer and processor are saved to a temporary directory).
        gpu_memory_utilization: fraction of the whole GPU for vLLM (weights + KV cache).
        enable_sleep_mode, sleep_level: see :meth:`sleep`.
        max_model_len: prompt + response tokens per sequence (None: the model's).
        limit_mm_per_prompt: images per prompt (an int) or vLLM's dict.
        seed, dtype ("auto": the model object's dtype), max_num_seqs, enforce_eager,
        mm_processor_kwargs (keep them the trainer's processor settings), logprobs_mode
        and ``llm_kwargs`` go to ``vllm.LLM``. llm_cls / sampling_params_cls: stand-ins
        (default ``vllm.LLM`` / ``vllm.SamplingParams``).
        Raises RolloutOutOfMemoryError when vLLM has too little memory, ValueError for a
        bad setting."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 or None, got {max_model_len!r}")
        if max_num_seqs is not None and max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {max_num_seqs!r}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        if isinstance(limit_mm_per_prompt, int):
            if limit_mm_per_prompt < 0:
                raise ValueError(f"limit_mm_per_prompt must be >= 0, got {limit_mm_per_prompt}")
            limit_mm_per_prompt = {"image": limit_mm_per_prompt}
        elif not isinstance(limit_mm_per_prompt, dict):
            raise TypeError(f"limit_mm_per_prompt must be an int or a dict, got {type(limit_mm_per_prompt).__name__}")
        if llm_cls is None:
            llm_cls = _vllm().LLM
        platform = _platform(llm_cls)
        if not isinstance(model, (str, os.PathLike)):
            _check_head_size(model, platform)
        if enable_sleep_mode and not platform.is_sleep_mode_available():
            print(f"mars: vLLM has no sleep mode on this platform ({platform.device_name}): the engine keeps its "
                  "weights and KV cache resident (rollout.vllm.enable_sleep_mode ignored)", file=sys.stderr)
            enable_sleep_mode = False
        hf_model, tmpdir = None, None
        if isinstance(model, (str, os.PathLike)):
            path = os.fspath(model)
        else:
            hf_model = model
            path = model_path or _local_checkpoint(model)
            if path is None:
                tmpdir = tempfile.TemporaryDirectory(prefix="mars-vllm-")
                path = tmpdir.name
                _save_checkpoint(path, model, processor, tokenizer, image_processor)
            if dtype == "auto":
                dtype = _dtype_name(model)
        prev = os.environ.get(MULTIPROCESSING_ENV)
        if prev not in (None, "0"):
            warnings.warn(f"{MULTIPROCESSING_ENV}={prev} set to 0: weights are pushed into the engine in this "
                          "process (LLM.collective_rpc), which needs vLLM's V1 multiprocessing off", stacklevel=2)
        os.environ[MULTIPROCESSING_ENV] = "0"
        kwargs = dict(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                      limit_mm_per_prompt=limit_mm_per_prompt, seed=seed, dtype=dtype,
                      enforce_eager=enforce_eager, logprobs_mode=logprobs_mode)
        for k, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs),
                     ("mm_processor_kwargs", mm_processor_kwargs)):
            if v is not None:
                kwargs[k] = v
        kwargs.update(llm_kwargs)
        set_threads = torch.set_num_threads
        try:
            with _oom_guard("creating the engine"):
                llm = llm_cls(model=path, **kwargs)
        except BaseException:
            if tmpdir is not None:
                tmpdir.cleanup()
            raise
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op that warns on every
            # call (to keep its OpenMP binding). Its in-process executor binds nothing (the
            # thread count is unchanged), so the trainer keeps its own `threads` setting.
            torch.set_num_threads = set_threads
        stop = None
        if hf_model is not None:
            from .hf import _eos_ids

            tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
            if tok is not None or getattr(hf_model, "generation_config", None) is not None:
                try:
                    stop = _eos_ids(getattr(hf_model, "generation_config", None), tok)
                except (ValueError, AttributeError):
                    stop = None
        engine = cls(llm, sampling_params_cls=sampling_params_cls, batch_size=batch_size, processor=processor,
                     tokenizer=tokenizer, image_processor=image_processor, system=system,
                     enable_sleep_mode=enable_sleep_mode, sleep_level=sleep_level, model=hf_model,
                     stop_token_ids=stop)
        engine._tmpdir = tmpdir
        engine.max_model_len = _engine_max_model_len(llm, max_model_len)
        if hf_model is not None and tmpdir is None:  # loaded from disk: make it the object's weights
            engine.update_weights(hf_model)
        return engine

    def close(self) -> None:
        """Shut the engine down (vLLM's engine core: its workers, and the process group an
        in-process vLLM created) and remove the temporary checkpoint ``colocated`` wrote.
        Idempotent."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        import gc

        gc.collect()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    # ------------------------------------------------------------------ prompts
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            get_tok = getattr(self.llm, "get_tokenizer", None)
            self._tokenizer = get_tok() if get_tok is not None else None
            if self._tokenizer is None:
                raise ValueError("token prompts need a tokenizer: pass tokenizer= / processor= or an LLM "
                                 "whose get_tokenizer() returns one")
        return self._tokenizer

    def _prompt(self, messages: list) -> str:
        """The text prompt (one ``<|image_pad|>`` per image)."""
        if self.prompt_fn is not None:
            return self.prompt_fn(messages)
        if self.encoder is not None:
            return self.encoder.prompt_text(messages)
        get_tok = getattr(self.llm, "get_tokenizer", None)
        tok = get_tok() if get_tok is not None else None
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return qwen_chat_prompt(messages, system=self.system)

    def _token_id(self, token: str) -> int | None:
        tok = self.tokenizer
        i = tok.convert_tokens_to_ids(token)
        if not isinstance(i, int) or i < 0 or i == tok.unk_token_id:
            return None
        return i

    def token_prompt(self, request: GenerationRequest, index: int = 0) -> tuple[dict, list[int] | None]:
        """(the vLLM prompt dict of ``request``, the per-image pad counts of its encoded
        prompt or None when the request had none). Raises ValueError when the prompt's
        image-token runs do not match the sample's images."""
        images = list(request.sample.images)
        pad = self._token_id(IMAGE_TOKEN)
        if request.prompt is not None:
            ids = request.prompt.input_ids
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        else:
            ids = self.tokenizer(self._prompt(request.sample.messages), add_special_tokens=False)["input_ids"]
        if pad is None:
            if images:
                raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token: cannot send images")
            return {"prompt_token_ids": [int(t) for t in ids]}, None
        ids, runs = collapse_image_pads(ids, pad)
        if len(runs) != len(images):
            raise ValueError(f"requests[{index}] (sample {getattr(request.sample, 'id', '?')!r}): {len(runs)} "
                             f"{IMAGE_TOKEN} run(s) in the prompt for {len(images)} image(s)")
        prompt = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt, (runs if request.prompt is not None else None)

    def _check_fits(self, request: GenerationRequest, index: int, runs, n_collapsed: int) -> None:
        """ValueError when the request's prompt (image tokens expanded, where known) plus
        its max_new_tokens exceeds the engine's max_model_len."""
        if self.max_model_len is None:
            return
        n = n_collapsed + (sum(runs) - len(runs) if runs else 0)
        need = n + request.config.max_new_tokens
        if need > self.max_model_len:
            raise ValueError(
                f"requests[{index}] (sample {getattr(request.sample, 'id', '?')!r}): {n} prompt tokens + "
                f"{request.config.max_new_tokens} new tokens = {need} > the engine's max_model_len "
                f"{self.max_model_len} (rollout.vllm.max_model_len; at most the model's max_position_embeddings): "
                "lower rollout.max_prompt_length so that such prompts are skipped, or rollout.max_new_tokens")

    def _params(self, config: SamplingConfig, logprobs: bool, train: bool = False):
        params_cls = self._params_cls or _vllm().SamplingParams
        kw = dict(n=config.n, temperature=config.temperature, top_p=config.top_p,
                  max_tokens=config.max_new_tokens, seed=config.seed)
        if logprobs:
            kw["logprobs"] = 0
        if train:
            banned = [i for i in (self._token_id(t) for t in VISION_TOKENS) if i is not None]
            if banned:
                kw["logit_bias"] = {i: BANNED_BIAS for i in sorted(set(banned))}
            if self.stop_token_ids:
                kw["stop_token_ids"] = list(self.stop_token_ids)
        return params_cls(**kw)

    def _generate(self, prompts, params):
        self._ensure_awake()
        with _oom_guard(f"generating {len(prompts)} prompt(s)"):
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    # ------------------------------------------------------------------ generation
    def generate_ids(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """``requests[i].config.n`` completions per request from one ``llm.generate``
        call (see the module docstring). Completion.token_ids: vLLM's generated ids (eos
        included when generated), logprobs: their processed log-probs [len(token_ids)],
        finish_reason "stop" / "length". Raises TypeError for a request that is not a
        GenerationRequest, ValueError for a prompt whose image tokens do not match its
        images, RuntimeError when vLLM's outputs do not match the requests (count, n,
        missing log-probs, an aborted request, another image expansion)."""
        prompts, params, runs = [], [], []
        for i, r in enumerate(requests):
            if not isinstance(r, GenerationRequest):
                raise TypeError(f"requests[{i}] is a {type(r).__name__}, expected a GenerationRequest")
            p, rn = self.token_prompt(r, i)
            self._check_fits(r, i, rn, len(p["prompt_token_ids"]))
            prompts.append(p)
            runs.append(rn)
            params.append(self._params(r.config, True, train=True))
        if not prompts:
            return []
        outputs = self._generate(prompts, params)
        pad = self._token_id(IMAGE_TOKEN)
        result = []
        for i, (o, r, rn) in enumerate(zip(outputs, requests, runs)):
            outs = list(o.outputs)
            if len(outs) != r.config.n:
                raise RuntimeError(f"vLLM returned {len(outs)} completions for requests[{i}] with n={r.config.n}")
            got = getattr(o, "prompt_token_ids", None)
            if rn is not None and got is not None and pad is not None:
                seen = collapse_image_pads(got, pad)[1]
                if seen != rn:
                    raise RuntimeError(
                        f"requests[{i}] (sample {getattr(r.sample, 'id', '?')!r}): vLLM expanded the images to "
                        f"{seen} tokens, the trainer's processor to {rn}: give vLLM the trainer's image "
                        "processor settings (mm_processor_kwargs min_pixels / max_pixels)")
            result.append([_completion(c, i) for c in outs])
        return result

    def generate(self, samples: Sequence, config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
        """Completion texts, ``config.n`` per sample, in input order, from text prompts
        (``{"prompt": text, "multi_modal_data": {"image": [...]}}``, one ``<|image_pad|>``
        per image) and one SamplingParams (``mars eval``)."""
        params = self._params(config, False)
        requests = [{"prompt": self._prompt(s.messages), "multi_modal_data": {"image": s.images}} for s in samples]
        if not requests:
            return []
        outputs = self._generate(requests, params)
        return [[c.text for c in o.outputs] for o in outputs]

    # ------------------------------------------------------------------ weights and memory
    def named_weights(self, model) -> Iterator[tuple[str, object]]:
        """(name vLLM's ``load_weights`` takes, tensor) for every parameter of ``model``
        (tied parameters once, as ``named_parameters`` yields them)."""
        for name, p in model.named_parameters():
            yield hf_weight_name(name), p.detach()

    def update_weights(self, model) -> None:
        """Load ``model``'s weights into the engine (after each optimizer step): wake the
        weights if asleep, vLLM's layerwise reload (``LLM.collective_rpc``: initialize ->
        load_weights -> finalize), wake the KV cache, reset the
        prefix / multimodal / encoder caches. Raises RuntimeError when the engine runs
        its model in another process or a vLLM parameter was not loaded, ValueError for a
        parameter name vLLM cannot map."""
        if model is None:
            raise ValueError("update_weights needs the trained model")
        self.model = model
        self._push(model)

    def _push(self, model) -> None:
        if self.llm is None:
            raise RuntimeError("the engine was closed")
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and getattr(engine, "model_executor", None) is None:
            raise RuntimeError(
                "the vLLM engine runs its model in another process, so weights cannot be pushed from here: "
                f"create the LLM with {MULTIPROCESSING_ENV}=0 in the environment (VLLMEngine.colocated does)")
        weights = list(self.named_weights(model))
        if self.asleep is not None:
            self.llm.wake_up(tags=["weights"])
        missing = self.llm.collective_rpc(_reload_weights, args=(weights,))
        if self.asleep is not None:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = None
        for m in missing or []:
            if m:
                raise RuntimeError(f"vLLM parameters not loaded from the pushed weights: {m[:8]}"
                                   f"{' ...' if len(m) > 8 else ''} ({len(m)} in all)")
        self.weight_version += 1
        self.reset_caches()

    def reset_caches(self) -> None:
        """Reset vLLM's prefix cache, multimodal (processor) cache and encoder cache
        (vision-tower outputs). Raises RuntimeError when the prefix cache could not be
        reset (requests still running)."""
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM could not reset its prefix cache (requests still running?)")
        reset_mm = getattr(self.llm, "reset_mm_cache", None)
        if reset_mm is not None:
            reset_mm()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next ``update_weights`` / generate
        (``LLM.sleep(level=sleep_level)``); nothing without sleep mode or when asleep."""
        if not self.enable_sleep_mode or self.asleep is not None:
            return
        self.llm.sleep(level=self.sleep_level)
        self.asleep = self.sleep_level

    def _ensure_awake(self) -> None:
        if self.asleep is None:
            return
        if self.asleep == 2:  # the weights were discarded: only a push brings them back
            if self.model is None:
                raise RuntimeError("the engine slept at level 2 (weights discarded) and has no model to "
                                   "reload them from: call update_weights(model) before generating")
            self._push(self.model)
        else:
            self.llm.wake_up()
            self.asleep = None


def _reload_weights(worker, weights) -> list[str] | None:
    """Runs in the vLLM worker (``LLM.collective_rpc``): vLLM 0.31's layerwise reload, as
    its ``GPUModelRunner.reload_weights`` does it (initialize_layerwise_reload ->
    ``model.load_weights`` -> finalize_layerwise_reload, which redoes the kernels'
    post-processing: the CPU kernels' repacked linear weights, quantized / FP8 layouts).
    Unlike ``reload_weights`` (which only logs them) it returns the vLLM parameters not
    loaded, or None when ``load_weights`` does not report what it loaded."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    runner = worker.model_runner
    model = runner.get_model()
    expected = {n for n, _ in model.named_parameters()}
    initialize_layerwise_reload(model)
    loaded = model.load_weights(iter(weights))
    finalize_layerwise_reload(model, runner.model_config)
    if loaded is None:
        return None
    return sorted(expected - set(loaded))


def _platform(llm_cls):
    """vLLM's current platform (a stand-in LLM class may bring its own as ``platform``)."""
    own = getattr(llm_cls, "platform", None)
    if own is not None:
        return own
    _vllm()
    from vllm.platforms import current_platform

    return current_platform


def _text_head_size(model) -> int | None:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) or cfg
    if text is None:
        return None
    hd = getattr(text, "head_dim", None)
    if hd:
        return int(hd)
    h, n = getattr(text, "hidden_size", None), getattr(text, "num_attention_heads", None)
    return h // n if isinstance(h, int) and isinstance(n, int) and n else None


def _check_head_size(model, platform) -> None:
    """ValueError when vLLM's CPU attention cannot run ``model``'s text head size (it
    takes 32, 64, 80, ...; the embedded default's tiny model has 64 / 4 heads = 16)."""
    if not platform.is_cpu():
        return
    sizes = vars(platform).get("attention_head_sizes")  # a stand-in's (vLLM's platform warns on getattr)
    if sizes is None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
    hd = _text_head_size(model)
    if hd is not None and hd not in sizes:
        raise ValueError(
            f"vLLM's CPU attention supports head sizes {list(sizes)}, this model's is {hd} (text hidden_size / "
            f"num_attention_heads): it cannot run on vLLM here. For mars train's tiny model set "
            f"model.tiny.num_heads so that model.tiny.hidden_size / num_heads is 32 or more (e.g. "
            f"model.tiny.num_heads=2 with hidden_size 64), or use rollout.engine=hf")


def _engine_max_model_len(llm, asked: int | None) -> int | None:
    """The max_model_len vLLM settled on (its model config), else the one asked for."""
    cfg = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    got = getattr(cfg, "max_model_len", None)
    return int(got) if isinstance(got, int) else asked


def _completion(c, i: int) -> Completion:
    ids = [int(t) for t in c.token_ids]
    if c.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"requests[{i}]: vLLM finished a completion with finish_reason={c.finish_reason!r}")
    lps = getattr(c, "logprobs", None)
    if lps is None:
        raise RuntimeError(f"requests[{i}]: vLLM returned no log-probs (SamplingParams(logprobs=0) was sent)")
    if len(lps) != len(ids):
        raise RuntimeError(f"requests[{i}]: vLLM returned {len(lps)} log-prob positions for {len(ids)} tokens")
    lp = []
    for t, tok in enumerate(ids):
        entry = lps[t]
        if entry is None or tok not in entry:
            raise RuntimeError(f"requests[{i}]: no log-prob of the sampled token {tok} at position {t}")
        lp.append(float(entry[tok].logprob))
    return Completion(ids, c.text, lp, c.finish_reason)


def _local_checkpoint(model) -> str | None:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path
    return None


def _save_checkpoint(path: str, model, processor, tokenizer, image_processor) -> None:
    """What vLLM loads: config + weights, tokenizer, image processor."""
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    else:
        if tokenizer is None or image_processor is None:
            raise ValueError("an in-memory model needs processor= or tokenizer= and image_processor= (vLLM "
                             "loads them from the checkpoint directory), or model_path=")
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)


def _dtype_name(model) -> str:
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")
