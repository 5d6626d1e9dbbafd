"""Step 1 of an RL step: prompts in, responses out (docs/train.md).

``PromptSource`` draws the training prompts (``heldout_samples``: the held-out ones),
``encode_prompts`` encodes them, and ``generate_rollouts`` asks the engine for G sampled
responses per prompt and one greedy anchor per source, each a :class:`Rollout` labelled
by its prompt id. Scoring and advantages are the next module's (advantages.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from mars.rollout import Completion, GenerationRequest, SamplingConfig
from mars.rollout.encode import EncodedPrompt

from .config import EMBEDDED, TrainConfig
from .timer import PhaseTimer

__all__ = ["Rollout", "PromptSource", "heldout_samples", "encode_prompts", "generate_rollouts"]


@dataclass
class Rollout:
    """One generated response. ``group``: its prompt's id (the advantage group label);
    ``anchor``: a mono-source anchor of source ``source`` (not trained on)."""
    group: str
    uid: str
    sample: Any
    prompt: EncodedPrompt
    completion: Completion
    anchor: bool = False
    source: int | None = None
    reward: float = 0.0
    accuracy: float = 0.0
    format: float = 0.0
    error: str | None = None


class PromptSource:
    """Training prompts: the embedded task's stream, or a data file in shuffled epochs.
    ``next(n)`` -> [(group label, sample)]; labels are unique within a run."""

    def __init__(self, cfg: TrainConfig, task):
        self.cfg, self.task, self.cursor = cfg, task, 0
        self.samples = None
        if cfg.data.train != EMBEDDED:
            from mars.data import load_samples

            self.samples = load_samples(cfg.data.train, image_root=cfg.data.image_root, task=cfg.data.task)
            if not self.samples:
                raise ValueError(f"data.train: {cfg.data.train} has no samples")

    def _at(self, i: int):
        if self.samples is None:
            return self.task.sample(i, "train")
        n = len(self.samples)
        epoch, j = divmod(i, n)
        if self.cfg.data.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch))
            j = int(perm[j])
        return self.samples[j]

    def next(self, n: int):
        out = [(f"p{self.cursor + i}:{self._at(self.cursor + i).id}", self._at(self.cursor + i)) for i in range(n)]
        self.cursor += n
        return out

    def peek_random(self, n: int, rng: random.Random):
        size = len(self.samples) if self.samples is not None else 10 ** 6
        return [(None, self._at(rng.randrange(size))) for _ in range(n)]


def heldout_samples(cfg: TrainConfig, task):
    """The held-out samples of data.eval (the embedded task's balanced set or a data file),
    cut to data.eval_limit; [] without data.eval."""
    if cfg.data.eval is None:
        return []
    if cfg.data.eval == EMBEDDED:
        s = task.balanced(cfg.task.eval_per_category, "eval")
    else:
        from mars.data import load_samples

        s = load_samples(cfg.data.eval, image_root=cfg.data.image_root, task=cfg.data.task)
    return s[:cfg.data.eval_limit] if cfg.data.eval_limit is not None else s


def encode_prompts(encoder, drawn, cfg: TrainConfig):
    """[(group, sample, EncodedPrompt)] of the drawn prompts; prompts over
    rollout.max_prompt_length tokens are skipped (returned count)."""
    out, skipped = [], 0
    for group, sample in drawn:
        p = encoder.encode(sample)
        if len(p) > cfg.rollout.max_prompt_length:
            skipped += 1
            continue
        out.append((group, sample, p))
    return out, skipped


def generate_rollouts(engine, drawn, cfg: TrainConfig, timer: PhaseTimer) -> list[Rollout]:
    """G sampled rollouts per prompt and, unless rollout.mono is "none", one greedy anchor
    per source (its mono variant), in one generate_ids call (two with
    rollout.separate_anchor_call)."""
    r = cfg.rollout
    sampled = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, n=r.n)
    greedy = SamplingConfig(max_new_tokens=r.max_new_tokens)
    multi = [GenerationRequest(s, sampled, p) for _, s, p in drawn]
    mono, mono_meta = [], []
    if r.mono != "none":
        for g, s, _ in drawn:
            for k, v in enumerate(s.mono_variants(r.mono)):
                mono.append(GenerationRequest(v, greedy))
                mono_meta.append((g, k))
    with timer("generate"):
        if r.separate_anchor_call:
            with timer("generate_multi"):
                out = engine.generate_ids(multi)
            with timer("generate_mono"):
                out += engine.generate_ids(mono) if mono else []
        else:
            out = engine.generate_ids(multi + mono)
    rows = []
    for (g, s, p), cs in zip(drawn, out[:len(multi)]):
        rows += [Rollout(g, f"{g}/r{j}", s, p, c) for j, c in enumerate(cs)]
    for (g, k), req, cs in zip(mono_meta, mono, out[len(multi):]):
        rows.append(Rollout(g, f"{g}/mono{k}", req.sample, None, cs[0], anchor=True, source=k))
    return rows
