"""Reward registry: ``@register_reward(name)``, ``get_reward(name)`` and the batched form.

A reward function takes ``(completion: str, ground_truth)`` and returns a float or a
:class:`RewardBreakdown`. Registering wraps it in a :class:`RewardFunction`, which is
called exactly like the original (``fn(completion, ground_truth) -> float``) and adds

* ``.breakdown(completion, ground_truth) -> RewardBreakdown`` (format / accuracy / status),
* ``.batch(completions, ground_truths, sample_ids=None) -> list[float]``: a reward that
  raises (or returns a non-finite number) on one sample is reported with that sample's id
  in a :class:`RewardFunctionWarning` and counted as 0; the run goes on.

The single-sample call never hides an error: it raises.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "RewardBreakdown",
    "RewardFunction",
    "RewardFunctionWarning",
    "register_reward",
    "get_reward",
    "list_rewards",
    "compute_rewards",
]


class RewardFunctionWarning(UserWarning):
    """A reward function failed on one sample of a batch; that sample got reward 0."""


@dataclass(frozen=True)
class RewardBreakdown:
    """One reward split into its parts, for logging.

    format: the format part (tags, json block).
    accuracy: the task part (IoU score or answer correctness).
    parse_status: "ok" when the answer could be read; otherwise why not
        ("missing_answer", "empty_answer", "no_json", "bad_json", "bad_boxes", "error: ...").
    details: task-specific extras (e.g. n_pred, n_gt, matched IoUs, normalised answer).
    """

    format: float
    accuracy: float
    parse_status: str = "ok"
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """format + accuracy: the reward."""
        return float(self.format) + float(self.accuracy)

    def __float__(self) -> float:
        return self.total

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable when details are)."""
        return {
            "reward": self.total,
            "format": float(self.format),
            "accuracy": float(self.accuracy),
            "parse_status": self.parse_status,
            "details": dict(self.details),
        }


def _as_breakdown(value: Any, name: str) -> RewardBreakdown:
    if isinstance(value, RewardBreakdown):
        out = value
    else:
        try:
            accuracy = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"reward {name!r} returned {type(value).__name__}; expected a float or RewardBreakdown"
            ) from None
        out = RewardBreakdown(format=0.0, accuracy=accuracy)
    if not (math.isfinite(out.format) and math.isfinite(out.accuracy)):
        raise ValueError(
            f"reward {name!r} returned a non-finite value (format={out.format}, accuracy={out.accuracy})"
        )
    return out


class RewardFunction:
    """A registered reward: callable as ``fn(completion, ground_truth) -> float``.

    name: registry name.
    fn: the user's function, returning a float or a RewardBreakdown.
    max_reward: documented maximum, a float or ``callable(ground_truth) -> float`` (or None).
    """

    def __init__(self, name: str, fn: Callable[..., Any], max_reward: float | Callable[[Any], float] | None = None):
        self.name = name
        self.fn = fn
        self._max_reward = max_reward
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"RewardFunction({self.name!r})"

    def breakdown(self, completion: str, ground_truth: Any) -> RewardBreakdown:
        """Score one completion; raises whatever the function raises."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return _as_breakdown(self.fn(completion, ground_truth), self.name)

    def __call__(self, completion: str, ground_truth: Any) -> float:
        return self.breakdown(completion, ground_truth).total

    def max_reward(self, ground_truth: Any = None) -> float | None:
        """Documented maximum of this reward for ``ground_truth`` (None if undocumented)."""
        if callable(self._max_reward):
            return float(self._max_reward(ground_truth))
        return None if self._max_reward is None else float(self._max_reward)

    def batch(
        self,
        completions: Sequence[str],
        ground_truths: Sequence[Any],
        sample_ids: Sequence[Any] | None = None,
        *,
        return_breakdowns: bool = False,
    ) -> list:
        """Score a batch. Returns a list of floats (or RewardBreakdowns).

        A sample whose reward raises or is non-finite is reported in a
        RewardFunctionWarning naming its id (its index when ``sample_ids`` is None) and
        scored 0 with ``parse_status = "error: <ExceptionType>: <message>"``.
        """
        n = len(completions)
        if len(ground_truths) != n:
            raise ValueError(
                f"completions ({n}) and ground_truths ({len(ground_truths)}) differ in length"
            )
        if sample_ids is not None and len(sample_ids) != n:
            raise ValueError(f"sample_ids ({len(sample_ids)}) and completions ({n}) differ in length")
        out = []
        for i in range(n):
            sid = i if sample_ids is None else sample_ids[i]
            try:
                b = self.breakdown(completions[i], ground_truths[i])
            except Exception as exc:  # reported, never silent
                msg = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"reward {self.name!r} failed on sample {sid!r} ({msg}); counted as reward 0",
                    RewardFunctionWarning,
                    stacklevel=2,
                )
                b = RewardBreakdown(0.0, 0.0, f"error: {msg}", {"sample_id": sid})
            out.append(b if return_breakdowns else b.total)
        return out


_REGISTRY: dict[str, RewardFunction] = {}


def register_reward(name: str, *, max_reward=None, overwrite: bool = False):
    """Decorator registering ``fn(completion, ground_truth) -> float | RewardBreakdown``.

    ``@register_reward("my_task")`` makes ``get_reward("my_task")`` return it. Registering
    a taken name raises ValueError unless ``overwrite=True``. Returns the RewardFunction
    wrapper (callable with the same arguments, returning a float).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")

    def deco(fn: Callable[..., Any]) -> RewardFunction:
        if not callable(fn):
            raise TypeError(f"@register_reward({name!r}) needs a callable, got {type(fn).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"a reward named {name!r} is already registered; pass overwrite=True to replace it"
            )
        rf = RewardFunction(name, fn, max_reward)
        _REGISTRY[name] = rf
        return rf

    return deco


def get_reward(name: str) -> RewardFunction:
    """The registered reward ``name``; ValueError listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_rewards() -> list[str]:
    """Names of all registered rewards, sorted."""
    return sorted(_REGISTRY)


def compute_rewards(reward, completions, ground_truths, sample_ids=None, *, return_breakdowns=False) -> list:
    """Batched scoring with a registered name, a RewardFunction or a plain callable.

    Same failure policy as :meth:`RewardFunction.batch`.
    """
    if isinstance(reward, str):
        rf = get_reward(reward)
    elif isinstance(reward, RewardFunction):
        rf = reward
    elif callable(reward):
        rf = RewardFunction(getattr(reward, "__name__", "custom"), reward)
    else:
        raise TypeError(f"reward must be a name, RewardFunction or callable, got {type(reward).__name__}")
    return rf.batch(completions, ground_truths, sample_ids, return_breakdowns=return_breakdowns)
