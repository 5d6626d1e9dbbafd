"""The policy: the model the trainer builds (tiny or a checkpoint), the rollout engine's
options for it, and what the update trains (``distributed.wrap_model``)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from . import distributed
from . import task as embedded
from .config import TINY, ConfigError, TrainConfig

__all__ = ["Policy", "build_policy", "engine_options", "model_load_kwargs", "max_positions", "frozen_copy",
           "training_model", "resolve_device"]


@dataclass
class Policy:
    model: Any
    tokenizer: Any
    processor: Any = None
    image_processor: Any = None


def max_positions(model) -> int | None:
    """The text model's ``max_position_embeddings`` (None when the config has none)."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def engine_options(cfg: TrainConfig, model=None) -> dict:
    """``build_rollout_engine``'s options for ``cfg.rollout.engine`` (docs/vllm.md).
    vLLM's max_model_len: rollout.vllm.max_model_len, else rollout.max_prompt_length +
    rollout.max_new_tokens capped at ``model``'s max_position_embeddings (vLLM refuses more)."""
    r = cfg.rollout
    if r.engine == "hf":
        return {"max_batch_rows": r.max_batch_rows}
    v = r.vllm
    max_len = v.max_model_len
    if max_len is None:
        max_len = r.max_prompt_length + r.max_new_tokens
        if (positions := max_positions(model)) is not None:
            max_len = min(max_len, positions)
    return dict(max_batch_rows=r.max_batch_rows, gpu_memory_utilization=v.gpu_memory_utilization,
                enable_sleep_mode=v.enable_sleep_mode, sleep_level=v.sleep_level,
                max_model_len=max_len,
                limit_mm_per_prompt=v.max_images, seed=cfg.seed, enforce_eager=v.enforce_eager,
                logprobs_mode=v.logprobs_mode, model_path=None if cfg.model.path == TINY else cfg.model.path)


def build_policy(cfg: TrainConfig, device) -> Policy:
    """The tiny model built locally (model.path = "tiny") or a checkpoint loaded with
    AutoModelForImageTextToText + AutoProcessor (local directory or hub name)."""
    if cfg.model.path == TINY:
        from .tiny import build_tiny

        t = cfg.model.tiny
        model, tok, improc = build_tiny(embedded.VOCAB, arch=t.arch, hidden_size=t.hidden_size,
                                        num_layers=t.num_layers, num_heads=t.num_heads,
                                        vision_hidden_size=t.vision_hidden_size, vision_depth=t.vision_depth,
                                        image_size=cfg.task.image_size, seed=cfg.seed)
        model = model.to(device=device, dtype=_dtype(cfg.model.dtype) or torch.float32)
        policy = Policy(model, tok, None, improc)
    else:
        from transformers import AutoModelForImageTextToText

        from mars.rollout.hf import load_processor

        try:
            model = AutoModelForImageTextToText.from_pretrained(cfg.model.path, **model_load_kwargs(cfg, device))
            processor, tok, improc = load_processor(cfg.model.path)
        except (OSError, ValueError) as exc:  # not a model directory / hub name, unreadable files, unknown config
            raise ConfigError(f"model.path: cannot load a model and processor from {cfg.model.path!r}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        model = model.to(device)
        policy = Policy(model, tok if processor is None else processor.tokenizer, processor, improc)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return policy


def model_load_kwargs(cfg: TrainConfig, device) -> dict:
    """from_pretrained keywords: dtype and attention implementation (flash_attention_2
    when flash-attn is installed and the device is a GPU, else sdpa, for "auto")."""
    import importlib.util

    attn = cfg.model.attn_implementation
    if attn == "auto":
        on_gpu = torch.device(device).type == "cuda"
        attn = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    return {"dtype": _dtype(cfg.model.dtype) or "auto", "attn_implementation": attn}


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def resolve_device(name: str) -> torch.device:
    """``model.device``: "auto" is cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def frozen_copy(model):
    """A copy of ``model`` in eval mode without gradients (the reference model of loss.kl_coef)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def training_model(model, info, cfg: TrainConfig):
    """What the update trains (``distributed.wrap_model``): ``model`` for one process; DDP
    around it (sharing its parameters); FSDP2 around a copy (``model`` stays the full
    weights that generate and are saved)."""
    if not info.distributed:
        return model
    src = model
    if cfg.dist.strategy == "fsdp2":
        src = copy.deepcopy(model)
        # ResponseModel returns the lm head's weight as a view (so it is in the graph); nothing here
        # modifies it in place, which is what this per-forward warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return distributed.wrap_model(src, info, cfg.dist.strategy, find_unused_parameters=cfg.dist.find_unused_parameters)
