"""The anchor step in verl's generation call: a wrapper around the trainer's
``async_rollout_manager`` (verl's ``AgentLoopManager``).

verl 0.9.1's legacy ``RayPPOTrainer.fit`` calls, once per step (ray_trainer.py L1513)::

    combined_gen_output = self.async_rollout_manager.generate_sequences(combined_gen_batch)
    self.checkpoint_manager.sleep_replicas()
    gen_batch_output = combined_gen_output.slice(0, num_sampled_prompts)
    ...
    batch = batch.union(gen_batch_output)          # every tensor of the output joins the batch
    ... _balance_batch(batch) ... compute_advantage(batch, ...)   # passes batch["reward_baselines"]

:class:`MonoAnchorRollout` answers that call: it appends the greedy mono rows to the
sampled ones, makes **one** call of the real manager (a second call after the replicas
sleep can break async vLLM: verl-project/verl#6308; ``meta_info["do_sample"]`` is ignored
by 0.9.1's agent loop, so greediness is set per row with ``__do_sample__``), returns the
sampled rows unchanged plus ``batch["reward_baselines"]`` (the anchors of each row's uid),
which ``fit`` then carries to the estimator. Validation calls (``meta_info["validate"]``)
pass straight through.

When the rows come back without ``rm_scores`` (a colocated reward model: verl scores after
the replicas sleep), the mono outputs are kept as ``pending`` and scored by
:meth:`MonoAnchorRollout.finish_pending` from the trainer's ``_compute_reward_colocate``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from mars.integrations.verl import batch as B

__all__ = ["MonoAnchorRollout", "PendingAnchors", "BASELINE_KEY"]

BASELINE_KEY = "reward_baselines"


class PendingAnchors(NamedTuple):
    """Mono outputs of the last generation call that still need their rewards."""
    output: object
    uids: np.ndarray
    sources: np.ndarray


def anchor_metrics(sampled, uids, mono_uids, values, layout) -> dict[str, float]:
    """Step metrics (floats) of the anchors: ``mars/anchor_reward/mean``,
    ``mars/anchor_rollouts``, ``mars/anchored_prompts``, ``mars/pad_rollouts`` and, when the
    sampled rows are scored, ``mars/gain/mean`` (mean over anchored prompts of
    mean(multi rewards) - mean(anchor rewards), the information gain; docs/advantage.md)."""
    out = {"mars/anchor_rollouts": float(len(mono_uids)),
           "mars/anchored_prompts": float(len(set(mono_uids.tolist()))),
           "mars/pad_rollouts": float(layout.n_pad)}
    vals = torch.as_tensor(values, dtype=torch.float32).cpu().numpy()
    if len(vals):
        out["mars/anchor_reward/mean"] = float(vals.mean())
    if len(vals) and sampled.batch is not None and "rm_scores" in sampled.batch.keys():
        r = sampled.batch["rm_scores"].sum(-1).float().cpu().numpy()
        gains = []
        for u in set(mono_uids.tolist()):
            gains.append(r[uids == u].mean() - vals[mono_uids == u].mean())
        out["mars/gain/mean"] = float(np.mean(gains))
    return out


class MonoAnchorRollout:
    """Wraps verl's rollout manager; every other attribute is the manager's.

    Args:
        manager: verl's ``AgentLoopManager`` (anything with ``generate_sequences(DataProto)``
            that returns one output row per input row, in order).
        num_workers: the manager's chunk count (``actor_rollout_ref.rollout.agent.num_workers``):
            the combined batch is padded to a multiple of it with greedy rows.
        mono_mode: "duplicate" | "single" (:func:`mars.integrations.verl.batch.mono_messages`).
        min_sources: prompts with fewer images get no anchors.
        enable: False passes every call through (plain GRPO on the same recipe).
    """

    def __init__(self, manager, *, num_workers: int, mono_mode: str = "duplicate",
                 min_sources: int = 1, enable: bool = True):
        if mono_mode not in B.MONO_MODES:
            raise ValueError(f"mono_mode must be one of {B.MONO_MODES}, got {mono_mode!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        self._manager = manager
        self.num_workers = int(num_workers)
        self.mono_mode = mono_mode
        self.min_sources = int(min_sources)
        self.enable = bool(enable)
        self.pending: Optional[PendingAnchors] = None
        self.metrics: dict[str, float] = {}

    def __getattr__(self, name):
        # only called for names this object lacks: delegate to verl's manager
        return getattr(self.__dict__["_manager"], name)

    def generate_sequences(self, prompts):
        """verl's call: sampled rows in, sampled rows out (+ ``reward_baselines``)."""
        if not self.enable or prompts.meta_info.get("validate", False):
            return self._manager.generate_sequences(prompts)
        self.metrics = {}
        if self.pending is not None:
            raise RuntimeError("the anchors of the previous step were never scored "
                               "(finish_pending was not called)")
        mono = B.build_mono_batch(prompts, mode=self.mono_mode, min_sources=self.min_sources)
        if mono.data is None:
            self.metrics = {"mars/anchor_rollouts": 0.0, "mars/anchored_prompts": 0.0}
            return self._manager.generate_sequences(prompts)
        combined, layout = B.combine_for_generation(prompts, mono.data, self.num_workers)
        output = self._manager.generate_sequences(combined)
        sampled, mono_out = B.split_generation_output(output, layout)
        self._layout = layout
        if mono_out.batch is not None and "rm_scores" in mono_out.batch.keys():
            values = B.anchor_rewards(mono_out)
            self._attach(sampled, sampled.non_tensor_batch["uid"], mono.uids, mono.sources, values)
        else:
            self.pending = PendingAnchors(mono_out, mono.uids, mono.sources)
        return sampled

    def _attach(self, target, uids, mono_uids, mono_sources, values):
        """Put the [bs, M] anchors of each row's uid into target.batch (target's rows are in
        the order of ``uids``) and record the step's anchor metrics."""
        if target.batch is None:
            raise ValueError("the rows to carry reward_baselines have no tensor batch")
        target.batch[BASELINE_KEY] = B.reward_baselines_by_uid(
            uids, mono_uids, mono_sources, values, device=target.batch.device or "cpu")
        self.metrics = anchor_metrics(target, np.asarray(uids), mono_uids, values, self._layout)

    def finish_pending(self, score: Callable, rows, target) -> None:
        """Score the pending mono outputs, then put ``reward_baselines`` into ``target``.

        Args:
            score: the trainer's ``_compute_reward_colocate`` (DataProto -> DataProto with
                ``rm_scores``): the same reward manager as the sampled rows.
            rows: the sampled rows being scored (their ``uid`` in ``non_tensor_batch``),
            target: the result of ``score(rows)`` that verl unions into the batch, row for
                row in ``rows``' order.

        Does nothing when no anchors are pending (validation, text-only steps).
        """
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        if "uid" not in rows.non_tensor_batch:
            raise ValueError("the scored rows have no 'uid': cannot hand anchors over by uid")
        values = B.anchor_rewards(score(pending.output))
        self._attach(target, rows.non_tensor_batch["uid"], pending.uids, pending.sources, values)

    def pop_metrics(self) -> dict[str, float]:
        m, self.metrics = self.metrics, {}
        return m
