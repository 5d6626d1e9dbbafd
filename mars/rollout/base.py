"""The interface every generation backend implements.

An engine turns multi-source samples (anything with ``messages`` and ``images``, e.g.
:class:`mars.data.Sample` and its mono variants) into completions. The method a training
backend writes is ``generate_ids``: a list of requests, each a sample with its own
decoding settings, answered in **one** call (so a trainer can put the G sampled rollouts
and the greedy mono anchors of a step into a single batch):

    out = engine.generate_ids([GenerationRequest(s, SamplingConfig(temperature=1.0, top_p=0.9, n=8)),
                               GenerationRequest(s.mono(0), SamplingConfig())])   # greedy
    out[0][j].token_ids, out[0][j].logprobs, out[0][j].text, out[0][j].finish_reason

A trainer trains on ``token_ids`` (never on re-tokenised ``text``). ``logprobs`` are the
engine's per-token log-probs of the chosen tokens under the sampling temperature (before
top-p), or None where the engine has none. ``generate(samples, config)`` (texts only, as
``mars eval`` uses it) is derived from ``generate_ids``; an engine only evaluated may
write ``generate`` alone instead (a subclass must override at least one of the two).

``update_weights(model)`` is the hook a trainer calls after each optimizer step: an engine
that shares the trained model object (``HFEngine``) has nothing to do; one holding its own
copy of the weights (vLLM) loads them there.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["SamplingConfig", "GenerationRequest", "Completion", "RolloutEngine", "require"]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. temperature 0 means greedy (then n must be 1)."""

    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0 (greedy decoding gives n identical completions)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt of a ``generate_ids`` call: ``sample`` (messages + images) decoded with
    ``config`` (``config.n`` completions). ``prompt``: an already encoded prompt
    (:class:`mars.rollout.encode.EncodedPrompt`) an engine may use instead of encoding
    ``sample`` again (the HF engine does; it must be the encoding of ``sample``)."""

    sample: Any
    config: SamplingConfig = SamplingConfig()
    prompt: Any = None


@dataclass
class Completion:
    """One generated response.

    token_ids: the generated ids, the end-of-sequence token included when one was
        generated (then ``finish_reason`` is "stop"; "length" when max_new_tokens was hit).
    text: ``token_ids`` decoded without special tokens.
    logprobs: per-token log-probs of ``token_ids`` under the sampling distribution at the
        request's temperature (before top-p), or None when the engine has none.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: str = "stop"


class RolloutEngine(ABC):
    """Backend-neutral generation. ``batch_size``: how many samples a caller should pass
    per ``generate`` call for good throughput (progress bars update between calls)."""

    batch_size: int = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.generate_ids is RolloutEngine.generate_ids and cls.generate is RolloutEngine.generate:
            raise TypeError(f"{cls.__name__} must implement generate_ids (token ids, for training) "
                            "or generate (texts, for evaluation)")

    def generate_ids(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """``requests[i].config.n`` completions for each request, in request order, from
        as few underlying generation calls as the backend allows."""
        raise NotImplementedError(f"{type(self).__name__} returns texts only (generate), "
                                  "not token ids: it cannot be used for training")

    def generate(self, samples: Sequence, config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
        """Completion texts, ``config.n`` per sample, in input order."""
        out = self.generate_ids([GenerationRequest(s, config) for s in samples])
        return [[c.text for c in cs] for cs in out]

    def update_weights(self, model) -> None:
        """Called by a trainer after each optimizer step of ``model``. Engines that
        generate with that same model object need nothing (the default)."""


def require(module: str, extra: str):
    """Import ``module`` or raise ImportError saying which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this backend needs {module.split('.')[0]}: pip install 'mars[{extra}]'"
        ) from exc
