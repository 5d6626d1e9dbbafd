"""Hugging Face transformers backend.

    engine = HFEngine.from_pretrained("/path/to/Qwen2.5-VL-3B")          # AutoProcessor + model
    engine = HFEngine(model, processor)                                 # objects you built
    engine = HFEngine(model, tokenizer=tok, image_processor=improc)     # Qwen-VL without a processor

Prompts are encoded by :class:`mars.rollout.encode.PromptEncoder` (chat template or the
Qwen-VL formatter, image tokens expanded, ``mm_token_type_ids`` for M-RoPE).

``generate_ids`` answers every request of a call with one ``model.generate`` per
``max_batch_rows`` rows: each request is expanded to ``n`` rows and a logits processor
applies each row's own temperature / top-p (greedy rows keep only their argmax), so
sampled rollouts and greedy anchors share one batch. The same processor bans the vision
placeholder tokens (a sampled ``<|image_pad|>`` would break the next forward) and records
each chosen token's log-prob under the row's temperature (before top-p): ``logprobs``.
Completions are decoded without special tokens.
"""

from __future__ import annotations

from typing import Sequence

from .base import Completion, GenerationRequest, RolloutEngine, require
from .encode import PromptEncoder
from .prompts import DEFAULT_SYSTEM

__all__ = ["HFEngine"]

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


