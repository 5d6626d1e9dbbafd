"""The supervised warm start (cold start) before RL: teaches the answer format (docs/train.md)."""

from __future__ import annotations

import json
import random

import torch

from . import distributed
from . import task as embedded
from .batch import collate_rows, logits_logprobs, response_inputs
from .config import EMBEDDED, TrainConfig
from .progress import RunProgress

__all__ = ["warm_start", "warmup_target", "rl_step_cost_ratio"]


def warm_start(policy, encoder, cfg: TrainConfig, task, prompts, device, stop=None, progress=None) -> None:
    """Supervised fine-tuning on responses in the answer format (the cold start):
    ``<think> ... </think> <answer> ANSWER </answer>`` + end of turn, token-mean
    cross-entropy, AdamW at warmup.lr. Embedded task: a warmup.single_share of the prompts
    show one source alone (answered with what it shows), the others both sources of a
    scene of warmup.categories (answered with the truth) or of warmup.unsure (answered
    yes or no at random); first a warmup.night_share of them ask ``is it night ?`` of an
    RGB image alone; warmup.label_noise of the other answers flipped. File data: the training prompts with their ground truth.
    stop: a faults.StopSignals; after a signal the warm start raises faults.Interrupted.
    progress: the run's :class:`RunProgress` (None: a bar of its own)."""
    w = cfg.warmup
    model = policy.model
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr)
    rng = random.Random(cfg.seed + 1)
    eos = encoder.tokenizer.eos_token_id
    cats = (w.categories or [c for c, v in cfg.task.mix.items() if v > 0]) + list(w.unsure)
    model.train()
    own = progress is None
    if own:
        progress = RunProgress(w.steps, 0, enabled=cfg.log.progress and distributed.current().is_main)
    for step in range(w.steps):
        samples = []
        for i in range(w.batch_size):
            if cfg.data.train != EMBEDDED:
                samples.append(prompts.peek_random(1, rng)[0][1])
            elif w.night_share and rng.random() < w.night_share:
                both = bool(w.night_both) and rng.random() < w.night_both
                samples.append(task.night_question(task.sample(step * w.batch_size + i, "warmup-night"), both))
            elif rng.random() < w.single_share:
                s = task.sample(step * w.batch_size + i, "warmup-single")
                samples.append(task.single_source(s, rng.randrange(len(embedded.SOURCES))))
            else:
                samples.append(task.sample(step * w.batch_size + i, "warmup",
                                           category=cats[rng.randrange(len(cats))]))
        targets = [warmup_target(s, rng, _warm_noise(s, w)) for s in samples]
        ids = [encoder.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in targets]
        inputs, rid, mask = collate_rows([encoder.encode(s) for s in samples], ids, encoder.pad_token_id, device)
        x = response_inputs(model, inputs, rid.shape[1])
        logp = logits_logprobs(x, 1.0)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        progress.warm_step(loss=f"{loss.item():.3f}")
        if stop is not None:
            stop.check(0, None)
    if own:
        progress.close()


def _warm_noise(sample, w) -> float:
    """Share of flipped answers of one warm-start sample: 0.5 for a two-source scene of
    warmup.unsure, none for the night question (perception taught as it is), else
    warmup.label_noise."""
    info = sample.extra_info or {}
    if info.get("question") == "night":
        return 0.0
    if info.get("category") in w.unsure and "source" not in info:
        return 0.5
    return w.label_noise


def rl_step_cost_ratio(cfg: TrainConfig) -> float:
    """Guess of (RL-step time) / (warm-step time) for the ETA before an RL step is timed:
    the rows an RL step generates (G per prompt, plus one anchor per source) decode
    token by token, then pass twice more (old log-probs, update); a warm step passes its
    batch once, forward and backward. Measured on the embedded default (2-core CPU): about
    14 (0.085 s per warm-start step, 1.2 s per RL step with its evaluations)."""
    sources = 0 if cfg.rollout.mono == "none" else 2
    rows = cfg.optim.prompts_per_step * (cfg.rollout.n + sources)
    return max(1.0, rows / max(cfg.warmup.batch_size, 1) * 1.4)


def warmup_target(sample, rng: random.Random, label_noise: float = 0.0) -> str:
    """The warm-start response of ``sample``: the embedded task's format with its answer
    (flipped with probability label_noise), else ``<think> </think> <answer> GROUND TRUTH
    </answer>`` (a json block of the boxes for grounding)."""
    from mars.rewards.tags import unwrap_answer

    if sample.data_source == "embedded":
        answer = sample.ground_truth
        if label_noise and rng.random() < label_noise:
            answer = next(a for a in embedded.ANSWERS if a != answer)
        return embedded.response_text(answer)
    gt = unwrap_answer(sample.ground_truth)
    if sample.task == "grounding":
        gt = "```json\n" + json.dumps([{"bbox_2d": b} for b in gt]) + "\n```"
    return f"<think> </think> <answer> {gt} </answer>"
