"""The MARS trainer, top to bottom: `train(cfg)` is the whole recipe (docs/train.md).

Per RL step:

1. rollout   G sampled responses per multi-source prompt (temperature, top_p) and one
             greedy response per source (the mono anchors, never trained on), all in one
             ``engine.generate_ids`` call; the engine returns token ids.
2. reward    the mars.rewards registry scores every response; a reward that raises or is
             not finite gives 0, is counted (``reward_errors``) and logged with the sample
             id in OUTPUT_DIR/reward_errors.jsonl; the run goes on.
3. advantage ``mars.mono_anchored_advantage`` with every rollout and anchor labelled by its
             prompt id (never matched by position). DAPO's dynamic sampling drops groups
             whose *pooled* std is 0 and draws more prompts, up to a bound.
4. old logp  log-probs of the trained responses under the current policy, no gradient
             (and under the frozen reference model when loss.kl_coef > 0).
5. update    ``mars.loss`` (plain or fused lm head) over mini-batches x micro-batches with
             the mini-batch's token / sequence counts as global normalisers, so the
             accumulated gradient is the mini-batch's; AdamW with linear warm-up.

Everything the step measured goes to one JSON line of OUTPUT_DIR/metrics.jsonl.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

import mars
from mars.rollout import Completion, GenerationRequest, HFEngine, SamplingConfig, build_rollout_engine
from mars.rollout.encode import EncodedPrompt

from . import task as embedded
from .batch import collate_rows, logits_logprobs, response_inputs, row_logprobs
from . import checkpoint as ckpt
from . import distributed, faults
from .config import EMBEDDED, TINY, ConfigError, TrainConfig, save_config, to_dict
from .logger import MetricsLogger, truncate_jsonl
from .progress import RunProgress

__all__ = ["train", "TrainResult", "Rollout", "compute_advantages", "informative_groups", "score_rollouts"]


@dataclass
class TrainResult:
    output_dir: str
    metrics_path: str
    plot_path: str | None
    checkpoint: str | None
    records: list
    final_eval: dict
    wall_time: float
    checkpoint_times: list = None  # seconds of each checkpoint this process wrote


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


# =============================================================================== the recipe
def train(cfg: TrainConfig, warm_start_cache: dict | None = None, *, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Run the configured training (the config is validated by ``load_config``).
    warm_start_cache: a dict shared between runs (``mars train --compare``): a run whose
    model, task, data and warm-start settings and seed match a finished warm start reuses
    its weights instead of repeating it.
    resume: go on from the newest complete checkpoint of ``cfg.output_dir`` (``mars train
    --resume``): model, reference model, optimizer, scheduler, every RNG and the data
    position are the checkpoint's, the warm start is not redone, and metrics.jsonl,
    reward_errors.jsonl and samples.jsonl are cut back to its step and appended to, so the
    run writes what it would have written had it never stopped. With no checkpoint at all
    the run starts over; with checkpoints none of which can be resumed it refuses
    (CheckpointError listing each and what is wrong) and deletes nothing.
    overwrite: a fresh run into an OUTPUT_DIR that holds an earlier run's checkpoints
    removes them, once the data and the model have loaded; without it such a run is
    refused (ConfigError naming --resume and --overwrite) before anything is written.
    Under torchrun (``WORLD_SIZE`` set) this is one rank of a data-parallel run
    (docs/distributed.md, ``cfg.dist``): each rank trains on its shard of every step's
    prompts, the model is wrapped (DDP / FSDP2), metrics are reduced over the ranks and
    rank 0 alone writes files. Without torchrun's environment it is one process, and every
    data-parallel call below is the identity.
    Raises ``faults.Interrupted`` after SIGINT / SIGTERM (the step finished and
    checkpointed), ``checkpoint.CheckpointError`` naming a corrupt or missing checkpoint
    file, ``ConfigError`` for a config the process count does not fit, and
    ``torch.OutOfMemoryError`` with a note naming the config keys to lower.
    The rollout engine is closed on the way out (a vLLM engine shut down before the
    caller's distributed teardown)."""
    engines: list = []
    try:
        return _train(cfg, warm_start_cache, resume=resume, overwrite=overwrite, engines=engines)
    finally:
        for engine in engines:
            close = getattr(engine, "close", None)
            if close is not None:
                close()


