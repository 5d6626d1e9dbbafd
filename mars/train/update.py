"""Steps 4-5 of an RL step: the old log-probs and the policy update (docs/train.md).

``response_logprobs`` (no gradient) gives each trained row's per-token log-probs under the
policy (and the frozen reference model). ``policy_update`` makes optim.epochs x
optim.mini_batches AdamW steps; ``accumulate_gradients`` backs one mini-batch's loss in
micro-batches (``micro_batch_loss``: ``mars.loss``, plain or fused lm head) normalised by
the mini-batch's token / sequence counts, over all ranks under data parallelism
(docs/distributed.md), so the accumulated gradient is the whole mini-batch's.
``rollout_is_weights`` corrects the engine / trainer mismatch (loss.rollout_is).
"""

from __future__ import annotations

import math

import torch

import mars
from mars.reference import LOSS_METRICS

from . import distributed, faults
from .batch import collate_rows, logits_logprobs, row_logprobs
from .config import TrainConfig
from .rollouts import Rollout

__all__ = ["response_logprobs", "old_logprobs", "loss_options", "policy_update", "accumulate_gradients",
           "micro_batch_loss", "rollout_is_weights", "engine_logprobs", "lr_factor"]


# =============================================================================== 4. old log-probs
def response_logprobs(model, rows: list[Rollout], encoder, cfg: TrainConfig, device) -> list:
    """Per-token log-probs (no gradient) of each row's response under ``model``, at the
    rollout temperature, in optim.micro_batch_size rows per forward ([] for no rows)."""
    if not rows:
        return []
    return row_logprobs(model, [r.prompt for r in rows], [r.completion.token_ids for r in rows],
                        encoder.pad_token_id, temperature=cfg.rollout.temperature,
                        micro_batch_size=cfg.optim.micro_batch_size, device=device, chunk_size=cfg.loss.chunk_size)


def old_logprobs(model, reference, rows: list[Rollout], encoder, cfg: TrainConfig, device, step: int):
    """(old log-probs of ``rows`` under ``model``, their log-probs under ``reference`` or None
    without one): local, no gradient, no collective ([] for a rank without rows: its
    padding micro-batches then carry a zero ref_logp too). Non-finite old log-probs raise
    ``faults.Diverged`` naming ``step``."""
    old_logp = response_logprobs(model, rows, encoder, cfg, device)
    if any(not torch.isfinite(lp).all() for lp in old_logp):
        raise faults.Diverged.in_outputs(step, "old log-probs", cfg)
    ref_logp = response_logprobs(reference, rows, encoder, cfg, device) if reference is not None else None
    return old_logp, ref_logp


# =============================================================================== 5. update
def loss_options(cfg: TrainConfig) -> dict:
    """The mars.loss keyword options of the config."""
    lo = cfg.loss
    return dict(clip_low=lo.clip_low, clip_high=lo.clip_high, dual_clip=lo.dual_clip, kl_coef=lo.kl_coef,
                kl_type=lo.kl_type, agg=lo.agg, ratio_level=lo.ratio_level, log_ratio_clamp=lo.log_ratio_clamp,
                loss_scale=lo.loss_scale if lo.loss_scale is not None else float(cfg.rollout.max_new_tokens),
                backend=lo.backend)