class HFEngine(RolloutEngine):
    """model: a generative VLM (``model.generate``); processor or tokenizer +
    image_processor as above; batch_size: samples per ``generate`` call a caller such as
    ``mars eval`` should pass; max_batch_rows: rows (completions) per ``model.generate`` of
    a ``generate_ids`` call (None: all in one)."""

    def __init__(self, model, processor=None, *, tokenizer=None, image_processor=None,
                 batch_size: int = 1, system: str | None = DEFAULT_SYSTEM,
                 max_batch_rows: int | None = None):
        if processor is None and (tokenizer is None or image_processor is None):
            raise ValueError("HFEngine needs a processor, or both tokenizer= and image_processor=")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_rows is not None and max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1 or None, got {max_batch_rows}")
        self.model = model
        self.processor = processor
        self.encoder = PromptEncoder(processor, tokenizer=tokenizer, image_processor=image_processor,
                                     system=system)
        self.tokenizer = self.encoder.tokenizer
        self.image_processor = self.encoder.image_processor
        self.batch_size = batch_size
        self.max_batch_rows = max_batch_rows
        self.system = system
        ids = [self.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        unk = self.tokenizer.unk_token_id
        self.banned_token_ids = sorted({i for i in ids if isinstance(i, int) and i >= 0 and i != unk})

    @classmethod
    def from_pretrained(cls, path: str, *, device: str | None = None, dtype="auto", batch_size: int = 1, **model_kwargs):
        """Load a local checkpoint with AutoModelForImageTextToText and AutoProcessor (or, if
        the processor cannot be built, AutoTokenizer + AutoImageProcessor)."""
        transformers = require("transformers", "hf")
        torch = require("torch", "hf")
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
        model = auto.from_pretrained(path, **{dtype_key: dtype}, **model_kwargs)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        processor, tokenizer, image_processor = load_processor(path)
        if processor is None:
            return cls(model, tokenizer=tokenizer, image_processor=image_processor, batch_size=batch_size)
        return cls(model, processor, batch_size=batch_size)

    def _encode(self, samples: Sequence):
        """Left-padded model inputs of ``samples`` (one row each)."""
        return self.encoder.collate([self.encoder.encode(s) for s in samples], "left")

    def generate_ids(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        torch = require("torch", "hf")
        rows = []  # (request index, encoded prompt, config)
        for i, r in enumerate(requests):
            if not isinstance(r, GenerationRequest):
                raise TypeError(f"requests[{i}] is a {type(r).__name__}, expected a GenerationRequest")
            p = r.prompt if r.prompt is not None else self.encoder.encode(r.sample)
            rows.extend((i, p, r.config) for _ in range(r.config.n))
        out: list[list[Completion]] = [[] for _ in requests]
        seeds = {r.config.seed for r in requests if r.config.seed is not None}
        if seeds:
            torch.manual_seed(min(seeds))
        step = self.max_batch_rows or max(len(rows), 1)
        for b in range(0, len(rows), step):
            chunk = rows[b:b + step]
            for (i, _, _), c in zip(chunk, self._generate_rows(chunk)):
                out[i].append(c)
        return out

    def _generate_rows(self, rows) -> list[Completion]:
        torch = require("torch", "hf")
        model = self.model
        device = next(model.parameters()).device
        enc = self.encoder.collate([p for _, p, _ in rows], "left", device=device)
        temps = torch.tensor([c.temperature for _, _, c in rows], dtype=torch.float32, device=device)
        top_p = torch.tensor([c.top_p for _, _, c in rows], dtype=torch.float32, device=device)
        max_new = max(c.max_new_tokens for _, _, c in rows)
        sampler = RowSampler(temps, top_p, self.banned_token_ids)
        gen_cfg = getattr(model, "generation_config", None)
        eos = _eos_ids(gen_cfg, self.tokenizer)
        kwargs = dict(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                      repetition_penalty=1.0, num_beams=1, logits_processor=[sampler],
                      pad_token_id=self.encoder.pad_token_id, eos_token_id=eos)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                seqs = model.generate(**enc, **kwargs)
        finally:
            model.train(was_training)
        P = enc["input_ids"].shape[1]
        new = seqs[:, P:]
        logp = sampler.logprobs(new)
        eos_set = set(eos)
        out = []
        for r, (_, _, cfg) in enumerate(rows):
            ids = new[r].tolist()
            n, finish = min(len(ids), cfg.max_new_tokens), "length"
            for t, tok in enumerate(ids[:n]):
                if tok in eos_set:
                    n, finish = t + 1, "stop"
                    break
            ids = ids[:n]
            lp = logp[r, :n].tolist() if logp is not None else None
            out.append(Completion(ids, self.tokenizer.decode(ids, skip_special_tokens=True), lp, finish))
        return out


def _eos_ids(gen_cfg, tokenizer) -> list[int]:
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos:
        raise ValueError("neither the model's generation_config nor the tokenizer names an eos token")
    return eos


class RowSampler:
    """A transformers logits processor giving every row its own temperature (0 = greedy)
    and top-p, banning ``banned`` ids, and recording the log-prob of each chosen token
    under log_softmax(logits / temperature) (temperature 1 for greedy rows), i.e. the
    policy's log-prob a trainer computes, before the ban and top-p filters.

    Used with ``generate(do_sample=True, temperature=1, top_p=1, top_k=0)`` so no other
    warper changes the scores. The log-prob of the token chosen at step t is read at step
    t + 1 (from ``input_ids[:, -1]``) and the last one by :meth:`logprobs`, so only one
    [rows, V] block is kept."""

    def __init__(self, temperature, top_p, banned: Sequence[int] = ()):
        import torch

        self.greedy = temperature == 0
        self.temperature = torch.where(self.greedy, torch.ones_like(temperature), temperature)
        self.top_p = top_p
        self.any_top_p = bool(((top_p < 1) & ~self.greedy).any())
        self.banned = list(banned)
        self._last = None
        self._chosen: list = []

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float()
        if self._last is not None:
            self._chosen.append(self._last.gather(1, input_ids[:, -1:].to(self._last.device))[:, 0])
        scaled = scores / self.temperature[:, None]
        self._last = scaled.log_softmax(-1)  # the policy's log-probs: before the ban and top-p
        if self.banned:
            scaled = scaled.clone()
            scaled[:, self.banned] = float("-inf")
            scores = scaled  # greedy rows take the argmax of the allowed tokens
        out = scaled
        if self.any_top_p:
            out = _top_p_filter(out, torch.where(self.greedy, torch.ones_like(self.top_p), self.top_p))
        if bool(self.greedy.any()):
            one_hot = torch.full_like(out, float("-inf"))
            one_hot.scatter_(1, scores.argmax(-1, keepdim=True), 0.0)
            out = torch.where(self.greedy[:, None], one_hot, out)
        return out

    def logprobs(self, new_ids):
        """[rows, T] log-probs of the generated ids ``new_ids`` [rows, T] (None if the
        processor never ran)."""
        import torch

        if self._last is None:
            return None
        chosen = self._chosen + [self._last.gather(1, new_ids[:, len(self._chosen):len(self._chosen) + 1]
                                                  .to(self._last.device))[:, 0]]
        lp = torch.stack(chosen, 1)[:, :new_ids.shape[1]]
        return lp.cpu()


def _top_p_filter(scores, top_p):
    """Keep, per row, the smallest set of most likely tokens whose probability reaches
    top_p (the most likely token always); the rest -inf."""
    import torch

    sorted_scores, idx = scores.sort(-1, descending=True)
    probs = sorted_scores.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    remove_sorted = before >= top_p[:, None]
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(1, idx, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def load_processor(path: str):
    """(processor, None, None) from AutoProcessor, or (None, tokenizer, image_processor)
    when the processor cannot be built (e.g. Qwen-VL's video part needs torchvision)."""
    transformers = require("transformers", "hf")
    try:
        processor = transformers.AutoProcessor.from_pretrained(path)
    except Exception as exc:  # e.g. a Qwen-VL processor whose video part needs torchvision
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            image_processor = _load_image_processor(transformers, path)
        except Exception:
            raise exc from None
        return None, tokenizer, image_processor
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise ValueError(f"{path}: the processor has no tokenizer / image processor; not a vision-language model?")
    return processor, None, None


def _load_image_processor(transformers, path: str):
    """AutoImageProcessor, or (when that needs a missing torchvision) the class named in
    preprocessor_config.json, preferring its PIL variant."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(path)
    except Exception as exc:
        import json
        import os

        cfg_path = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(cfg_path):
            raise exc
        with open(cfg_path, encoding="utf-8") as f:
            name = json.load(f).get("image_processor_type") or ""
        for candidate in (name if name.endswith("Pil") else name + "Pil", name):
            try:
                cls = getattr(transformers, candidate)
                return cls.from_pretrained(path)
            except Exception:
                continue
        raise exc
