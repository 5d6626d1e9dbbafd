"""The interface every generation backend implements.

An engine turns multi-source samples (anything with ``messages`` and ``images``, e.g.
:class:`mars.data.Sample` and its mono variants) into completions:

    engine.generate(samples, SamplingConfig(max_new_tokens=512)) -> list[list[str]]

one inner list of ``config.n`` completions per sample, in input order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

__all__ = ["SamplingConfig", "RolloutEngine", "require"]


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


class RolloutEngine(ABC):
    """Backend-neutral generation. ``batch_size``: how many samples a caller should pass
    per ``generate`` call for good throughput (progress bars update between calls)."""

    batch_size: int = 1

    @abstractmethod
    def generate(self, samples: Sequence, config: SamplingConfig = SamplingConfig()) -> list[list[str]]:
        """Completions, ``config.n`` per sample, in input order."""


def require(module: str, extra: str):
    """Import ``module`` or raise ImportError saying which extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"this backend needs {module.split('.')[0]}: pip install 'mars[{extra}]'"
        ) from exc