def _train(cfg: TrainConfig, warm_start_cache: dict | None, *, resume: bool, overwrite: bool,
           engines: list) -> TrainResult:
    """``train``'s body; the rollout engine it builds goes into ``engines``."""
    if cfg.rollout.engine == "vllm" and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise ConfigError(f"rollout.engine=vllm under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) is not "
                          "supported: the colocated vLLM runs in the trainer's process and would join, and at its "
                          "shutdown destroy, the trainer's process group (vLLM needs its external_launcher "
                          "mode for that, not wired here); run one process, or use rollout.engine=hf")
    t_start = time.perf_counter()
    info = distributed.init_distributed(device_kind=distributed.device_kind(cfg.model.device),
                                        timeout_s=cfg.dist.timeout_s)
    main = info.is_main
    if cfg.optim.prompts_per_step % info.world_size:
        raise ConfigError(f"optim.prompts_per_step: {cfg.optim.prompts_per_step} prompts cannot be split evenly "
                          f"over {info.world_size} processes; use a multiple of {info.world_size}")
    resume_from, problem = None, None
    if main:  # rank 0 decides where the run starts; the others learn it (and any error) from it
        try:
            resume_from = _start_point(cfg, resume, overwrite)
            if resume_from is not None:
                _check_resume_config(cfg, ckpt.read_trainer_state(resume_from), resume_from)
                _check_resume_world(resume_from, info.world_size)
        except (ConfigError, ckpt.CheckpointError) as exc:
            problem = exc
    if info.distributed:
        resume_from, problem = distributed.broadcast_object((resume_from, problem), info)
    if problem is not None:
        raise problem
    _seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = info.device if info.distributed else _device(cfg.model.device)
    errors_path = os.path.join(cfg.output_dir, "reward_errors.jsonl")
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")

    # ---- data, model, engine
    task = embedded.EmbeddedTask(cfg.task.mix, cfg.task.image_size, cfg.task.noise, seed=cfg.seed) \
        if EMBEDDED in (cfg.data.train, cfg.data.eval) else None
    prompts = PromptSource(cfg, task)
    heldout = _heldout(cfg, task)
    policy = build_policy(cfg, device)
    options = engine_options(cfg, policy.model)
    if "seed" in options:  # vLLM's sampling seed: each rank its own stream (rank 0: cfg.seed)
        options["seed"] = distributed.rank_seed(cfg.seed, info)
    engine = build_rollout_engine(cfg.rollout.engine, policy, **options)
    engines.append(engine)
    encoder = engine.encoder
    if main:  # the inputs loaded: only now is OUTPUT_DIR written (an earlier run's checkpoints removed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume_from is None:
            if n := ckpt.clear_checkpoints(cfg.output_dir):
                print(f"mars train: --overwrite: removed {n} checkpoint(s) of an earlier run in {cfg.output_dir}",
                      file=sys.stderr)
            for p in (errors_path, samples_path):
                open(p, "w").close()
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    if cfg.data.eval == EMBEDDED and heldout and main:  # the held-out set as a `mars eval` file
        embedded.write_eval_file(heldout, os.path.join(cfg.output_dir, "heldout"))

    # SIGINT / SIGTERM: finish the step, checkpoint, stop
    with faults.StopSignals(cfg.output_dir, quiet=not main,
                            newest=lambda: ckpt.find_resumable(cfg.output_dir)) as stop:
        # ---- supervised warm start (teaches the answer format; a resumed run has its result). Under
        # torchrun every rank runs the same one (same seed): the replicas start equal.
        t = time.perf_counter()
        key = json.dumps([cfg.seed, cfg.data.train, to_dict(cfg.model), to_dict(cfg.task), to_dict(cfg.warmup)])
        cached = warm_start_cache is not None and key in warm_start_cache
        progress = RunProgress(cfg.warmup.steps if resume_from is None and not cached else 0, cfg.max_steps,
                               rl_guess_ratio=rl_step_cost_ratio(cfg),
                               enabled=cfg.log.progress and main)  # one bar, one ETA: warm start + RL
        if resume_from is None and cfg.warmup.steps:
            if cached:
                policy.model.load_state_dict(warm_start_cache[key])
            else:
                try:
                    warm_start(policy, encoder, cfg, task, prompts, device, stop=stop, progress=progress)
                except BaseException:
                    progress.close()
                    raise
                if warm_start_cache is not None:
                    warm_start_cache[key] = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        engine.update_weights(policy.model)  # an engine with its own copy of the weights (vLLM) gets these
        warmup_time = time.perf_counter() - t
        # RL draws the same numbers whether or not the warm start ran here; rank r its own sampling stream
        _seed_everything(distributed.rank_seed(cfg.seed + 1, info))

        # ---- RL. policy.model generates, computes old log-probs, evaluates and is saved; train_model is
        # what the update runs: policy.model itself (one process), DDP around it (the same parameters),
        # or FSDP2 around a copy whose gathered weights go back into policy.model after every update
        reference = _frozen_copy(policy.model) if cfg.loss.kl_coef > 0 else None
        train_model = _wrap(policy.model, info, cfg)
        optimizer = torch.optim.AdamW(train_model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                      weight_decay=cfg.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, cfg))
        shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        start, saved = 1, {}
        sharded = info.distributed and cfg.dist.strategy == "fsdp2"
        # FSDP2: the optimizer's state is checkpointed unsharded, keyed by parameter names
        opt_state = distributed.FullOptimizerState(train_model, optimizer) if sharded else optimizer
        if resume_from is not None:  # everything a step depends on, as it was after the checkpoint's step
            state = ckpt.restore_checkpoint(resume_from, model=policy.model, optimizer=opt_state, scheduler=scheduler,
                                            generators={"shuffle": shuffle_gen}, reference=reference)
            distributed.load_sharded_weights(train_model, policy.model)  # FSDP2's training copy; else nothing
            if info.distributed:  # this rank's own streams (rng_state.pt is rank 0's)
                try:
                    distributed.load_rng_state(resume_from, info, {"shuffle": shuffle_gen})
                except ValueError as exc:
                    raise ckpt.CheckpointError(str(exc)) from None
            engine.update_weights(policy.model)
            prompts.cursor, start, t_start = state["data_cursor"], state["step"] + 1, t_start - state["elapsed"]
            saved[state["step"]] = resume_from
            if main:
                for p in (errors_path, samples_path):
                    truncate_jsonl(p, state["step"])
        elif reference is not None and main:  # saved once: every checkpoint's reference model
            ckpt.save_reference(cfg.output_dir, reference)
        source_names = list(embedded.SOURCES) if cfg.data.train == EMBEDDED else None
        if main:
            logger = MetricsLogger(cfg.output_dir, title=_title(cfg), source_names=source_names,
                                   resume_step=start - 1 if resume_from else None, tensorboard=cfg.log.tensorboard)
        else:
            logger = distributed.NullLogger(cfg.output_dir)

        save_times: list[float] = []

        def save(step: int) -> str:  # a resumable checkpoint of the state after `step` (collective)
            if step not in saved:
                t = time.perf_counter()
                logger.sync()
                rank_files = distributed.gather_rng_files(info, {"shuffle": shuffle_gen}) \
                    if info.distributed else None
                gathered = opt_state.state_dict()  # FSDP2: a collective, every rank gathers
                path = None
                if main:
                    path = ckpt.save_checkpoint(
                        cfg.output_dir, step, model=policy.model, tokenizer=policy.tokenizer,
                        processor=policy.processor, image_processor=policy.image_processor,
                        optimizer=gathered, scheduler=scheduler,
                        generators={"shuffle": shuffle_gen}, config=to_dict(cfg), data_cursor=prompts.cursor,
                        seed=cfg.seed, elapsed=time.perf_counter() - t_start, keep_last=cfg.checkpoint.keep_last,
                        extra_files=rank_files)
                saved[step] = distributed.broadcast_object(path, info) if info.distributed else path
                save_times.append(time.perf_counter() - t)
            return saved[step]

        final_eval = {}
        progress.start_rl(rl_done=start - 1)
        try:
            if resume_from is None:  # step 0: the policy after the warm start
                t = time.perf_counter()
                evaluation = {**evaluate(engine, heldout, cfg), "time_eval": time.perf_counter() - t} \
                    if heldout and main else {}
                logger.log({"step": 0, "warmup_time_s": warmup_time, "elapsed": time.perf_counter() - t_start,
                            **evaluation})
            for step in range(start, cfg.max_steps + 1):
                t_step = time.perf_counter()
                times: dict[str, float] = {}

                # 1-3. rollouts, rewards, advantages (+ dynamic sampling); this rank's shard of the prompts
                with faults.oom_hint("generation", cfg), faults.nonfinite_outputs(step, "sampling probabilities", cfg):
                    batch, adv, stats, gen_info = collect_batch(engine, encoder, prompts, cfg, times, errors_path,
                                                                step, info=info)
                faults.kill_point("rollout", step)  # tests: killed mid-step
                if hasattr(engine, "sleep"):
                    engine.sleep()  # vLLM frees its GPU memory for steps 4-5; update_weights wakes it
                trained = [r for r in batch if not r.anchor]

                # 4. old (and reference) log-probs, no gradient (local: the plain HF model, no collective)
                t = time.perf_counter()
                with faults.oom_hint("old_logp", cfg):
                    old_logp = response_logprobs(policy.model, trained, encoder, cfg, device)
                    if any(not torch.isfinite(lp).all() for lp in old_logp):
                        raise faults.Diverged.in_outputs(step, "old log-probs", cfg)
                    # [] for a rank without rows (its padding micro-batches then carry a zero ref_logp too)
                    ref_logp = response_logprobs(reference, trained, encoder, cfg, device) \
                        if reference is not None else None
                times["time_old_logp"] = time.perf_counter() - t

                # 5. policy update (every rank takes part while any rank has rows)
                t = time.perf_counter()
                with faults.oom_hint("update", cfg):
                    upd = {}
                    if distributed.any_rank(bool(trained), info):
                        dummy = distributed.padding_row(trained, info)
                        upd = policy_update(train_model, optimizer, scheduler, trained, adv, old_logp, ref_logp,
                                            cfg, encoder.pad_token_id, device, shuffle_gen, dummy=dummy, step=step)
                    distributed.sync_generation_copy(train_model, policy.model, info)  # FSDP2 only
                engine.update_weights(policy.model)
                times["time_update"] = time.perf_counter() - t
                times["time_step"] = time.perf_counter() - t_step

                # log, evaluate (rank 0), plot, checkpoint
                rec = {"step": step, **step_metrics(batch, trained, adv, stats, old_logp, cfg), **upd, **gen_info,
                       **times, "elapsed": time.perf_counter() - t_start}
                rec["tokens_per_s"] = rec["gen_tokens"] / max(times["time_step"], 1e-9)
                if info.distributed:
                    rec = distributed.reduce_metrics(rec, info,
                                                     distributed.local_weights(batch, trained, stats, old_logp))
                t = time.perf_counter()
                if main and heldout and cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.max_steps:
                    rec.update(evaluate(engine, heldout, cfg), time_eval=time.perf_counter() - t)
                if main and step == cfg.max_steps and heldout:
                    final_eval = evaluate(engine, heldout, cfg)
                    rec.update(final_eval, time_eval=time.perf_counter() - t)
                rec = logger.log(rec)
                if main and rec["reward_errors"]:
                    progress.write(f"step {step}: {rec['reward_errors']} reward call(s) failed and scored 0 "
                               f"(sample ids in {errors_path})")
                if main and cfg.log.samples_every and (step % cfg.log.samples_every == 0 or step == 1):
                    _write_samples(samples_path, step, batch)
                if cfg.log.plot_every and step % cfg.log.plot_every == 0:
                    logger.plot()
                if cfg.save_every and step % cfg.save_every == 0 and step != cfg.max_steps:
                    save(step)
                if step != cfg.max_steps:
                    if info.distributed:  # every rank stops after the same step
                        sig = distributed.agree_signal(stop.requested, info)
                        if sig is not None and stop.requested is None:
                            stop.requested = sig
                    stop.check(step, lambda: save(step))  # a signal came: checkpoint, raise faults.Interrupted
                progress.rl_step(reward=f"{rec['reward_multi']:.2f}", mono=_fmt(rec.get("reward_mono")),
                                 acc=f"{rec['acc_multi']:.2f}")
        finally:
            progress.close()
            logger.close()
        plot = logger.plot()
        checkpoint = save(cfg.max_steps)
    if not final_eval and logger.records:  # resumed after the last step
        final_eval = {k: v for k, v in logger.records[-1].items() if k.startswith("eval_")}
    wall = time.perf_counter() - t_start
    result = TrainResult(cfg.output_dir, logger.path, plot, checkpoint, logger.records, final_eval, wall,
                         save_times)
    if main:
        _write_summary(cfg, result)
    return result


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


