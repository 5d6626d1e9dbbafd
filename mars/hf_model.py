"""Hugging Face models -> the inputs of the fused lm-head loss (docs/loss.md).

A causal LM (`*ForCausalLM`) or VLM (`Qwen2VLForConditionalGeneration`, ...) computes
logits = lm_head(final_hidden). The fused loss wants the final hidden states and the
lm-head weight instead, so the [tokens x vocab] logits are never built:

    from mars.hf_model import response_lm_inputs
    x = response_lm_inputs(model, input_ids, attention_mask, response_length=T,
                           pixel_values=..., image_grid_thw=...)   # any extra model inputs
    out = mars.loss.fused_linear_policy_loss(x.hidden, x.weight, x.ids, old_logp, adv,
                                             x.mask, bias=x.bias, temperature=1.0)

Tied embeddings need nothing special: the lm head's weight *is* the embedding Parameter,
so its gradient lands on the shared Parameter. Models that transform logits after the
head (Gemma-2's soft-capping, Cohere's logit_scale, Granite's logits_scaling) are
refused: the fused loss would compute other numbers than the model.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["lm_head_parameters", "final_hidden_states", "response_lm_inputs", "LMHeadInputs"]


class LMHeadInputs(NamedTuple):
    """hidden [B, T, H] (position t predicts ids[:, t]), weight [V, H], bias [V] or None,
    ids [B, T], mask [B, T] or None (the attention mask of the response tokens)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    ids: torch.Tensor
    mask: torch.Tensor | None


def _config(model):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", None) or cfg


def lm_head_parameters(model):
    """(weight [V, H], bias [V] or None) of the model's output layer; the embedding matrix
    when the model ties its word embeddings and exposes no separate head."""
    cfg = _config(model)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        v = getattr(cfg, name, None)
        if v not in (None, 1, 1.0):
            raise ValueError(f"the model's config sets {name}={v!r}: its logits are not "
                             "hidden @ W^T, so the fused lm-head loss does not apply")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        tied = getattr(model.config, "tie_word_embeddings", False) or \
            getattr(cfg, "tie_word_embeddings", False)
        if tied and hasattr(model, "get_input_embeddings"):
            return model.get_input_embeddings().weight, None
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm head)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the lm head of {type(model).__name__} is not a linear layer: {head!r}")
    return weight, getattr(head, "bias", None)


def _base_model(model):
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no base model under "
                         f"base_model_prefix={prefix!r}: pass the *ForCausalLM / "
                         "*ForConditionalGeneration model")
    return base


def final_hidden_states(model, **model_inputs) -> torch.Tensor:
    """The hidden states the lm head reads ([B, S, H], after the final norm): the base
    model's last_hidden_state, computed without the head (no logits at all). Takes the
    same keyword inputs as the model (input_ids, attention_mask, pixel_values,
    image_grid_thw, ...)."""
    model_inputs.setdefault("use_cache", False)
    out = _base_model(model)(**model_inputs, return_dict=True)
    hidden = getattr(out, "last_hidden_state", None)
    return out[0] if hidden is None else hidden


def response_lm_inputs(model, input_ids, attention_mask=None, *, response_length=None,
                       **model_inputs) -> LMHeadInputs:
    """Hidden states, head parameters, ids and mask of the last `response_length` tokens of
    `input_ids` [B, S] (all but the first token when None), shifted as a causal LM predicts:
    hidden[:, t] is the state at position S - T - 1 + t, which predicts input_ids[:, S - T + t].
    Extra keyword arguments go to the model (e.g. pixel_values, image_grid_thw)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a [B, S] tensor")
    S = input_ids.shape[1]
    T = S - 1 if response_length is None else int(response_length)
    if not 1 <= T <= S - 1:
        raise ValueError(f"response_length must be in [1, S - 1] = [1, {S - 1}], got {T}")
    if attention_mask is not None:
        model_inputs["attention_mask"] = attention_mask
    hidden = final_hidden_states(model, input_ids=input_ids, **model_inputs)
    weight, bias = lm_head_parameters(model)
    mask = None if attention_mask is None else attention_mask[:, S - T:]
    return LMHeadInputs(hidden[:, S - T - 1:S - 1], weight, bias, input_ids[:, S - T:], mask)
