"""The MARS trainer, top to bottom: `train(cfg)` is the whole recipe (docs/train.md).

Per RL step, one module per phase:

1. rollout   (rollouts.py) G sampled responses per multi-source prompt (temperature,
             top_p) and one greedy response per source (the mono anchors, never trained
             on), all in one ``engine.generate_ids`` call; the engine returns token ids.
2. reward    (advantages.py) the mars.rewards registry scores every response; a reward
             that raises or is not finite gives 0, is counted (``reward_errors``) and
             logged with the sample id in OUTPUT_DIR/reward_errors.jsonl; the run goes on.
3. advantage (advantages.py) ``mars.mono_anchored_advantage`` with every rollout and
             anchor labelled by its prompt id (never matched by position). DAPO's dynamic
             sampling drops groups whose *pooled* std is 0 and draws more prompts, up to a
             bound (``collect_batch``: steps 1-3).
4. old logp  (update.py) log-probs of the trained responses under the current policy, no
             gradient (and under the frozen reference model when loss.kl_coef > 0).
5. update    (update.py) ``mars.loss`` (plain or fused lm head) over mini-batches x
             micro-batches with the mini-batch's token / sequence counts as global
             normalisers, so the accumulated gradient is the mini-batch's; AdamW with
             linear warm-up.

Everything the step measured (metrics.py; the phase times from timer.PhaseTimer) goes to
one JSON line of OUTPUT_DIR/metrics.jsonl. Before RL: the supervised warm start
(warm_start.py) of the policy (policy.py); checkpoints: checkpoint.py; data parallelism:
distributed.py (collectives, model wrapping, per-rank RNG).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch

from mars.rollout import build_rollout_engine

from . import checkpoint as ckpt
from . import distributed, faults
from . import task as embedded
from .advantages import collect_batch, compute_advantages, informative_groups, score_rollouts
from .config import EMBEDDED, ConfigError, TrainConfig, save_config, to_dict
from .logger import MetricsLogger, NullLogger, truncate_jsonl
from .metrics import local_weights, reduce_metrics, step_metrics, timed_evaluate
from .policy import build_policy, engine_options, frozen_copy, resolve_device, training_model
from .progress import RunProgress
from .rollouts import PromptSource, Rollout, heldout_samples
from .timer import PhaseTimer
from .update import lr_factor, old_logprobs, policy_update
from .warm_start import rl_step_cost_ratio, warm_start

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
    resume_from = _resume_point(cfg, resume, overwrite, info)
    _seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = info.device if info.distributed else resolve_device(cfg.model.device)
    errors_path = os.path.join(cfg.output_dir, "reward_errors.jsonl")
    samples_path = os.path.join(cfg.output_dir, "samples.jsonl")

    # ---- data, model, engine
    task = embedded.EmbeddedTask(cfg.task.mix, cfg.task.image_size, cfg.task.noise, seed=cfg.seed) \
        if EMBEDDED in (cfg.data.train, cfg.data.eval) else None
    prompts = PromptSource(cfg, task)
    heldout = heldout_samples(cfg, task)
    policy = build_policy(cfg, device)
    options = engine_options(cfg, policy.model)
    if "seed" in options:  # vLLM's sampling seed: each rank its own stream (rank 0: cfg.seed)
        options["seed"] = distributed.rank_seed(cfg.seed, info)
    engine = build_rollout_engine(cfg.rollout.engine, policy, **options)
    engines.append(engine)
    encoder = engine.encoder
    if main:  # the inputs loaded: only now is OUTPUT_DIR written (an earlier run's checkpoints removed)
        _prepare_output_dir(cfg, resume_from, heldout, (errors_path, samples_path))

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
        reference = frozen_copy(policy.model) if cfg.loss.kl_coef > 0 else None
        train_model = training_model(policy.model, info, cfg)
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
            logger = NullLogger(cfg.output_dir)

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
                evaluation = timed_evaluate(engine, heldout, cfg) if heldout and main else {}
                logger.log({"step": 0, "warmup_time_s": warmup_time, "elapsed": time.perf_counter() - t_start,
                            **evaluation})
            for step in range(start, cfg.max_steps + 1):
                timer = PhaseTimer()
                # 1-3. rollouts, rewards, advantages (+ dynamic sampling); this rank's shard of the prompts
                with faults.oom_hint("generation", cfg), faults.nonfinite_outputs(step, "sampling probabilities", cfg):
                    batch, adv, stats, gen_info = collect_batch(engine, encoder, prompts, cfg, timer, errors_path,
                                                                step, info=info)
                faults.kill_point("rollout", step)  # tests: killed mid-step
                if hasattr(engine, "sleep"):
                    engine.sleep()  # vLLM frees its GPU memory for steps 4-5; update_weights wakes it
                trained = [r for r in batch if not r.anchor]

                # 4. old (and reference) log-probs, no gradient (local: the plain HF model, no collective)
                with timer("old_logp"), faults.oom_hint("old_logp", cfg):
                    old_logp, ref_logp = old_logprobs(policy.model, reference, trained, encoder, cfg, device, step)

                # 5. policy update (every rank takes part while any rank has rows)
                with timer("update"):
                    with faults.oom_hint("update", cfg):
                        upd = {}
                        if distributed.any_rank(bool(trained), info):
                            dummy = distributed.padding_row(trained, info)
                            upd = policy_update(train_model, optimizer, scheduler, trained, adv, old_logp, ref_logp,
                                                cfg, encoder.pad_token_id, device, shuffle_gen, dummy=dummy, step=step)
                        distributed.sync_generation_copy(train_model, policy.model, info)  # FSDP2 only
                    engine.update_weights(policy.model)
                timer.stop("step")

                # log, evaluate (rank 0), plot, checkpoint
                rec = {"step": step, **step_metrics(batch, trained, adv, stats, old_logp, cfg), **upd, **gen_info,
                       **timer.as_metrics(), "elapsed": time.perf_counter() - t_start}
                rec["tokens_per_s"] = rec["gen_tokens"] / max(rec["time_step"], 1e-9)
                if info.distributed:
                    rec = reduce_metrics(rec, info, local_weights(batch, trained, stats, old_logp))
                if main and heldout and (step == cfg.max_steps or (cfg.eval.every and step % cfg.eval.every == 0)):
                    evaluation = timed_evaluate(engine, heldout, cfg)
                    rec.update(evaluation)
                    if step == cfg.max_steps:
                        final_eval = {k: v for k, v in evaluation.items() if k != "time_eval"}
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
                if step != cfg.max_steps:  # a signal came (to any rank): checkpoint, raise faults.Interrupted
                    _stop_if_signalled(stop, step, save, info)
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


def _resume_point(cfg: TrainConfig, resume: bool, overwrite: bool, info) -> str | None:
    """Where the run starts (a checkpoint to resume, None: a fresh run): rank 0 decides
    (:func:`_start_point` and the resume checks), the others learn it (and any error) from
    it; every rank raises rank 0's error."""
    resume_from, problem = None, None
    if info.is_main:
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
    return resume_from


def _prepare_output_dir(cfg: TrainConfig, resume_from: str | None, heldout, fresh_files) -> None:
    """Rank 0, once the inputs loaded: OUTPUT_DIR made (a fresh run: an earlier run's
    checkpoints removed, ``fresh_files`` emptied), config.yaml written, and the embedded
    held-out set as a `mars eval` file."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    if resume_from is None:
        if n := ckpt.clear_checkpoints(cfg.output_dir):
            print(f"mars train: --overwrite: removed {n} checkpoint(s) of an earlier run in {cfg.output_dir}",
                  file=sys.stderr)
        for p in fresh_files:
            open(p, "w").close()
    save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    if cfg.data.eval == EMBEDDED and heldout:
        embedded.write_eval_file(heldout, os.path.join(cfg.output_dir, "heldout"))


def _stop_if_signalled(stop, step: int, save, info) -> None:
    """After ``step``: when a stop signal came (under torchrun: to any rank, so that every
    rank stops after the same step), checkpoint and raise ``faults.Interrupted``."""
    if info.distributed:
        sig = distributed.agree_signal(stop.requested, info)
        if sig is not None and stop.requested is None:
            stop.requested = sig
    stop.check(step, lambda: save(step))


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
