"""``mars train`` command line (docs/train.md).

    mars train [CONFIG.yaml | NAME] [key=value ...]     train (no arguments: the embedded default)
    mars train --resume OUTPUT_DIR [key=value ...]      go on from OUTPUT_DIR's newest checkpoint
    mars train --compare [CONFIG] [key=value ...]       GRPO / DAPO with and without MARS on the same seeds
    --overwrite                                         a fresh run may replace an earlier run's checkpoints
    mars train --list-keys                              every config key with its default

Exit status: 0 done, 2 usage / config / checkpoint error, 128 + N stopped by signal N
(SIGINT 130, SIGTERM 143) after writing a checkpoint.

Under ``torchrun --nproc_per_node N -m mars train ...`` every rank runs this; rank 0 alone
prints the report, and every rank leaves the process group at the end, errors included
(docs/distributed.md).
"""

from __future__ import annotations

import os
import sys

from .config import RESUME_KEYS, RESUME_MEMORY_KEYS, ConfigError, describe, load_config, load_resume_config, \
    shipped_configs

__all__ = ["cli_main", "USAGE"]

USAGE = """usage: mars train [CONFIG.yaml | NAME] [--overwrite] [key=value ...]
       mars train --resume OUTPUT_DIR [key=value ...]
       mars train --compare [CONFIG.yaml | NAME] [--overwrite] [key=value ...]
       mars train --list-keys

Train a VLM with GRPO / DAPO + MARS (mono-anchored advantages). With no arguments: the
embedded default, a tiny Qwen2-VL-style model on a synthetic RGB + infrared task, on CPU in
minutes. NAME is a shipped config ({configs}). Nested keys with dots, values as YAML:
  mars train max_steps=50 loss.clip_high=0.28 rollout.mono=single
  mars train grpo_mars_qwen2_5_vl_3b model.path=/ckpt/qwen2.5-vl-3b-sft data.train=train.parquet
--resume goes on from the newest complete checkpoint of OUTPUT_DIR with the config saved
there (OUTPUT_DIR/config.yaml), appending to its metrics.jsonl; a run stopped at any
moment (SIGKILL included) and resumed writes the same metrics and weights as one that never
stopped. Overrides on resume: {resume_keys};
after running out of memory also {memory_keys}
(batched differently: equal up to rounding, no longer bit for bit).
A fresh run into an OUTPUT_DIR that holds an earlier run's checkpoints is refused (continue
it with --resume); --overwrite replaces it, once the data and the model have loaded.
--compare runs compare.methods (GRPO, GRPO+MARS, DAPO, DAPO+MARS) on compare.seeds and reports
the paired differences with 95% confidence intervals (docs/train.md).
"""


