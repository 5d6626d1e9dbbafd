"""Generation backends behind one interface (:class:`RolloutEngine`).

    from mars.rollout import build_engine, GenerationRequest, SamplingConfig
    engine = build_engine("/path/to/model", backend="auto")   # vLLM if installed, else HF
    engine.generate(samples, SamplingConfig(max_new_tokens=512))  # -> list[list[str]]
    engine.generate_ids([GenerationRequest(s, SamplingConfig(temperature=1.0, n=8)), ...])
                                                                 # -> list[list[Completion]]

    # training: the engine around the trained policy (rollout.engine = "hf" | "vllm")
    from mars.rollout import build_rollout_engine
    engine = build_rollout_engine("vllm", policy, gpu_memory_utilization=0.3, max_batch_rows=64)
"""

from __future__ import annotations

import importlib.util

from .base import Completion, GenerationRequest, RolloutEngine, SamplingConfig
from .encode import EncodedPrompt, PromptEncoder
from .factory import ENGINES, build_rollout_engine
from .hf import HFEngine
from .vllm import RolloutOutOfMemoryError, VLLMEngine

__all__ = ["RolloutEngine", "SamplingConfig", "GenerationRequest", "Completion", "EncodedPrompt",
           "PromptEncoder", "HFEngine", "VLLMEngine", "build_engine", "BACKENDS", "build_rollout_engine",
           "ENGINES", "RolloutOutOfMemoryError"]

BACKENDS = ("auto", "hf", "vllm")


def build_engine(model, backend: str = "auto", **kwargs) -> RolloutEngine:
    """An engine for ``model``: a RolloutEngine is returned as is; a path is loaded with
    ``backend`` ("vllm", "hf", or "auto": vLLM when it is installed, else HF). kwargs go
    to the engine's ``from_pretrained``."""
    if isinstance(model, RolloutEngine):
        return model
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, str):
        raise TypeError(
            f"model must be a checkpoint path or a RolloutEngine, got {type(model).__name__}; "
            "wrap a loaded HF model with mars.rollout.HFEngine(model, processor)"
        )
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    if backend == "vllm":
        return VLLMEngine.from_pretrained(model, **kwargs)
    return HFEngine.from_pretrained(model, **kwargs)
