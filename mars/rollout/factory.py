"""The trainer's engine factory: ``rollout.engine`` -> a RolloutEngine around the policy.

    engine = build_rollout_engine("hf", policy, max_batch_rows=64)
    engine = build_rollout_engine("vllm", policy, max_batch_rows=64, gpu_memory_utilization=0.3,
                                  enable_sleep_mode=True, max_model_len=4096, limit_mm_per_prompt=6, seed=0)

``policy``: anything with ``model``, ``tokenizer``, ``processor`` and ``image_processor``
attributes (``mars.train.policy.Policy``; processor or tokenizer + image_processor may be
None as there). (``mars.rollout.build_engine`` is the evaluation loader: a checkpoint
path -> an engine.)
"""

from __future__ import annotations

from .base import RolloutEngine
from .hf import HFEngine
from .vllm import VLLMEngine

__all__ = ["build_rollout_engine", "ENGINES"]

ENGINES = ("hf", "vllm")
HF_OPTIONS = ("max_batch_rows", "batch_size", "system")


def build_rollout_engine(name: str, policy, **options) -> RolloutEngine:
    """The engine ``name`` generating with ``policy``'s weights.

    "hf": ``HFEngine(policy.model, policy.processor, tokenizer=, image_processor=,
    **options)``: generates with the trained model object itself; options
    max_batch_rows, batch_size, system.

    "vllm": ``VLLMEngine.colocated(policy.model, processor=, tokenizer=,
    image_processor=, **options)``: a colocated vLLM that receives the weights after
    every optimizer step; ``max_batch_rows`` becomes vLLM's ``max_num_seqs`` (the most
    sequences it runs at once), the other options are ``colocated``'s
    (gpu_memory_utilization, enable_sleep_mode, sleep_level, max_model_len,
    limit_mm_per_prompt, seed, dtype, model_path, ...).

    Raises ValueError for another name, TypeError for an option the engine does not
    take, ImportError (naming the ``mars[vllm]`` extra) without vLLM."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine must be one of {ENGINES}, got {name!r}")
    for attr in ("model", "tokenizer"):
        if getattr(policy, attr, None) is None:
            raise TypeError(f"policy has no {attr}: expected an object with model, tokenizer, processor and "
                            f"image_processor attributes, got {type(policy).__name__}")
    processor = getattr(policy, "processor", None)
    image_processor = getattr(policy, "image_processor", None)
    if name == "hf":
        unknown = sorted(set(options) - set(HF_OPTIONS))
        if unknown:
            raise TypeError(f"rollout.engine=hf does not take {unknown} (options: {list(HF_OPTIONS)})")
        return HFEngine(policy.model, processor, tokenizer=policy.tokenizer, image_processor=image_processor,
                        **options)
    options = dict(options)
    rows = options.pop("max_batch_rows", None)
    if rows is not None:
        if "max_num_seqs" in options and options["max_num_seqs"] != rows:
            raise TypeError(f"max_batch_rows={rows} and max_num_seqs={options['max_num_seqs']} disagree: pass one")
        options["max_num_seqs"] = rows
    return VLLMEngine.colocated(policy.model, processor=processor, tokenizer=policy.tokenizer,
                                image_processor=image_processor, **options)