def policy_update(model, optimizer, scheduler, rows: list[Rollout], adv, old_logp, ref_logp, cfg: TrainConfig,
                  pad_token_id: int, device, gen: torch.Generator, dummy=None, step: int = 0) -> dict:
    """optim.epochs x optim.mini_batches optimizer steps over ``rows`` (shuffled), each on
    the gradient :func:`accumulate_gradients` gives for its mini-batch.
    A data-parallel ``model`` (``distributed.wrap_model``): ``rows`` are this rank's,
    every rank makes the same optimizer steps (exactly optim.mini_batches mini-batches,
    some maybe empty, each padded with ``dummy``: ``distributed.padding_row``), and the
    gradients and metrics are the whole data-parallel batch's
    (:func:`accumulate_gradients`).
    A non-finite loss or gradient norm never reaches the weights: optim.on_nonfinite=stop
    raises ``faults.Diverged`` naming ``step``; skip drops that optimizer step and counts
    it (``skipped_steps``)."""
    o = cfg.optim
    exact = distributed.is_wrapped(model)
    model.train()
    sums: dict[str, float] = {}
    losses, grad_norms = [], []
    skipped = 0
    for _ in range(o.epochs):
        order = torch.randperm(len(rows), generator=gen).tolist()
        for mini in _split(order, o.mini_batches, exact=exact):
            optimizer.zero_grad(set_to_none=True)
            res = accumulate_gradients(
                model, [rows[i] for i in mini], adv[mini], [old_logp[i] for i in mini],
                None if ref_logp is None else [ref_logp[i] for i in mini], cfg, pad_token_id, device, dummy)
            if res is None:
                continue
            loss, metrics = res
            # the total norm (all-reduced gradients: the same on every rank), clipped unless max_grad_norm is null
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm or math.inf))
            # never let a non-finite update reach the weights. Under data parallelism only the norm decides (it
            # is global, so every rank decides alike; a local loss could differ between ranks)
            if not math.isfinite(norm) or (not exact and not math.isfinite(loss)):
                if o.on_nonfinite == "stop":
                    bad = ("loss", loss) if not math.isfinite(loss) else ("grad_norm", norm)
                    raise faults.Diverged(step, *bad, cfg)
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            if o.max_grad_norm is not None:
                grad_norms.append(norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss)
            n = metrics.pop("num_tokens")
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n
            sums["num_tokens"] = sums.get("num_tokens", 0.0) + n
    n = max(sums.pop("num_tokens", 0.0), 1.0)
    out = {k: v / n for k, v in sums.items()}
    out.update(loss=sum(losses) / max(len(losses), 1), optimizer_steps=len(losses), skipped_steps=skipped,
               grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else None,
               lr=optimizer.param_groups[0]["lr"])
    return out