def _split_args(argv):
    flags = [a for a in argv if a.startswith("--")]
    rest = [a for a in argv if not a.startswith("--")]
    config = None
    if rest and "=" not in rest[0]:
        config, rest = rest[0], rest[1:]
    bad = [a for a in rest if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config, got {bad[0]!r}")
    return flags, config, rest


def _print_keys() -> None:
    for key, typ, default, help_ in describe():
        print(f"{key} = {default!r}  ({typ})\n    {help_}")


def _minutes(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def cli_main(argv) -> int:
    """Entry point of ``mars train``; returns the exit status (0 ok, 2 usage / config error)."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(configs=", ".join(shipped_configs()), resume_keys=", ".join(
            k + "*" if k.endswith(".") else k for k in RESUME_KEYS if k not in RESUME_MEMORY_KEYS),
            memory_keys=", ".join(RESUME_MEMORY_KEYS)))
        return 0
    resume = None
    if "--resume" in argv:  # --resume OUTPUT_DIR
        i = argv.index("--resume")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--") or "=" in argv[i + 1]:
            print("mars train: error: --resume needs the run's OUTPUT_DIR (mars train --resume OUTPUT_DIR "
                  "[key=value ...])", file=sys.stderr)
            return 2
        resume = argv.pop(i + 1)
    try:
        flags, config, overrides = _split_args(argv)
        unknown = [f for f in flags if f not in ("--compare", "--list-keys", "--resume", "--overwrite")]
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]}; options: --resume, --compare, --overwrite, --list-keys, "
                              "--help")
        if "--list-keys" in flags:
            _print_keys()
            return 0
        if resume is not None:
            if config is not None or "--compare" in flags or "--overwrite" in flags:
                raise ConfigError("--resume OUTPUT_DIR takes the config saved in OUTPUT_DIR and keeps its checkpoints: "
                                  "no CONFIG, no --compare, no --overwrite")
            cfg = load_resume_config(resume, overrides)
        else:
            cfg = load_config(config, overrides)
    except ConfigError as exc:
        print(f"mars train: error: {exc}", file=sys.stderr)
        return 2
    if "--compare" in flags:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            print("mars train: error: --compare runs one process (not under torchrun)", file=sys.stderr)
            return 2
        from mars.data import DataFormatError

        from .compare import run_compare
        from .faults import Diverged, Interrupted

        explicit_dir = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
        try:
            res = run_compare(cfg, output_dir=None if explicit_dir or config else "mars_train/compare",
                              overwrite="--overwrite" in flags)
        except Interrupted as exc:
            print(f"\nmars train --compare: {exc} (that run alone; --compare starts over, with --overwrite)",
                  file=sys.stderr)
            return exc.exit_code
        except (ConfigError, DataFormatError) as exc:
            print(f"mars train: error: {exc}", file=sys.stderr)
            return 2
        except Diverged as exc:
            print(f"mars train --compare: error: {exc}", file=sys.stderr)
            return 1
        print(res.table)
        print(f"\nplot:    {res.plot_path}\nsummary: {res.summary_path}")
        return 0
    from mars.data import DataFormatError

    from . import distributed
    from .checkpoint import CheckpointError
    from .faults import Diverged, Interrupted
    from .loop import train

    try:
        try:
            res = train(cfg, resume=resume is not None, overwrite="--overwrite" in flags)
        except Interrupted as exc:
            if distributed.current().is_main:
                print(f"\nmars train: {exc}", file=sys.stderr)
            return exc.exit_code
        except Diverged as exc:
            if distributed.current().is_main:  # every rank stops at the same step (the norm is global)
                print(f"mars train: error: {exc}", file=sys.stderr)
            return 1
        except (CheckpointError, ConfigError, DataFormatError) as exc:
            info = distributed.current()
            if info.is_main:  # every rank raises the same error
                print(f"mars train: error: {exc}", file=sys.stderr)
            return 2
        if distributed.current().is_main:
            _report(cfg, res)
        distributed.shutdown(barrier=True)  # every rank leaves together
        return 0
    finally:
        distributed.shutdown()


def _report(cfg, res) -> None:
    steps = [r for r in res.records if r.get("step", 0) >= 1]
    print(f"\nmars train: done in {_minutes(res.wall_time)} ({len(steps)} RL steps)")
    if steps:
        k = min(10, len(steps))
        first = sum(r["reward_multi"] for r in steps[:k]) / k
        last = sum(r["reward_multi"] for r in steps[-k:]) / k
        print(f"  multi reward: step 1 {steps[0]['reward_multi']:.3f} -> step {steps[-1]['step']} "
              f"{steps[-1]['reward_multi']:.3f} (mean of the first / last {k} steps: {first:.3f} -> {last:.3f})")
    if res.final_eval:
        ev = res.final_eval
        names = ["rgb", "infrared"] if cfg.data.train == "embedded" else None
        parts = [f"multi {ev['eval_acc_multi']:.3f}"]
        k = 0
        while f"eval_acc_source_{k}" in ev:
            parts.append(f"{names[k] if names and k < len(names) else f'source {k}'} only "
                         f"{ev[f'eval_acc_source_{k}']:.3f}")
            k += 1
        print("  held-out accuracy: " + ", ".join(parts))
    print(f"  metrics:    {res.metrics_path}")
    print(f"  plot:       {res.plot_path}")
    print(f"  checkpoint: {res.checkpoint}")
    heldout = os.path.join(cfg.output_dir, "heldout", "heldout.json")
    if os.path.isfile(heldout):
        print(f"  evaluate:   mars eval --model {res.checkpoint} --data {heldout} --mono "
              f"--max-new-tokens {cfg.rollout.max_new_tokens}")