def _start_point(cfg: TrainConfig, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to resume from (None: a fresh run), after the checks that keep an
    earlier run's checkpoints: --resume with only unusable checkpoints and a fresh run into a
    directory with checkpoints (without ``overwrite``) are refused; nothing is deleted here."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir: {out} is a file, not a directory; choose another output_dir")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out} cannot be created ({parent} is "
                          f"{'not a directory' if not os.path.isdir(parent) else 'not writable'}); choose another "
                          "output_dir")
    if resume:
        first = None
        try:
            found = ckpt.find_resumable(out)
        except ckpt.CheckpointError as exc:  # the newest checkpoint is corrupt: list every problem
            found, first = None, str(exc)
        if found is not None:
            return found
        bad = ckpt.unusable_checkpoints(out)
        if first is not None and first not in bad:
            bad.insert(0, first)
        if bad:
            raise ckpt.CheckpointError(
                f"no checkpoint in {out} can be resumed, and nothing was deleted:\n  " + "\n  ".join(bad)
                + f"\nstart a new run there with: mars train {out}/config.yaml --overwrite (removes them), "
                  "or choose another output_dir")
        print(f"mars train: no checkpoint in {out}: starting the run over", file=sys.stderr)
        return None
    earlier = ckpt.earlier_checkpoints(out)
    if earlier and not overwrite:
        shown = ", ".join(earlier[-3:]) + (f" and {len(earlier) - 3} more" if len(earlier) > 3 else "")
        raise ConfigError(f"output_dir: {out} holds checkpoints of an earlier run ({shown}); continue it with "
                          f"`mars train --resume {out}`, replace it with --overwrite, or choose another output_dir")
    return None


