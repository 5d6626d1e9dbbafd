"""Tensors of the trainer: prompt + response rows -> model inputs -> response log-probs.

A row is an encoded prompt (:class:`mars.rollout.encode.EncodedPrompt`) and the response
token ids generated from it. A batch of rows is laid out as

    [ left-padded prompt (P) | response, right-padded (T) ]

so the response token t of every row sits at column P + t and is predicted by the hidden
state at column P + t - 1 (``mars.hf_model.response_lm_inputs`` takes the last T).
``mm_token_type_ids`` is 0 over the response (text), as the rope index expects.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mars.hf_model import LMHeadInputs, response_lm_inputs
from mars.rollout.encode import EncodedPrompt, collate_prompts

__all__ = ["collate_rows", "response_inputs", "logits_logprobs", "row_logprobs"]


def collate_rows(prompts: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], pad_token_id: int,
                 device=None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model inputs, response ids [B, T], response mask [B, T] bool) of the rows."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    enc = collate_prompts(prompts, pad_token_id, "left")
    B = len(prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, r in enumerate(responses):
        if len(r):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = True
    inputs = {
        "input_ids": torch.cat([enc["input_ids"], ids], 1),
        "attention_mask": torch.cat([enc["attention_mask"], mask.long()], 1),
        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(ids)], 1),
    }
    for k in ("pixel_values", "image_grid_thw"):
        if k in enc:
            inputs[k] = enc[k]
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids, mask = ids.to(device), mask.to(device)
    return inputs, ids, mask


def response_inputs(model, inputs: dict, T: int) -> LMHeadInputs:
    """Final hidden states of the T response positions (and the lm-head parameters):
    what both the plain and the fused loss start from."""
    inputs = dict(inputs)
    input_ids = inputs.pop("input_ids")
    attention_mask = inputs.pop("attention_mask")
    return response_lm_inputs(model, input_ids, attention_mask, response_length=T, **inputs)


def logits_logprobs(x: LMHeadInputs, temperature: float) -> torch.Tensor:
    """[B, T] log-probs of x.ids from materialised logits (the non-fused path), fp32."""
    logits = torch.nn.functional.linear(x.hidden, x.weight, x.bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, x.ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def row_logprobs(model, prompts, responses, pad_token_id: int, *, temperature: float, micro_batch_size: int,
                 device, chunk_size=None) -> list[torch.Tensor]:
    """Per-row [L_i] fp32 log-probs of the responses under ``model`` (no gradient), computed
    micro-batch by micro-batch through ``mars.loss.token_logprobs`` (chunked lm head)."""
    from mars.loss import token_logprobs

    out: list[torch.Tensor] = []
    for b in range(0, len(prompts), micro_batch_size):
        ps, rs = prompts[b:b + micro_batch_size], responses[b:b + micro_batch_size]
        inputs, ids, mask = collate_rows(ps, rs, pad_token_id, device)
        x = response_inputs(model, inputs, ids.shape[1])
        lp = token_logprobs(x.hidden, x.weight, ids, bias=x.bias, temperature=temperature, mask=mask,
                            chunk_size=chunk_size)
        out += [lp[i, :len(r)].float().cpu() for i, r in enumerate(rs)]
    return out
