"""Prompt encoding shared by the HF engine and the trainer: one sample -> token ids and
vision inputs, so that what was generated from and what is trained on are the same ids.

    enc = PromptEncoder(processor)                                   # AutoProcessor
    enc = PromptEncoder(tokenizer=tok, image_processor=improc)       # Qwen-VL without one
    p = enc.encode(sample)          # EncodedPrompt: input_ids [P], mm_token_type_ids [P],
                                    # pixel_values [patches, D], image_grid_thw [images, 3]
    batch = enc.collate([p, ...], padding_side="left")   # dict of model inputs

With a processor, its chat template renders the prompt (the Qwen-VL formatter when it has
none) and it expands the image tokens. Without one (Qwen2-VL family), the prompt is
rendered by :func:`mars.rollout.prompts.qwen_chat_prompt` with
prod(image_grid_thw) / merge_size**2 ``<|image_pad|>`` tokens per image.

``mm_token_type_ids`` (0 text, 1 image) is always returned: transformers 5 builds
Qwen-VL's 3-D (M-RoPE) positions only when it is passed, and otherwise silently falls back
to 1-D positions in ``generate`` (or raises in a plain forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .prompts import DEFAULT_SYSTEM, qwen_chat_prompt, qwen_image_text

__all__ = ["EncodedPrompt", "PromptEncoder"]

IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class EncodedPrompt:
    """One encoded prompt (no padding). pixel_values / image_grid_thw are None for a
    prompt without images."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.numel())


class PromptEncoder:
    """processor, or tokenizer + image_processor (see the module docstring). system: the
    system turn the Qwen-VL formatter adds (None: none)."""

    def __init__(self, processor=None, *, tokenizer=None, image_processor=None,
                 system: str | None = DEFAULT_SYSTEM):
        if processor is None and (tokenizer is None or image_processor is None):
            raise ValueError("PromptEncoder needs a processor, or both tokenizer= and image_processor=")
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.image_processor = image_processor if image_processor is not None else \
            getattr(processor, "image_processor", None)
        self.system = system
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id

    def prompt_text(self, messages: list[dict], image_pads: Sequence[int] | None = None) -> str:
        """The rendered generation prompt; ``image_pads[i]`` <|image_pad|> tokens for
        image i (one each when None, as vLLM wants them)."""
        if self.processor is not None and getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pads = (lambda i: qwen_image_text(1)) if image_pads is None else (lambda i: qwen_image_text(image_pads[i]))
        return qwen_chat_prompt(messages, pads, system=self.system)

    def encode(self, sample) -> EncodedPrompt:
        """Token ids and vision inputs of ``sample`` (``messages`` + ``images``)."""
        images = list(sample.images)
        if self.processor is not None:
            text = self.prompt_text(sample.messages)
            enc = self.processor(text=[text], images=images or None, return_tensors="pt")
            ids = enc["input_ids"][0]
            mm = enc.get("mm_token_type_ids")
            mm = (ids == self.image_token_id).long() if mm is None else mm[0].long()
            return EncodedPrompt(ids, mm, enc.get("pixel_values"), enc.get("image_grid_thw"))
        pv = grid = None
        pads: list[int] = []
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            pv, grid = vis["pixel_values"], vis["image_grid_thw"]
            merge = int(getattr(self.image_processor, "merge_size", 2))
            pads = [int(g.prod()) // merge ** 2 for g in grid]
        text = self.prompt_text(sample.messages, pads)
        ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        n_img = int((ids == self.image_token_id).sum())
        if n_img != sum(pads):
            raise ValueError(f"sample {getattr(sample, 'id', '?')!r}: {n_img} image tokens in the prompt but "
                             f"{sum(pads)} image features: does the text contain '{IMAGE_TOKEN}'?")
        return EncodedPrompt(ids, (ids == self.image_token_id).long(), pv, grid)

    def collate(self, prompts: Sequence[EncodedPrompt], padding_side: str = "left",
                device=None) -> dict:
        """Model inputs of a batch of prompts: input_ids, attention_mask, mm_token_type_ids
        [R, P_max] padded on ``padding_side``, pixel_values / image_grid_thw concatenated in
        row order (absent when no prompt has images)."""
        return collate_prompts(prompts, self.pad_token_id, padding_side, device)


def collate_prompts(prompts: Sequence[EncodedPrompt], pad_token_id: int, padding_side: str = "left",
                    device=None) -> dict:
    """See :meth:`PromptEncoder.collate`."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not prompts:
        raise ValueError("prompts is empty")
    P = max(len(p) for p in prompts)
    R = len(prompts)
    ids = torch.full((R, P), int(pad_token_id), dtype=torch.long)
    att = torch.zeros((R, P), dtype=torch.long)
    mm = torch.zeros((R, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p)
        sl = slice(P - n, P) if padding_side == "left" else slice(0, n)
        ids[i, sl] = p.input_ids
        att[i, sl] = 1
        mm[i, sl] = p.mm_token_type_ids
    out = {"input_ids": ids, "attention_mask": att, "mm_token_type_ids": mm}
    pvs = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pvs:
        out["pixel_values"] = torch.cat(pvs, 0)
        out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in prompts if p.image_grid_thw is not None], 0)
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