def accumulate_gradients(model, rows, adv, old_logp, ref_logp, cfg, pad_token_id: int, device, dummy=None, *,
                         info: distributed.DistInfo | None = None):
    """Backward of the loss of ``rows`` (one mini-batch; under data parallelism this rank's share ``rows`` of one mini-batch, in micro-batches of
    optim.micro_batch_size rows, each loss normalised by the **global** token count
    (token-mean) / sequence count (seq-mean-*) of the mini-batch and multiplied by
    ``distributed.loss_multiplier``, so the gradient every rank holds after the last backward is
    the gradient of the whole mini-batch (all ranks' rows) in one process: the summed
    gradients equal those of one pass over the mini-batch.

    Only the last micro-batch communicates (``distributed.no_sync`` before it). Every rank runs the
    same number of micro-batches under FSDP2 (its forwards are collectives) and at least
    one under DDP: a rank with fewer rows runs ``dummy`` (any trainable Rollout of the
    step: its prompt is encoded) with advantage 0 and loss times 0, which adds exactly 0.

    Returns None on every rank when the global mini-batch has no valid token (then no rank
    steps), else (loss, metrics) of the whole mini-batch, identical on every rank: the loss
    summed over ranks and micro-batches, the loss metrics token-weighted over all ranks and
    ``num_tokens`` the global token count. For one process, or a model that is not wrapped
    (its gradient is not reduced, so it trains on its own rows with local counts, even
    inside a process group), the micro-batch
    losses are normalised by the local counts, unscaled. Raises ValueError when a rank must run a
    padding micro-batch and ``dummy`` is None."""
    info = (info or distributed.current()) if distributed.is_wrapped(model) else distributed.DistInfo()
    lengths = [len(r.completion.token_ids) for r in rows]
    local = (sum(lengths), sum(L > 0 for L in lengths))
    num_tokens, num_seqs = distributed.global_counts(*local, info) if info.distributed else local
    if num_tokens == 0:
        return None
    opts = loss_options(cfg)
    mb = cfg.optim.micro_batch_size
    starts = list(range(0, len(rows), mb))
    k = len(starts)
    if info.distributed:
        fsdp = not isinstance(model, torch.nn.parallel.DistributedDataParallel) and distributed.is_wrapped(model)
        k = int(distributed.all_reduce_numbers([k], "max", info)[0]) if fsdp else max(k, 1)
    scale = distributed.loss_multiplier(model, info)
    loss_total, sums = 0.0, {}
    for i in range(k):
        with distributed.no_sync(model, enabled=info.distributed and i < k - 1):
            if i < len(starts):
                b = starts[i]
                out = micro_batch_loss(model, rows[b:b + mb], adv[b:b + mb], old_logp[b:b + mb],
                                            None if ref_logp is None else ref_logp[b:b + mb], opts, num_tokens,
                                            num_seqs, cfg, pad_token_id, device)
                (out.loss * scale if scale != 1.0 else out.loss).backward()
                loss_total += float(out.loss.detach())
                n = float(out.metrics["num_tokens"])
                for key, v in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + (float(v) * n if key != "num_tokens" else n)
            else:  # padding micro-batch: a forward / backward that adds 0 to every gradient
                if dummy is None:
                    raise ValueError(f"rank {info.rank} has {len(rows)} row(s), fewer micro-batches than another "
                                     "rank: pass dummy= (a trainable Rollout of this step) to pad")
                L = len(dummy.completion.token_ids)
                out = micro_batch_loss(model, [dummy], torch.zeros(1), [torch.zeros(L)],
                                            None if ref_logp is None else [torch.zeros(L)], opts, num_tokens,
                                            num_seqs, cfg, pad_token_id, device)
                (out.loss * 0.0).backward()
    if not info.distributed:
        n = max(sums["num_tokens"], 1.0)
        return loss_total, {key: (v / n if key != "num_tokens" else v) for key, v in sums.items()}
    keys = list(LOSS_METRICS)
    tot = distributed.all_reduce_numbers([loss_total] + [sums.get(key, 0.0) for key in keys], "sum", info)
    loss_total, red = tot[0], dict(zip(keys, tot[1:]))
    n = max(red["num_tokens"], 1.0)
    return loss_total, {key: (v / n if key != "num_tokens" else v) for key, v in red.items()}


def micro_batch_loss(model, rows, adv, old_logp, ref_logp, opts, num_tokens, num_seqs, cfg, pad_token_id, device):
    """mars.loss on one micro-batch: the plain path materialises the logits of the
    response tokens, the fused path (loss.fused) never does."""
    inputs, ids, mask = collate_rows([r.prompt for r in rows], [r.completion.token_ids for r in rows],
                                     pad_token_id, device)
    T = ids.shape[1]
    old = _pad_rows(old_logp, T, device)
    ref = None if ref_logp is None else _pad_rows(ref_logp, T, device)
    adv = adv.to(device)
    isw = None  # loss.rollout_is: the engine / trainer mismatch weights of these rows
    if cfg.loss.rollout_is != "off":
        isw, _ = rollout_is_weights(old, _pad_rows(engine_logprobs(rows, cfg), T, device), mask,
                                    cfg.loss.rollout_is, cfg.loss.rollout_is_cap)
    x = distributed.response_forward(model, inputs, T)  # through DDP / FSDP2 when wrapped
    temperature = cfg.rollout.temperature
    if cfg.loss.fused:
        return mars.loss.fused_linear_policy_loss(x.hidden, x.weight, ids, old, adv, mask, bias=x.bias,
                                                  temperature=temperature, chunk_size=cfg.loss.chunk_size,
                                                  ref_logp=ref, is_weights=isw, num_tokens=num_tokens,
                                                  num_seqs=num_seqs, **opts)
    logp = logits_logprobs(x, temperature)
    return mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, is_weights=isw, num_tokens=num_tokens,
                                 num_seqs=num_seqs, **opts)


