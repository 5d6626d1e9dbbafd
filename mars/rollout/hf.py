"""Hugging Face transformers backend.

    engine = HFEngine.from_pretrained("/path/to/Qwen2.5-VL-3B")          # AutoProcessor + model
    engine = HFEngine(model, processor)                                 # objects you built
    engine = HFEngine(model, tokenizer=tok, image_processor=improc)     # Qwen-VL without a processor

With a processor, its chat template renders the prompt and it expands the image tokens.
Without one (Qwen2-VL family only), the prompt is rendered by
:func:`mars.rollout.prompts.qwen_chat_prompt` with prod(image_grid_thw) / merge_size**2
``<|image_pad|>`` tokens per image. Completions are decoded without special tokens.
"""

from __future__ import annotations

from typing import Sequence

from .base import RolloutEngine, SamplingConfig, require
from .prompts import DEFAULT_SYSTEM, qwen_chat_prompt, qwen_image_text

__all__ = ["HFEngine"]


class HFEngine(RolloutEngine):
    """model: a generative VLM (``model.generate``); processor or tokenizer +
    image_processor as above; batch_size: samples per forward (left padding)."""

    def __init__(self, model, processor=None, *, tokenizer=None, image_processor=None,
                 batch_size: int = 1, system: str | None = DEFAULT_SYSTEM):
        if processor is None and (tokenizer is None or image_processor is None):
            raise ValueError("HFEngine needs a processor, or both tokenizer= and image_processor=")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.system = system

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
        try:
            processor = transformers.AutoProcessor.from_pretrained(path)
        except Exception as exc:  # e.g. a Qwen-VL processor whose video part needs torchvision
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                image_processor = _load_image_processor(transformers, path)
            except Exception:
                raise exc from None
            return cls(model, tokenizer=tokenizer, image_processor=image_processor, batch_size=batch_size)
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise ValueError(f"{path}: the processor has no tokenizer / image processor; not a vision-language model?")
        return cls(model, processor, batch_size=batch_size)

    def _encode(self, samples: Sequence):
        images = [im for s in samples for im in s.images]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            if self.processor is not None:
                if getattr(self.processor, "chat_template", None):
                    texts = [self.processor.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
                             for s in samples]
                else:
                    texts = [qwen_chat_prompt(s.messages, system=self.system) for s in samples]
                return self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
            vis = self.image_processor(images=images, return_tensors="pt")
            merge = int(getattr(self.image_processor, "merge_size", 2))
            counts = [int(g.prod()) // merge**2 for g in vis["image_grid_thw"]]
            texts, start = [], 0
            for s in samples:
                mine = counts[start:start + s.num_images]
                start += s.num_images
                texts.append(qwen_chat_prompt(s.messages, lambda i, c=mine: qwen_image_text(c[i]), system=self.system))
            enc = dict(tok(texts, padding=True, return_tensors="pt"))
            enc.update(vis)
            return enc
        finally:
            tok.padding_side = old_side

    def generate(self, samples: Sequence, config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
        """Completions, ``config.n`` per sample."""
        torch = require("torch", "hf")
        out: list[list[str]] = []
        device = next(self.model.parameters()).device
        if config.seed is not None:
            torch.manual_seed(config.seed)
        for b in range(0, len(samples), self.batch_size):
            chunk = list(samples[b:b + self.batch_size])
            enc = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in self._encode(chunk).items()}
            kwargs = dict(max_new_tokens=config.max_new_tokens, num_return_sequences=config.n)
            if config.temperature > 0:
                kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if self.tokenizer.pad_token_id is not None:
                kwargs["pad_token_id"] = self.tokenizer.pad_token_id
            with torch.no_grad():
                ids = self.model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i in range(len(chunk)):
                out.append(texts[i * config.n:(i + 1) * config.n])
        return out


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