def _wrap(model, info, cfg: TrainConfig):
    """What the update trains (``distributed.wrap_model``): ``model`` for one process; DDP
    around it (sharing its parameters); FSDP2 around a copy (``model`` stays the full
    weights that generate and are saved)."""
    if not info.distributed:
        return model
    src = model
    if cfg.dist.strategy == "fsdp2":
        src = copy.deepcopy(model)
        # ResponseModel returns the lm head's weight as a view (so it is in the graph); nothing here
        # modifies it in place, which is what this per-forward warning is about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return distributed.wrap_model(src, info, cfg.dist.strategy, find_unused_parameters=cfg.dist.find_unused_parameters)


def _check_resume_world(path: str, world_size: int) -> None:
    """A checkpoint resumes with the number of processes that wrote it (its
    ``rng_state_rank{r}.pt`` files; none for one process): ConfigError naming it."""
    n = len([f for f in os.listdir(path) if re.fullmatch(r"rng_state_rank\d+\.pt", f)])
    wrote = n if n else 1
    if wrote != world_size:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        how = "mars train" if wrote == 1 else f"torchrun --nproc_per_node {wrote} -m mars train"
        raise ConfigError(f"{path} was written by a {wrote}-process run and this run has {world_size}: resume "
                          f"with {how} --resume {run_dir} (the per-rank sampling streams cannot be re-split)")



