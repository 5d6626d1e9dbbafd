"""The mono-anchor data steps of the verl recipe, as plain functions on ``verl.DataProto``.

One training step of ``python -m mars.integrations.verl.main`` (docs/verl.md):

1. :func:`build_mono_batch`: from the sampled generation batch (``gen_batch`` repeated n
   times, verl's ``fit``), one row per (prompt uid, source image k): a copy of the prompt's
   row whose ``raw_prompt`` image entries are all replaced by image k ("duplicate", the
   paper's mono input: placeholder counts still match) or reduced to image k alone
   ("single").
2. :func:`combine_for_generation`: sampled rows, then mono rows, then padding rows up to a
   multiple of the rollout workers' count (``AgentLoopManager.generate_sequences`` splits
   the batch with ``DataProto.chunk``, which asserts an equal split), each row marked in
   ``non_tensor_batch["__do_sample__"]`` (True: sample; False: greedy, temperature 0 /
   top_p 1 / top_k -1; verl/experimental/agent_loop/agent_loop.py L598-650). One
   ``generate_sequences`` call for both.
3. :func:`split_generation_output`: the sampled rows back, unchanged, and the mono rows.
4. :func:`anchor_rewards`: ``rm_scores.sum(-1)`` of the mono rows (scored by the same
   reward manager inside the agent loop, as verl's REMAX baseline is).
5. :func:`reward_baselines_by_uid`: a [bs, M] tensor for the sampled rows, row i holding
   the anchors of row i's uid (column k: source k; NaN: no such source), the
   ``reward_baselines`` that verl hands to the estimator. Keyed by uid, so it survives
   verl's re-ordering of rows (``_balance_batch``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from mars.integrations.verl._compat import require_verl

__all__ = ["IMAGE_TYPES", "image_slots", "count_sources", "mono_messages", "MonoBatch",
           "build_mono_batch", "Layout", "combine_for_generation", "split_generation_output",
           "anchor_rewards", "reward_baselines_by_uid", "DO_SAMPLE_KEY", "PROMPT_KEY"]

IMAGE_TYPES = ("image", "image_url")
DO_SAMPLE_KEY = "__do_sample__"
PROMPT_KEY = "raw_prompt"
MONO_MODES = ("duplicate", "single")


def _is_image(item) -> bool:
    return isinstance(item, dict) and item.get("type") in IMAGE_TYPES


def image_slots(messages) -> list[tuple[int, int]]:
    """(message index, content index) of every image entry, in order (the sources).

    Args:
        messages: chat messages as verl's RLHFDataset builds them (``raw_prompt``): a list of
            dicts whose ``content`` is a string or a list of parts; image parts are dicts
            with ``"type": "image"`` (or ``"image_url"``).

    Raises:
        ValueError: messages is not a list/tuple/array of dicts.
    """
    if isinstance(messages, np.ndarray):
        messages = list(messages)
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"raw_prompt must be a list of chat messages, got {type(messages).__name__}")
    slots = []
    for mi, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"raw_prompt message {mi} must be a dict, got {type(msg).__name__}")
        content = msg.get("content")
        if isinstance(content, (list, tuple)):
            slots.extend((mi, ci) for ci, item in enumerate(content) if _is_image(item))
    return slots


def count_sources(messages) -> int:
    """Number of image entries (sources) in a ``raw_prompt``."""
    return len(image_slots(messages))


def mono_messages(messages, k: int, mode: str = "duplicate") -> list:
    """A copy of ``messages`` that shows source k only.

    Args:
        messages: a ``raw_prompt`` (see :func:`image_slots`).
        k: 0-based source index, in [0, count_sources(messages)).
        mode: "duplicate" (every image slot gets a copy of image k's entry: the paper's mono
            input, same number of placeholders) or "single" (only image k's entry stays).

    Returns:
        New message and content lists with new image-entry dicts; text parts and the image
        payloads (PIL images, paths, bytes) are shared with the input, which is not modified.

    Raises:
        ValueError: bad mode, k out of range (naming the source count).
    """
    if mode not in MONO_MODES:
        raise ValueError(f"mode must be one of {MONO_MODES}, got {mode!r}")
    slots = image_slots(messages)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < len(slots):
        raise ValueError(f"source index k={k!r} out of range: this prompt has {len(slots)} image(s)")
    mk, ck = slots[int(k)]
    source = messages[mk]["content"][ck]
    out = []
    for mi, msg in enumerate(messages):
        content = msg.get("content")
        new = dict(msg)
        if isinstance(content, (list, tuple)):
            parts = []
            for ci, item in enumerate(content):
                if not _is_image(item):
                    parts.append(item)
                elif mode == "duplicate":
                    parts.append(dict(source))
                elif (mi, ci) == (mk, ck):
                    parts.append(dict(item))
            new["content"] = parts
        out.append(new)
    return out


class MonoBatch(NamedTuple):
    """data: DataProto with one row per (uid, source), or None when no prompt qualifies;
    uids: [n] the row's prompt uid; sources: [n] int64 its source index k."""
    data: Optional[object]
    uids: np.ndarray
    sources: np.ndarray


def _object_array(values) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def build_mono_batch(gen_batch, *, mode: str = "duplicate", min_sources: int = 1,
                     uid_key: str = "uid", prompt_key: str = PROMPT_KEY) -> MonoBatch:
    """The greedy mono-source rows for the prompts of a (repeated) generation batch.

    Args:
        gen_batch: DataProto whose ``non_tensor_batch`` has ``uid_key`` and ``prompt_key``
            (verl's ``gen_batch`` after ``repeat(n)``: n rows per uid; any order). Every
            other field (tensor or not: ``data_source``, ``reward_model``, ``extra_info``,
            ``agent_name``, ...) is copied from the uid's first row, so the reward manager
            scores a mono answer against the same ground truth.
        mode: see :func:`mono_messages`.
        min_sources: prompts with fewer images get no anchors (their group is plain GRPO).
        uid_key, prompt_key: field names (verl's ``uid`` and ``raw_prompt``).

    Returns:
        MonoBatch. Rows are ordered by the uid's first row, then by k; the input is not
        modified. Prompts may differ in their number of images.

    Raises:
        ValueError: missing fields, rows of one uid with different image counts, bad mode
        or min_sources.
    """
    DataProto = require_verl().DataProto
    if not isinstance(gen_batch, DataProto):
        raise ValueError(f"gen_batch must be a verl DataProto, got {type(gen_batch).__name__}")
    if mode not in MONO_MODES:
        raise ValueError(f"mode must be one of {MONO_MODES}, got {mode!r}")
    if isinstance(min_sources, bool) or not isinstance(min_sources, (int, np.integer)) or min_sources < 1:
        raise ValueError(f"min_sources must be an int >= 1, got {min_sources!r}")
    ntb = gen_batch.non_tensor_batch
    for key in (uid_key, prompt_key):
        if key not in ntb:
            raise ValueError(f"gen_batch.non_tensor_batch has no {key!r} (keys: {sorted(ntb)})")
    uids, prompts = ntb[uid_key], ntb[prompt_key]
    first: dict = {}
    for i, u in enumerate(uids):
        n = count_sources(prompts[i])
        if u not in first:
            first[u] = (i, n)
        elif first[u][1] != n:
            raise ValueError(f"rows of uid {u!r} have different image counts ({first[u][1]} and {n})")
    rows, out_uids, out_src, new_prompts = [], [], [], []
    for u, (i, n) in first.items():
        if n < min_sources:
            continue
        for k in range(n):
            rows.append(i)
            out_uids.append(u)
            out_src.append(k)
            new_prompts.append(mono_messages(prompts[i], k, mode))
    uid_arr = np.array(out_uids, dtype=uids.dtype if len(out_uids) else object)
    src_arr = np.array(out_src, dtype=np.int64)
    if not rows:
        return MonoBatch(None, uid_arr, src_arr)
    mono = gen_batch.select_idxs(np.array(rows, dtype=np.int64))
    mono.non_tensor_batch = dict(mono.non_tensor_batch)
    mono.non_tensor_batch[prompt_key] = _object_array(new_prompts)
    mono.meta_info = dict(gen_batch.meta_info)
    return MonoBatch(mono, uid_arr, src_arr)


class Layout(NamedTuple):
    """Row counts of a combined generation batch: sampled rows first, then mono, then pad."""
    n_sampled: int
    n_mono: int
    n_pad: int

    @property
    def total(self) -> int:
        return self.n_sampled + self.n_mono + self.n_pad


def _with_flag(data, flag: bool):
    DataProto = require_verl().DataProto
    ntb = dict(data.non_tensor_batch)
    ntb[DO_SAMPLE_KEY] = np.full(len(data), flag, dtype=bool)
    return DataProto(batch=data.batch, non_tensor_batch=ntb, meta_info=data.meta_info)


def combine_for_generation(sampled, mono=None, divisor: int = 1):
    """One generation batch: sampled rows (``__do_sample__`` True), mono rows (False), and
    greedy padding rows (copies of the last row) up to a multiple of ``divisor``.

    Args:
        sampled: DataProto of the rows to sample (verl's repeated ``gen_batch``). It must not
            carry ``__do_sample__`` already.
        mono: DataProto of greedy rows (``build_mono_batch(...).data``) or None.
        divisor: the rollout workers' count (``actor_rollout_ref.rollout.agent.num_workers``,
            verl's own size divisor in ``_validate``), an int >= 1.

    Returns:
        (combined DataProto, Layout). The inputs are not modified; meta_info is sampled's.

    Raises:
        ValueError: bad divisor, sampled already flagged, mismatched fields.
    """
    verl = require_verl()
    if isinstance(divisor, bool) or not isinstance(divisor, (int, np.integer)) or divisor < 1:
        raise ValueError(f"divisor must be an int >= 1, got {divisor!r}")
    if DO_SAMPLE_KEY in sampled.non_tensor_batch:
        raise ValueError(f"the sampled batch already has {DO_SAMPLE_KEY!r} (another combined "
                         "rollout, e.g. REMAX's, is active)")
    parts = [_with_flag(sampled, True)]
    n_mono = 0
    if mono is not None and len(mono) > 0:
        if set(mono.non_tensor_batch) != set(sampled.non_tensor_batch):
            raise ValueError("mono and sampled batches have different non-tensor fields: "
                             f"{sorted(set(mono.non_tensor_batch) ^ set(sampled.non_tensor_batch))}")
        parts.append(_with_flag(mono, False))
        n_mono = len(mono)
    n = len(sampled) + n_mono
    n_pad = (-n) % int(divisor)
    if n_pad:
        last = parts[-1]
        pad = last.select_idxs(np.full(n_pad, len(last) - 1, dtype=np.int64))
        parts.append(_with_flag(pad, False))
    for p in parts[1:]:
        p.meta_info = sampled.meta_info
    combined = verl.DataProto.concat(parts) if len(parts) > 1 else parts[0]
    combined.meta_info = dict(sampled.meta_info)
    return combined, Layout(len(sampled), n_mono, n_pad)


def split_generation_output(output, layout: Layout):
    """(sampled rows, mono rows or None) of a combined generation output, ``__do_sample__``
    removed, padding rows dropped. Both share output's meta_info (as verl's REMAX slices do).

    Raises:
        ValueError: the output has another number of rows than the layout says.
    """
    if len(output) != layout.total:
        raise ValueError(f"generation output has {len(output)} rows, the combined batch had "
                         f"{layout.total} ({layout})")

    def part(start, end):
        p = output.slice(start, end)
        p.non_tensor_batch = {k: v for k, v in p.non_tensor_batch.items() if k != DO_SAMPLE_KEY}
        return p

    sampled = part(0, layout.n_sampled)
    mono = part(layout.n_sampled, layout.n_sampled + layout.n_mono) if layout.n_mono else None
    return sampled, mono


def anchor_rewards(mono_output) -> torch.Tensor:
    """[n_mono] float32: ``rm_scores.sum(-1)`` of the scored mono rows (verl's REMAX baseline
    reward, ray_trainer.py L1526-1535).

    Raises:
        ValueError: no ``rm_scores`` (the rows were not scored: colocated reward model,
        score them with the trainer's ``_compute_reward_colocate`` first)."""
    if mono_output.batch is None or "rm_scores" not in mono_output.batch.keys():
        raise ValueError("the mono outputs have no 'rm_scores': they were not scored by the "
                         "agent loop's reward workers")
    return mono_output.batch["rm_scores"].sum(dim=-1).to(torch.float32)


def reward_baselines_by_uid(uids, mono_uids, mono_sources, values, *, width: Optional[int] = None,
                            device=None) -> torch.Tensor:
    """[bs, M] anchors per row, looked up by the row's uid (NaN: no anchor for that source).

    Args:
        uids: [bs] uid of each sampled row (any order, repeated n times).
        mono_uids, mono_sources: [K] uid and source index of each anchor (MonoBatch fields).
        values: [K] anchor rewards (:func:`anchor_rewards`).
        width: M (default: the largest source index + 1, at least 1).
        device: of the result (default: values').

    Returns:
        float32 [bs, M]; row i, column k = anchor reward of (uids[i], source k).

    Raises:
        ValueError: length mismatch, an anchor whose uid no row has, a (uid, source) twice,
        a source index outside [0, M).
    """
    uids = np.asarray(uids)
    mono_uids = np.asarray(mono_uids)
    mono_sources = np.asarray(mono_sources, dtype=np.int64)
    values = torch.as_tensor(values)
    if not (len(mono_uids) == len(mono_sources) == values.shape[0]) or values.dim() != 1:
        raise ValueError(f"mono_uids ({len(mono_uids)}), mono_sources ({len(mono_sources)}) and "
                         f"values ({tuple(values.shape)}) must be [K] each")
    m = int(width) if width is not None else max(int(mono_sources.max()) + 1 if len(mono_sources) else 1, 1)
    if len(mono_sources) and (mono_sources.min() < 0 or mono_sources.max() >= m):
        raise ValueError(f"source indices must lie in [0, {m})")
    row_of = {}
    for i, u in enumerate(uids):
        row_of.setdefault(u, i)
    slot = np.full((len(row_of), m), -1, dtype=np.int64)
    ukey = {u: j for j, u in enumerate(row_of)}
    for a, (u, k) in enumerate(zip(mono_uids, mono_sources)):
        if u not in ukey:
            raise ValueError(f"anchor for uid {u!r}, which no sampled row has")
        if slot[ukey[u], k] >= 0:
            raise ValueError(f"two anchors for uid {u!r}, source {int(k)}")
        slot[ukey[u], k] = a
    row_group = np.array([ukey[u] for u in uids], dtype=np.int64)
    per_row = slot[row_group]                                     # [bs, M] anchor index or -1
    device = values.device if device is None else device
    vals = values.detach().to(device=device, dtype=torch.float32)
    idx = torch.as_tensor(per_row, device=device)
    out = torch.full(per_row.shape, float("nan"), dtype=torch.float32, device=device)
    have = idx >= 0
    if vals.numel():
        out[have] = vals[idx[have]]
    return out
