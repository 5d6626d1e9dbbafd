"""vLLM backend: a thin adapter over vLLM's documented offline API.

    llm = vllm.LLM(model=path, limit_mm_per_prompt={"image": 6})
    outputs = llm.generate([{"prompt": text, "multi_modal_data": {"image": [img, ...]}}],
                           sampling_params=vllm.SamplingParams(...))
    outputs[i].outputs[j].text

The prompt text comes from ``llm.get_tokenizer().apply_chat_template`` when the tokenizer
has a chat template, else from the Qwen-VL formatter with one ``<|image_pad|>`` per image
(vLLM expands it), or from ``prompt_fn(messages)`` when given.

``generate_ids`` sends every request in one ``llm.generate`` call with one
``SamplingParams`` per request (greedy anchors need ``n=1``, sampled rollouts ``n=G``) and
``logprobs=0``, and returns vLLM's ``token_ids`` and the sampled tokens' log-probs
(``out.logprobs[t][token_ids[t]].logprob``; what they mean depends on the LLM's
``logprobs_mode``, "processed_logprobs" is what a trainer wants).
"""

from __future__ import annotations

from typing import Callable, Sequence

from .base import Completion, GenerationRequest, RolloutEngine, SamplingConfig, require
from .prompts import qwen_chat_prompt

__all__ = ["VLLMEngine"]


class VLLMEngine(RolloutEngine):
    """llm: a ``vllm.LLM`` (or an object with the same ``generate`` / ``get_tokenizer``).
    sampling_params_cls: defaults to ``vllm.SamplingParams``.
    prompt_fn: ``messages -> prompt text`` override."""

    def __init__(self, llm, *, sampling_params_cls=None, prompt_fn: Callable[[list], str] | None = None,
                 batch_size: int = 64, use_tqdm: bool = False):
        self.llm = llm
        self._params_cls = sampling_params_cls
        self.prompt_fn = prompt_fn
        self.batch_size = batch_size
        self.use_tqdm = use_tqdm

    @classmethod
    def from_pretrained(cls, path: str, *, max_images: int = 6, batch_size: int = 64, **llm_kwargs):
        """``vllm.LLM(model=path, limit_mm_per_prompt={"image": max_images}, **llm_kwargs)``."""
        vllm = require("vllm", "vllm")
        llm_kwargs.setdefault("limit_mm_per_prompt", {"image": max_images})
        return cls(vllm.LLM(model=path, **llm_kwargs), batch_size=batch_size)

    def _prompt(self, messages: list) -> str:
        if self.prompt_fn is not None:
            return self.prompt_fn(messages)
        get_tok = getattr(self.llm, "get_tokenizer", None)
        tok = get_tok() if get_tok is not None else None
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return qwen_chat_prompt(messages)

    def _params(self, config: SamplingConfig, logprobs: bool):
        params_cls = self._params_cls or require("vllm", "vllm").SamplingParams
        kw = dict(n=config.n, temperature=config.temperature, top_p=config.top_p,
                  max_tokens=config.max_new_tokens, seed=config.seed)
        if logprobs:
            kw["logprobs"] = 0
        return params_cls(**kw)

    def generate_ids(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """One ``llm.generate`` call for all requests (a SamplingParams per request)."""
        params = [self._params(r.config, True) for r in requests]
        prompts = [{"prompt": self._prompt(r.sample.messages), "multi_modal_data": {"image": r.sample.images}}
                   for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        result = []
        for o, r in zip(outputs, requests):
            if len(o.outputs) != r.config.n:
                raise RuntimeError(f"vLLM returned {len(o.outputs)} completions for n={r.config.n}")
            cs = []
            for c in o.outputs:
                ids = list(c.token_ids)
                lp = None
                if getattr(c, "logprobs", None) is not None:
                    lp = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]
                cs.append(Completion(ids, c.text, lp, "length" if c.finish_reason == "length" else "stop"))
            result.append(cs)
        return result

    def generate(self, samples: Sequence, config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
        """Completions, ``config.n`` per sample, in input order."""
        params = self._params(config, False)
        requests = [{"prompt": self._prompt(s.messages), "multi_modal_data": {"image": s.images}} for s in samples]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=self.use_tqdm)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [[c.text for c in o.outputs] for o in outputs]