@torch.no_grad()
def rollout_is_weights(old_logp, rollout_logp, mask, level: str, cap: float):
    """Truncated importance-sampling weights of the engine / trainer mismatch (verl's
    rollout_is, TRL's vllm_importance_sampling_correction, *_truncate modes).

    old_logp, rollout_logp: [B, T] float, the trainer's and the engine's log-probs of the
    sampled tokens; mask: [B, T] bool or 0/1 (valid tokens). The log-ratio
    d = old_logp - rollout_logp is clamped to [-20, 20] (an engine -inf gives the cap).
    level "token": w = min(exp(d), cap), [B, T], 1 at masked positions.
    level "sequence": w = min(exp(mean of d over the row's valid tokens), cap) (the
    geometric mean of the token ratios, verl's "geometric" level), [B], 1 for a row
    without valid tokens.
    Returns (w, clipped): w in old_logp's dtype (no gradient), clipped the bool mask (same
    shape as w) of the weights the cap cut (exp(d) > cap)."""
    m = mask.bool()
    d = torch.where(m, (old_logp.detach() - rollout_logp.detach()).clamp(-20.0, 20.0), torch.zeros_like(old_logp))
    if level == "sequence":
        d = d.sum(-1) / m.sum(-1).clamp(min=1).to(d.dtype)
    elif level != "token":
        raise ValueError(f"rollout_is level must be 'token' or 'sequence', got {level!r}")
    raw = torch.exp(d)
    return raw.clamp(max=cap), raw > cap


def engine_logprobs(rows: list[Rollout], cfg: TrainConfig) -> list:
    """The engine's per-token log-probs of each row's response (``completion.logprobs``)
    as float32 tensors [len(token_ids)]; ValueError naming the engine when one is missing
    or has the wrong length (loss.rollout_is needs them)."""
    out = []
    for r in rows:
        lp = r.completion.logprobs
        if lp is None or len(lp) != len(r.completion.token_ids):
            got = "no log-probs" if lp is None else f"{len(lp)} log-probs for {len(r.completion.token_ids)} tokens"
            raise ValueError(f"loss.rollout_is={cfg.loss.rollout_is} needs the engine's per-token log-probs, but "
                             f"rollout.engine={cfg.rollout.engine} gave {got} for rollout {r.uid}; use an engine "
                             "that returns Completion.logprobs (hf, vllm) or set loss.rollout_is=off")
        out.append(torch.as_tensor(lp, dtype=torch.float32))
    return out


def lr_factor(k: int, cfg: TrainConfig) -> float:
    """Multiplier of optim.lr for optimizer step k (0-based): linear warm-up over
    optim.warmup_steps, then optim.lr_schedule (constant, or linear / cosine decay to 0 at
    the run's last optimizer step, max_steps x mini_batches x epochs)."""
    o = cfg.optim
    warm = o.warmup_steps
    if warm and k < warm:
        return (k + 1) / warm
    if o.lr_schedule == "constant":
        return 1.0
    total = cfg.max_steps * o.mini_batches * o.epochs
    progress = min(1.0, max(0.0, (k - warm) / max(total - warm, 1)))
    return 1.0 - progress if o.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _split(xs: list, k: int, exact: bool = False) -> list[list]:
    """``xs`` in min(k, len(xs)) (at least 1) near-equal contiguous parts; exact: always k
    parts, the last ones empty when len(xs) < k (data parallel: every rank makes the same
    number of optimizer steps whatever its number of rows)."""
    k = max(1, k if exact else min(k, len(xs)))
    q, r = divmod(len(xs), k)
    out, start = [], 0
    for i in range(k):
        n = q + (i < r)
        out.append(xs[start:start + n])
        start += n
    return out


def _pad_rows(rows, T: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), T), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)
