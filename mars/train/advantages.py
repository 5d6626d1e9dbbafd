"""Steps 2-3 of an RL step: rewards, advantages, and the step's batch (docs/train.md).

``score_rollouts`` scores every response with the mars.rewards registry (a failing reward
scores 0 and is logged), ``compute_advantages`` runs ``mars.mono_anchored_advantage`` with
the anchors matched by prompt id, and ``collect_batch`` puts steps 1-3 together: under
DAPO's dynamic sampling it draws generation batches until the step has enough groups
with a signal (``informative_groups``).
"""

from __future__ import annotations

import json
import warnings

import torch

import mars

from . import distributed
from .config import TrainConfig
from .rollouts import Rollout, encode_prompts, generate_rollouts
from .timer import PhaseTimer

__all__ = ["collect_batch", "score_rollouts", "write_rank_errors", "compute_advantages", "informative_groups"]


def collect_batch(engine, encoder, prompts, cfg: TrainConfig, timer: PhaseTimer, errors_path: str, step: int,
                  info=None):
    """Rollouts and anchors of one step, scored, with their advantages. Under dynamic
    sampling, generation batches are drawn until ``optim.prompts_per_step`` groups carry a
    signal (pooled std > 0) or ``algorithm.max_gen_batches`` batches were drawn; the kept
    groups keep their anchors. Returns (rollouts + anchors, advantages [trained rows],
    AdvantageOutput of the trained rows, info).
    Data parallel (``info``: a ``distributed.DistInfo``; default the current process
    group): every rank draws the same prompts and generates, scores and keeps only its
    shard (``distributed.shard_prompts``); rank 0 writes every rank's reward errors; the
    informative groups are unioned so that every rank walks the same global draw order
    and stops after the same generation batch. The counts of the returned info
    (groups_kept, groups_drawn, prompts_skipped) are this rank's (they sum over ranks)."""
    info = info or distributed.current()
    want = cfg.optim.prompts_per_step
    kept: list[Rollout] = []
    n_kept = n_drawn = n_batches = 0  # n_kept: over all ranks (the stop rule); kept_here: this rank's
    kept_here = skipped = 0
    for n_batches in range(1, (cfg.algorithm.max_gen_batches if cfg.algorithm.dynamic_sampling else 1) + 1):
        with timer("generate"):  # encoding the prompts (image processing) counts as generation
            draw = prompts.next(want)
            drawn, sk = encode_prompts(encoder, distributed.shard_prompts(draw, info), cfg)
        skipped += sk
        n_drawn += len(drawn)
        rows = generate_rollouts(engine, drawn, cfg, timer)
        with timer("reward"):
            score_rollouts(rows, cfg, errors_path if info.is_main else None, step)
            write_rank_errors(rows, cfg, step, errors_path, info)
        if not cfg.algorithm.dynamic_sampling:
            kept = rows
            n_kept = kept_here = len(drawn)
            break
        with timer("advantage"):
            good = informative_groups(*compute_advantages(rows, cfg)) if rows else set()
            good = distributed.union_sets(good, info)
        mine = {p[0] for p in drawn}
        for g in [p[0] for p in draw]:  # in the global draw order, until the step is full
            if g in good and n_kept < want:
                kept += [r for r in rows if r.group == g]
                n_kept += 1
                kept_here += g in mine
        if n_kept >= want:
            break
    with timer("advantage"):
        trained = [r for r in kept if not r.anchor]
        out = None
        if trained:
            out, _ = compute_advantages(kept, cfg)
            adv = out.advantages
        else:
            adv = torch.zeros(0)
    counts = {"groups_kept": kept_here, "groups_drawn": n_drawn, "gen_batches": n_batches, "prompts_skipped": skipped}
    return kept, adv, out, counts


def score_rollouts(rows: list[Rollout], cfg: TrainConfig, errors_path: str | None = None, step: int = 0):
    """Rewards from the mars.rewards registry (reward.name, else each sample's task), plus
    DAPO's overlong shaping. A failing reward scores 0 and is written to ``errors_path``
    with its sample id."""
    from mars.rewards import get_reward

    by_name: dict[str, list[Rollout]] = {}
    for r in rows:
        by_name.setdefault(cfg.reward.name or r.sample.task, []).append(r)
    errors = []
    for name, rs in by_name.items():
        fn = get_reward(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", mars.rewards.RewardFunctionWarning)  # logged below instead
            scores = fn.batch([r.completion.text for r in rs], [r.sample.ground_truth for r in rs],
                              [r.uid for r in rs], return_breakdowns=True)
        for r, b in zip(rs, scores):
            r.reward, r.accuracy, r.format = b.total, float(b.accuracy), float(b.format)
            if b.parse_status.startswith("error:"):
                r.error = b.parse_status[len("error: "):]
                errors.append({"step": step, "sample_id": r.uid, "reward": name, "error": r.error})
    L_buf = cfg.algorithm.overlong_buffer
    if L_buf:
        L_max = cfg.rollout.max_new_tokens
        for r in rows:
            r.reward += min(-(len(r.completion.token_ids) - (L_max - L_buf)) / L_buf, 0.0)
    if errors and errors_path:
        with open(errors_path, "a", encoding="utf-8") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
    return errors


def write_rank_errors(batch, cfg, step: int, errors_path: str, info=None) -> None:
    """Rank 0 appends to ``errors_path`` the failed reward calls of the other ranks'
    rollouts (``Rollout.error``; rank 0 wrote its own in ``score_rollouts``), in the format
    of ``score_rollouts``. Collective; the identity for one process."""
    info = info or distributed.current()
    if not info.distributed:
        return
    mine = [{"step": step, "sample_id": r.uid, "reward": cfg.reward.name or r.sample.task, "error": r.error}
            for r in batch if r.error is not None]
    parts = distributed.all_gather_objects(mine, info)
    if info.is_main and any(parts[1:]):
        with open(errors_path, "a", encoding="utf-8") as f:
            for part in parts[1:]:
                for e in part:
                    f.write(json.dumps(e) + "\n")


def compute_advantages(rows: list[Rollout], cfg: TrainConfig):
    """``mars.mono_anchored_advantage`` over the trained rows of ``rows`` with the anchors
    matched by prompt id (``Rollout.group``), in whatever order the rows are. Returns
    (AdvantageOutput of the trained rows in their order, group labels in the op's order)."""
    trained = [r for r in rows if not r.anchor]
    anchors = [r for r in rows if r.anchor]
    a = cfg.algorithm
    out = mars.mono_anchored_advantage(
        torch.tensor([r.reward for r in trained], dtype=torch.float32), [r.group for r in trained],
        torch.tensor([r.reward for r in anchors], dtype=torch.float32) if anchors else None,
        [r.group for r in anchors] if anchors else None,
        norm_by_std=a.norm_by_std, eps=a.eps, unbiased=a.unbiased, singleton=a.singleton, backend=a.backend,
        return_stats=True)
    labels = [None] * int(out.mean.numel())
    for r, g in zip(trained, out.group_index.tolist()):
        labels[g] = r.group
    return out, labels


def informative_groups(out, labels) -> set:
    """DAPO dynamic sampling under MARS: the groups whose pooled std (rollouts + anchors)
    is > 0. A group whose G rewards are equal but differ from its anchors is kept."""
    return {g for g, s in zip(labels, out.std.tolist()) if s > 0}