# =============================================================================== 1-3. a batch
def collect_batch(engine, encoder, prompts, cfg: TrainConfig, times: dict, errors_path: str, step: int,
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
        t = time.perf_counter()  # encoding the prompts (image processing) counts as generation
        draw = prompts.next(want)
        drawn, sk = encode_prompts(encoder, distributed.shard_prompts(draw, info), cfg)
        times["time_generate"] = times.get("time_generate", 0.0) + time.perf_counter() - t
        skipped += sk
        n_drawn += len(drawn)
        rows = generate_rollouts(engine, drawn, cfg, times)
        t = time.perf_counter()
        score_rollouts(rows, cfg, errors_path if info.is_main else None, step)
        distributed.write_rank_errors(rows, cfg, step, errors_path, info)
        times["time_reward"] = times.get("time_reward", 0.0) + time.perf_counter() - t
        if not cfg.algorithm.dynamic_sampling:
            kept = rows
            n_kept = kept_here = len(drawn)
            break
        t = time.perf_counter()
        good = informative_groups(*compute_advantages(rows, cfg)) if rows else set()
        good = distributed.union_sets(good, info)
        times["time_advantage"] = times.get("time_advantage", 0.0) + time.perf_counter() - t
        mine = {p[0] for p in drawn}
        for g in [p[0] for p in draw]:  # in the global draw order, until the step is full
            if g in good and n_kept < want:
                kept += [r for r in rows if r.group == g]
                n_kept += 1
                kept_here += g in mine
        if n_kept >= want:
            break
    t = time.perf_counter()
    trained = [r for r in kept if not r.anchor]
    out = None
    if trained:
        out, _ = compute_advantages(kept, cfg)
        adv = out.advantages
    else:
        adv = torch.zeros(0)
    times["time_advantage"] = times.get("time_advantage", 0.0) + time.perf_counter() - t
    counts = {"groups_kept": kept_here, "groups_drawn": n_drawn, "gen_batches": n_batches, "prompts_skipped": skipped}
    return kept, adv, out, counts


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


def generate_rollouts(engine, drawn, cfg: TrainConfig, times: dict) -> list[Rollout]:
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
    t = time.perf_counter()
    if r.separate_anchor_call:
        out = engine.generate_ids(multi)
        times["time_generate_multi"] = times.get("time_generate_multi", 0.0) + time.perf_counter() - t
        t2 = time.perf_counter()
        out += engine.generate_ids(mono) if mono else []
        times["time_generate_mono"] = times.get("time_generate_mono", 0.0) + time.perf_counter() - t2
    else:
        out = engine.generate_ids(multi + mono)
    times["time_generate"] = times.get("time_generate", 0.0) + time.perf_counter() - t
    rows = []
    for (g, s, p), cs in zip(drawn, out[:len(multi)]):
        rows += [Rollout(g, f"{g}/r{j}", s, p, c) for j, c in enumerate(cs)]
    for (g, k), req, cs in zip(mono_meta, mono, out[len(multi):]):
        rows.append(Rollout(g, f"{g}/mono{k}", req.sample, None, cs[0], anchor=True, source=k))
    return rows


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


# =============================================================================== 4. old log-probs
def response_logprobs(model, rows: list[Rollout], encoder, cfg: TrainConfig, device) -> list:
    """Per-token log-probs (no gradient) of each row's response under ``model``, at the
    rollout temperature, in optim.micro_batch_size rows per forward ([] for no rows)."""
    if not rows:
        return []
    return row_logprobs(model, [r.prompt for r in rows], [r.completion.token_ids for r in rows],
                        encoder.pad_token_id, temperature=cfg.rollout.temperature,
                        micro_batch_size=cfg.optim.micro_batch_size, device=device, chunk_size=cfg.loss.chunk_size)


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
    (``distributed.accumulate_gradients``, the identity of :func:`accumulate_gradients`
    for a plain model).
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
            res = distributed.accumulate_gradients(
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


def accumulate_gradients(model, rows: list[Rollout], adv, old_logp, ref_logp, cfg: TrainConfig, pad_token_id: int,
                         device):
    """Backward of the loss of ``rows`` (one mini-batch) in micro-batches of
    optim.micro_batch_size rows. Every micro-batch loss is normalised by the whole
    mini-batch's token count (token-mean) / sequence count (seq-mean-*), so the summed
    gradients equal those of one pass over the mini-batch. Returns (loss, token-weighted
    loss metrics) or None when the rows have no tokens."""
    lengths = [len(r.completion.token_ids) for r in rows]
    num_tokens, num_seqs = sum(lengths), sum(L > 0 for L in lengths)
    if num_tokens == 0:
        return None
    opts = loss_options(cfg)
    mb = cfg.optim.micro_batch_size
    loss_total, sums = 0.0, {}
    for b in range(0, len(rows), mb):
        out = micro_batch_loss(model, rows[b:b + mb], adv[b:b + mb], old_logp[b:b + mb],
                               None if ref_logp is None else ref_logp[b:b + mb], opts, num_tokens, num_seqs,
                               cfg, pad_token_id, device)
        out.loss.backward()
        loss_total += float(out.loss.detach())
        n = float(out.metrics["num_tokens"])
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + (float(v) * n if k != "num_tokens" else n)
    n = max(sums["num_tokens"], 1.0)
    return loss_total, {k: (v / n if k != "num_tokens" else v) for k, v in sums.items()}


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


def rollout_is_metrics(trained: list[Rollout], old_logp, cfg: TrainConfig) -> dict:
    """rollout_is_mean (mean weight over the valid tokens; a sequence weight counts once per
    token) and rollout_is_clipped_frac (share of those tokens whose weight the cap cut)."""
    rows = [(r, lp) for r, lp in zip(trained, old_logp) if len(lp)]
    if not rows:
        return {"rollout_is_mean": None, "rollout_is_clipped_frac": None}
    T = max(len(lp) for _, lp in rows)
    old = _pad_rows([lp for _, lp in rows], T, "cpu")
    eng = _pad_rows(engine_logprobs([r for r, _ in rows], cfg), T, "cpu")
    mask = _pad_rows([torch.ones(len(lp)) for _, lp in rows], T, "cpu").bool()
    w, clipped = rollout_is_weights(old, eng, mask, cfg.loss.rollout_is, cfg.loss.rollout_is_cap)
    if w.dim() == 1:
        w, clipped = w[:, None].expand_as(mask), clipped[:, None].expand_as(mask)
    return {"rollout_is_mean": float(w[mask].mean()), "rollout_is_clipped_frac": float(clipped[mask].float().mean())}


# =============================================================================== warm start
def warm_start(policy, encoder, cfg: TrainConfig, task, prompts, device, stop=None, progress=None) -> None:
    """Supervised fine-tuning on responses in the answer format (the cold start):
    ``<think> ... </think> <answer> ANSWER </answer>`` + end of turn, token-mean
    cross-entropy, AdamW at warmup.lr. Embedded task: a warmup.single_share of the prompts
    show one source alone (answered with what it shows), the others both sources of a
    scene of warmup.categories (answered with the truth) or of warmup.unsure (answered
    yes or no at random); warmup.label_noise of the other answers flipped. File data: the training prompts with their ground truth.
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
            elif rng.random() < w.single_share:
                s = task.sample(step * w.batch_size + i, "warmup-single")
                samples.append(task.single_source(s, rng.randrange(len(embedded.SOURCES))))
            else:
                samples.append(task.sample(step * w.batch_size + i, "warmup",
                                           category=cats[rng.randrange(len(cats))]))
        targets = [warmup_target(s, rng, 0.5 if (s.extra_info or {}).get("category") in w.unsure and
                                 "source" not in s.extra_info else w.label_noise) for s in samples]
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


# =============================================================================== evaluation
def evaluate(engine, samples, cfg: TrainConfig) -> dict:
    """Greedy held-out accuracy (mars.rewards.metrics): multi-source, each single source
    (eval.mono), and per scene category when the samples have one."""
    from mars.rewards.metrics import sample_metric

    mode = cfg.rollout.mono if cfg.rollout.mono != "none" else "duplicate"
    greedy = SamplingConfig(max_new_tokens=cfg.rollout.max_new_tokens)
    jobs = []
    for s in samples:
        jobs.append((s, None, s))
        if cfg.eval.mono:
            jobs += [(s, k, v) for k, v in enumerate(s.mono_variants(mode))]
    with faults.oom_hint("evaluation", cfg):
        out = engine.generate_ids([GenerationRequest(v, greedy) for _, _, v in jobs])
    acc: dict[str, list] = {}
    for (s, k, v), cs in zip(jobs, out):
        c = float(sample_metric(s.task, cs[0].text, s.ground_truth)["correct"])
        key = "eval_acc_multi" if k is None else f"eval_acc_source_{k}"
        acc.setdefault(key, []).append(c)
        cat = s.extra_info.get("category") if isinstance(s.extra_info, dict) else None
        if cat is not None:
            acc.setdefault(f"{key}/{cat}", []).append(c)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


# =============================================================================== metrics
def step_metrics(batch: list[Rollout], trained: list[Rollout], adv, stats, old_logp, cfg) -> dict:
    anchors = [r for r in batch if r.anchor]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    m: dict[str, Any] = {
        "reward_multi": mean(r.reward for r in trained) if trained else 0.0,
        "reward_mono": mean(r.reward for r in anchors),
        "acc_multi": mean(r.accuracy for r in trained) if trained else 0.0,
        "acc_mono": mean(r.accuracy for r in anchors),
        "format_multi": mean(r.format for r in trained),
        "reward_errors": sum(r.error is not None for r in batch),
        "response_length": mean(len(r.completion.token_ids) for r in trained),
        "response_length_max": max((len(r.completion.token_ids) for r in trained), default=None),
        "anchor_response_length": mean(len(r.completion.token_ids) for r in anchors),
        "truncated_frac": mean(r.completion.finish_reason == "length" for r in trained),
        "gen_tokens": sum(len(r.completion.token_ids) for r in batch),
        "rollouts": len(trained), "anchors": len(anchors),
    }
    if stats is not None:
        gains = [g for g in stats.gain.tolist() if not math.isnan(g)]
        m.update(gain=mean(gains), pooled_std=float(stats.std.mean()),
                 frac_zero_std=float((stats.std == 0).float().mean()),
                 adv_mean=float(adv.mean()), adv_std=float(adv.std()) if adv.numel() > 1 else 0.0,
                 adv_abs_mean=float(adv.abs().mean()), adv_min=float(adv.min()), adv_max=float(adv.max()))
        # groups where plain GRPO has no signal (all G multi rewards equal)
        by_group: dict[str, set] = {}
        for r in trained:
            by_group.setdefault(r.group, set()).add(r.reward)
        m["frac_zero_std_multi"] = mean(len(v) == 1 for v in by_group.values())
        # advantage that reaches those groups (MARS: sign(gain); GRPO: 0)
        flat = [abs(float(a)) for r, a in zip(trained, adv.tolist()) if len(by_group[r.group]) == 1]
        m["adv_abs_mean_equal_groups"] = mean(flat)
    m.update(category_metrics(trained, anchors))
    diffs = [(torch.tensor(r.completion.logprobs) - lp).abs().mean().item()
             for r, lp in zip(trained, old_logp) if r.completion.logprobs is not None and len(lp)]
    m["rollout_logp_diff"] = mean(diffs)
    if cfg.loss.rollout_is != "off":
        m.update(rollout_is_metrics(trained, old_logp, cfg))
    return m


def category_metrics(trained: list[Rollout], anchors: list[Rollout]) -> dict:
    """Training accuracy per scene category (samples whose extra_info names one, as the
    embedded task's): ``acc_multi/{c}`` over the sampled rollouts, ``acc_source_{k}/{c}``
    over the greedy anchors of source k. What the anchors answer where GRPO's group has
    no signal is what MARS adds (docs/train.md)."""
    acc: dict[str, list[float]] = {}
    for r in trained + anchors:
        cat = r.sample.extra_info.get("category") if isinstance(r.sample.extra_info, dict) else None
        if cat is not None:
            key = "acc_multi" if not r.anchor else f"acc_source_{r.source}"
            acc.setdefault(f"{key}/{cat}", []).append(r.accuracy)
    return {k: sum(v) / len(v) for k, v in sorted(acc.items())}


# =============================================================================== pieces
@dataclass
class Policy:
    model: Any
    tokenizer: Any
    processor: Any = None
    image_processor: Any = None


def max_positions(model) -> int | None:
    """The text model's ``max_position_embeddings`` (None when the config has none)."""
    cfg = getattr(model, "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        n = getattr(c, "max_position_embeddings", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def engine_options(cfg: TrainConfig, model=None) -> dict:
    """``build_rollout_engine``'s options for ``cfg.rollout.engine`` (docs/vllm.md).
    vLLM's max_model_len: rollout.vllm.max_model_len, else rollout.max_prompt_length +
    rollout.max_new_tokens capped at ``model``'s max_position_embeddings (vLLM refuses more)."""
    r = cfg.rollout
    if r.engine == "hf":
        return {"max_batch_rows": r.max_batch_rows}
    v = r.vllm
    max_len = v.max_model_len
    if max_len is None:
        max_len = r.max_prompt_length + r.max_new_tokens
        if (positions := max_positions(model)) is not None:
            max_len = min(max_len, positions)
    return dict(max_batch_rows=r.max_batch_rows, gpu_memory_utilization=v.gpu_memory_utilization,
                enable_sleep_mode=v.enable_sleep_mode, sleep_level=v.sleep_level,
                max_model_len=max_len,
                limit_mm_per_prompt=v.max_images, seed=cfg.seed, enforce_eager=v.enforce_eager,
                logprobs_mode=v.logprobs_mode, model_path=None if cfg.model.path == TINY else cfg.model.path)


def build_policy(cfg: TrainConfig, device) -> Policy:
    """The tiny model built locally (model.path = "tiny") or a checkpoint loaded with
    AutoModelForImageTextToText + AutoProcessor (local directory or hub name)."""
    if cfg.model.path == TINY:
        from .tiny import build_tiny

        t = cfg.model.tiny
        model, tok, improc = build_tiny(embedded.VOCAB, arch=t.arch, hidden_size=t.hidden_size,
                                        num_layers=t.num_layers, num_heads=t.num_heads,
                                        vision_hidden_size=t.vision_hidden_size, vision_depth=t.vision_depth,
                                        image_size=cfg.task.image_size, seed=cfg.seed)
        model = model.to(device=device, dtype=_dtype(cfg.model.dtype) or torch.float32)
        policy = Policy(model, tok, None, improc)
    else:
        from transformers import AutoModelForImageTextToText

        from mars.rollout.hf import load_processor

        try:
            model = AutoModelForImageTextToText.from_pretrained(cfg.model.path, **model_load_kwargs(cfg, device))
            processor, tok, improc = load_processor(cfg.model.path)
        except (OSError, ValueError) as exc:  # not a model directory / hub name, unreadable files, unknown config
            raise ConfigError(f"model.path: cannot load a model and processor from {cfg.model.path!r}: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        model = model.to(device)
        policy = Policy(model, tok if processor is None else processor.tokenizer, processor, improc)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return policy


def model_load_kwargs(cfg: TrainConfig, device) -> dict:
    """from_pretrained keywords: dtype and attention implementation (flash_attention_2
    when flash-attn is installed and the device is a GPU, else sdpa, for "auto")."""
    import importlib.util

    attn = cfg.model.attn_implementation
    if attn == "auto":
        on_gpu = torch.device(device).type == "cuda"
        attn = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    return {"dtype": _dtype(cfg.model.dtype) or "auto", "attn_implementation": attn}


def _dtype(name: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


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


def _heldout(cfg: TrainConfig, task):
    if cfg.data.eval is None:
        return []
    if cfg.data.eval == EMBEDDED:
        s = task.balanced(cfg.task.eval_per_category, "eval")
    else:
        from mars.data import load_samples

        s = load_samples(cfg.data.eval, image_root=cfg.data.image_root, task=cfg.data.task)
    return s[:cfg.data.eval_limit] if cfg.data.eval_limit is not None else s


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _tqdm(cfg, **kw):
    """A progress bar (log.progress), on rank 0 only under torchrun."""
    from tqdm.auto import tqdm

    return tqdm(disable=not (cfg.log.progress and distributed.current().is_main), dynamic_ncols=True, **kw)


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def _title(cfg: TrainConfig) -> str:
    method = "GRPO" if cfg.rollout.mono == "none" else f"GRPO+MARS ({cfg.rollout.mono} anchors)"
    if cfg.algorithm.dynamic_sampling:
        method = method.replace("GRPO", "DAPO")
    return f"mars train: {method}, G={cfg.rollout.n}, seed {cfg.seed} ({cfg.output_dir})"


def _check_resume_config(cfg: TrainConfig, state: dict, path: str) -> None:
    """The config to resume with is the checkpoint's, but for the keys --resume may change."""
    from .config import RESUME_KEYS

    if state["step"] > cfg.max_steps:
        raise ConfigError(f"max_steps: {cfg.max_steps} is below the step of the checkpoint to resume ({path})")
    saved = dict(state.get("config", {}))
    saved.setdefault("dist", to_dict(cfg)["dist"])  # written before the dist section existed
    diff = ckpt.config_differences(saved, to_dict(cfg), (*RESUME_KEYS, "output_dir"))
    if diff:
        raise ConfigError(f"{cfg.output_dir}/config.yaml differs from the config checkpoint {path} was written "
                          f"with at {', '.join(diff)}; a resumed run keeps its config (--resume may change only "
                          "max_steps, save_every, checkpoint.*, log.* and the memory keys)")


def _write_samples(path: str, step: int, batch: list[Rollout], per_kind: int = 4) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in [r for r in batch if not r.anchor][:per_kind] + [r for r in batch if r.anchor][:per_kind]:
            f.write(json.dumps({"step": step, "id": r.uid, "anchor": r.anchor, "source": r.source,
                                "ground_truth": str(r.sample.ground_truth), "reward": r.reward,
                                "text": r.completion.text}) + "\n")


def _write_summary(cfg: TrainConfig, result: TrainResult) -> None:
    steps = [r for r in result.records if r.get("step", 0) >= 1]
    summary = {"output_dir": cfg.output_dir, "steps": len(steps), "wall_time_s": result.wall_time,
               "first_reward_multi": steps[0]["reward_multi"] if steps else None,
               "last_reward_multi": steps[-1]["reward_multi"] if steps else None,
               "final_eval": result.final_eval, "checkpoint": result.checkpoint,
               "metrics": result.metrics_path, "plot": result.plot_path,
               "checkpoints_written": len(result.checkpoint_times or []),
               "checkpoint_time_s": sum(result.checkpoint_times or [])}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)

