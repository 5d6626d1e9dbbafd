"""``mars train`` configuration: dataclasses with defaults, YAML files, dotted overrides.

    cfg = load_config("grpo_mars_qwen2_5_vl_3b", ["optim.lr=2e-6", "loss.clip_high=0.28"])
    cfg.rollout.n, cfg.loss.clip_high, to_dict(cfg)

A config is the defaults below (the embedded tiny default), overlaid by a YAML file (a path,
or the name of a config shipped in ``mars/train/configs``), overlaid by ``key=value``
overrides (values read as YAML: ``1e-6``, ``true``, ``null``, ``[0, 1]``). Everything is
checked before any work starts: an unknown key, a value of the wrong type or outside its
choices, or a file that does not exist raises :class:`ConfigError` naming the key (and
the valid keys of its section). docs/train.md lists every key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mars_kernels.constants import CLIP_HIGH, CLIP_LOW, LOSS_AGGS  # pure Python: no torch at import

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_overrides", "to_dict", "shipped_configs",
           "config_path", "describe", "validate", "save_config", "load_resume_config", "RESUME_KEYS",
           "EMBEDDED", "TINY"]

EMBEDDED = "embedded"  # data.train / data.eval: the embedded synthetic task
TINY = "tiny"          # model.path: the tiny model built locally
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def F(default, help: str, **meta):  # noqa: N802 - a field with its documentation
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TinyModelConfig:
    arch: Literal["qwen2_vl", "qwen2_5_vl"] = F("qwen2_vl", "transformers class: Qwen2-VL or Qwen2.5-VL")
    hidden_size: int = F(64, "text hidden size")
    num_layers: int = F(2, "text decoder layers")
    num_heads: int = F(2, "text attention heads (hidden_size / num_heads a multiple of 8; 32 or more for "
                          "rollout.engine=vllm on a CPU)")
    vision_hidden_size: int = F(32, "vision tower width")
    vision_depth: int = F(2, "vision tower blocks")


@dataclass
class ModelConfig:
    path: str = F(TINY, "'tiny' (built locally) or a checkpoint: local directory or hub name, loaded with "
                        "AutoModelForImageTextToText / AutoProcessor")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = F("float32", "parameter dtype")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = F(
        "auto", "auto: flash_attention_2 when flash-attn is installed and the model is on a GPU, else sdpa")
    device: str = F("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    gradient_checkpointing: bool = F(False, "recompute activations in the backward pass")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "sizes of the tiny model"})


@dataclass
class TaskConfig:
    mix: dict = F({"day_person": 0.2, "day_empty": 0.15, "night_empty": 0.15, "day_heater": 0.25,
                   "night_person": 0.25}, "share of each scene category of the embedded task (docs/train.md)",
                  value_type=float)
    image_size: int = F(56, "side of each image in pixels (multiple of 28)")
    noise: float = F(0.05, "pixel noise std")
    eval_per_category: int = F(40, "held-out prompts per category")


@dataclass
class DataConfig:
    train: str = F(EMBEDDED, "'embedded' (the synthetic task) or a .parquet / .json / .jsonl file (mars.data)",
                   path=True)
    eval: Optional[str] = F(EMBEDDED, "held-out set: 'embedded', a file, or null (none)", path=True)
    image_root: Optional[str] = F(None, "base directory of relative image paths (default: each file's)",
                                  path=True, directory=True)
    task: Optional[Literal["grounding", "vqa", "mcq"]] = F(None, "force the task of every sample")
    eval_limit: Optional[int] = F(None, "evaluate only the first N held-out samples")
    shuffle: bool = F(True, "shuffle the training prompts every epoch")


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = F(0.3, "fraction of the whole GPU the colocated vLLM takes (weights + KV cache)")
    enable_sleep_mode: bool = F(True, "free vLLM's GPU memory during the old log-probs and the update (sleep/wake_up; "
                                      "ignored, with a notice, where vLLM has no sleep mode: its CPU build)")
    sleep_level: int = F(1, "1: offload vLLM's weights to CPU while asleep; 2: discard them (they are re-pushed)")
    max_model_len: Optional[int] = F(None, "tokens per sequence (null: rollout.max_prompt_length + "
                                           "rollout.max_new_tokens, at most the model's max_position_embeddings)")
    max_images: int = F(6, "images per prompt (vLLM's limit_mm_per_prompt)")
    enforce_eager: bool = F(False, "no CUDA graphs (less memory, slower)")
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = F(
        "processed_logprobs", "engine log-probs: after temperature/top-p (processed) or before (raw; equals the "
                              "trainer's at temperature 1)")


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = F("hf", "generation engine (hf: transformers generate; vllm: a colocated "
                                            "vllm.LLM, docs/vllm.md)")
    n: int = F(8, "G: sampled rollouts per prompt")
    temperature: float = F(1.0, "sampling temperature of the G rollouts")
    top_p: float = F(1.0, "nucleus of the G rollouts (1.0: no cut; below 1 a policy surer than top_p samples one answer only)")
    max_new_tokens: int = F(16, "maximum response length (L_max)")
    max_prompt_length: int = F(4096, "prompts with more tokens are skipped (counted in prompts_skipped)")
    mono: Literal["duplicate", "single", "none"] = F(
        "duplicate", "mono anchors: source k in every image slot (duplicate), one image (single), or none "
                     "(plain GRPO / DAPO)")
    separate_anchor_call: bool = F(False, "generate the anchors in a second call (timing only)")
    max_batch_rows: Optional[int] = F(None, "rows per model.generate; vllm: max_num_seqs (null: one call for the "
                                            "whole step / vLLM's default)")
    vllm: VLLMConfig = field(default_factory=VLLMConfig, metadata={"help": "rollout.engine=vllm settings"})


@dataclass
class AlgorithmConfig:
    norm_by_std: bool = F(True, "divide by the pooled std (false: Dr.GRPO r - mu)")
    eps: float = F(1e-6, "added to the std")
    unbiased: bool = F(True, "sample std (N - 1) or population std")
    singleton: Literal["zero", "raw"] = F("zero", "advantage of a group of one value")
    dynamic_sampling: bool = F(False, "DAPO: drop groups whose pooled std is 0 and draw more prompts")
    max_gen_batches: int = F(3, "dynamic sampling: at most this many generation batches per step")
    overlong_buffer: int = F(0, "DAPO overlong shaping L_buf (0: off); L_max = rollout.max_new_tokens")
    backend: str = F("auto", "backend of mars.mono_anchored_advantage")


@dataclass
class RewardConfig:
    name: Optional[str] = F(None, "mars.rewards registry name (null: each sample's task)")


@dataclass
class LossConfig:
    clip_low: float = F(CLIP_LOW, "ratio clipped to [1 - clip_low, 1 + clip_high]")
    clip_high: float = F(CLIP_HIGH, "clip-higher (DAPO 0.28)")
    dual_clip: Optional[float] = F(3.0, "dual-clip c for negative advantages (null: off)")
    agg: Literal[LOSS_AGGS] = F("token-mean", "loss aggregation")
    kl_coef: float = F(0.0, "beta of the KL to a frozen reference model (0: no reference model)")
    kl_type: Literal["k1", "k2", "k3", "k3_ratio"] = F(
        "k3", "KL estimator (k3_ratio: k3 times the policy ratio, TRL's use_bias_correction_kl)")
    ratio_level: Literal["token", "sequence"] = F("token", "token ratio or GSPO sequence ratio")
    log_ratio_clamp: Optional[float] = F(20.0, "clamp of the log-ratio (null: off)")
    loss_scale: Optional[float] = F(None, "seq-mean-token-sum-norm divisor (null: rollout.max_new_tokens)")
    fused: bool = F(False, "fused lm-head path (mars.loss.fused_linear_policy_loss): no [tokens x vocab] logits")
    chunk_size: Optional[int] = F(None, "fused path: tokens per logits block (null: automatic)")
    rollout_is: Literal["off", "token", "sequence"] = F(
        "off", "truncated importance sampling of the engine / trainer log-prob mismatch (verl rollout_is, TRL "
               "vllm_importance_sampling_correction): weights min(exp(old_logp - engine logp), cap) per token, or "
               "of the row's mean log-ratio (sequence)")
    rollout_is_cap: float = F(2.0, "upper cap of the rollout_is weights (verl's rollout_is_threshold 2.0; TRL "
                                   "1.16's vllm_importance_sampling_clip_max is 3.0)")
    backend: str = F("auto", "backend of mars.loss")


@dataclass
class OptimConfig:
    prompts_per_step: int = F(16, "prompts per RL step")
    lr: float = F(3e-4, "AdamW learning rate")
    weight_decay: float = F(0.0, "AdamW weight decay")
    betas: list = F([0.9, 0.999], "AdamW betas", value_type=float, length=2)
    warmup_steps: int = F(0, "linear learning-rate warm-up (optimizer steps)")
    lr_schedule: Literal["constant", "linear", "cosine"] = F("constant", "learning rate after the warm-up: constant, "
                                                                       "or decayed to 0 at the last optimizer step "
                                                                       "(max_steps x mini_batches x epochs) linearly "
                                                                       "or along a half cosine")
    max_grad_norm: Optional[float] = F(1.0, "gradient clipping (null: off)")
    on_nonfinite: Literal["stop", "skip"] = F("stop", "a non-finite loss or gradient norm: stop the run before the "
                                                      "weights change (exit 1, the last checkpoint intact), or skip "
                                                      "that optimizer step and count it (skipped_steps)")
    mini_batches: int = F(4, "optimizer steps per RL step (the rollouts split into this many mini-batches)")
    epochs: int = F(1, "passes over the rollouts of a step")
    micro_batch_size: int = F(64, "rows per forward / backward (accumulated with exact global normalisers)")


@dataclass
class WarmupConfig:
    steps: int = F(300, "supervised warm-start steps (0: none)")
    lr: float = F(3e-3, "warm-start learning rate")
    batch_size: int = F(16, "warm-start prompts per step")
    single_share: float = F(0.5, "embedded task: share of warm-start prompts showing one source alone, answered "
                                 "with what that source shows; the others show both, answered with the truth")
    categories: Optional[list] = F(["day_person", "day_empty", "night_empty"],
                                   "embedded task: scene categories of the two-source warm-start prompts (null: "
                                   "all of task.mix); by default only scenes where the sources agree",
                                   value_type=str)
    label_noise: float = F(0.2, "embedded task: share of warm-start answers flipped (a cold start that is not "
                                 "certain: p(answer) about 1 - label_noise)")
    night_share: float = F(0.2, "embedded task: share of warm-start prompts showing the RGB image alone and asking "
                                "'is it night ?' (answered with the truth): a cold start that tells day from night "
                                "before RL, as a pretrained VLM does")
    night_both: float = F(0.0, "embedded task: share of the night questions (warmup.night_share) shown with both "
                               "sources, the RGB image first as in the task's prompts (the model learns to read "
                               "the RGB slot of a two-source prompt)")
    unsure: list = F([], "embedded task: scene categories also shown with both sources in the warm start, "
                         "answered yes or no at random (a cold start unsure where the sources disagree)",
                     value_type=str)


@dataclass
class EvalConfig:
    every: int = F(25, "held-out evaluation every N steps (and at the start and the end; 0: only those)")
    mono: bool = F(True, "also evaluate each single source")


@dataclass
class LogConfig:
    progress: bool = F(True, "tqdm progress bars")
    plot_every: int = F(10, "refresh OUTPUT_DIR/metrics.png every N steps (0: only at the end)")
    samples_every: int = F(50, "write example completions to OUTPUT_DIR/samples.jsonl every N steps (0: never)")
    tensorboard: bool = F(False, "also write every metric to TensorBoard event files in OUTPUT_DIR/tensorboard "
                                 "(needs the tensorboard package)")


@dataclass
class CheckpointConfig:
    keep_last: int = F(2, "keep the newest N checkpoints of OUTPUT_DIR/checkpoints (0: keep all)")


@dataclass
class DistConfig:
    strategy: Literal["ddp", "fsdp2"] = F("ddp", "data parallel under torchrun (docs/distributed.md): ddp (replicas) or "
                                                 "fsdp2 (fully_shard; resumable with the same N); one process: unused")
    find_unused_parameters: bool = F(True, "ddp: find the parameters a micro-batch leaves without a gradient (a "
                                           "VLM's vision tower on text-only prompts); false only if every prompt "
                                           "has an image")
    timeout_s: float = F(1800.0, "seconds a collective waits for a slow rank before it raises (keep it above the "
                                 "held-out evaluation's time: rank 0 evaluates alone)")


COMPARE_METHODS = ("grpo", "grpo_mars", "dapo", "dapo_mars")  # mars train --compare (compare.py)


@dataclass
class CompareConfig:
    seeds: list = F([0, 1], "mars train --compare: seeds run for each method (each seed pairs the methods; 2 keep "
                            "the default under 25 minutes on 2 CPU cores, 10 or more give intervals worth reading)",
                    value_type=int)
    methods: list = F(list(COMPARE_METHODS), "mars train --compare: the methods run on every "
                      "seed (grpo, grpo_mars, dapo, dapo_mars; docs/train.md)", value_type=str)
    workers: int = F(0, "mars train --compare: seeds run at once in worker processes (0: auto, CPU cores / threads "
                        "on a CPU run, 1 on a GPU; the numbers of a run do not depend on it)")
    target: float = F(0.95, "mars train --compare: held-out multi-source accuracy whose first step is reported")


@dataclass
class TrainConfig:
    output_dir: str = F("mars_train/tiny", "where metrics.jsonl, metrics.png, config.yaml and checkpoints go")
    seed: int = F(0, "seed of weights, data and sampling")
    max_steps: int = F(150, "RL steps")
    save_every: int = F(0, "checkpoint every N steps (0: only at the end; a checkpoint is also written on SIGINT / "
                                 "SIGTERM)")
    threads: int = F(1, "torch CPU threads (0: torch's default; one thread keeps the tiny model fast on a "
                                  "shared CPU)")
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


# ----------------------------------------------------------------------------- reading
def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (``mars train NAME``)."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def config_path(name_or_path: str) -> str:
    """The YAML file of a path or of a shipped config name; ConfigError if neither exists."""
    if os.path.isfile(name_or_path):
        return name_or_path
    base = os.path.basename(name_or_path)
    stem = base[:-5] if base.endswith(".yaml") else base[:-4] if base.endswith(".yml") else base
    if os.sep not in name_or_path and os.path.isfile(os.path.join(CONFIG_DIR, stem + ".yaml")):
        return os.path.join(CONFIG_DIR, stem + ".yaml")
    raise ConfigError(f"config file not found: {name_or_path!r}; shipped configs: {', '.join(shipped_configs())}")


def parse_overrides(items) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` -> ``[("a.b", 1), ...]`` (values read as YAML)."""
    import yaml

    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-6)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot read value {raw!r} ({exc})") from None
        out.append((key, value))
    return out


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _section_fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _valid_keys(cls, prefix: str) -> list[str]:
    keys = []
    hints = _hints(cls)
    for name in _section_fields(cls):
        t = hints[name]
        if dataclasses.is_dataclass(t):
            keys += _valid_keys(t, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str, cls, prefix: str) -> ConfigError:
    valid = _valid_keys(cls, prefix)
    return ConfigError(f"unknown config key {key!r}; valid keys{' of ' + prefix[:-1] if prefix else ''}: "
                       + ", ".join(valid))


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    return getattr(t, "__name__", str(t))


def _coerce(key: str, value, t, meta: dict):
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0], meta)
    if origin is Literal:
        choices = typing.get_args(t)
        if value is False and "off" in choices:  # YAML 1.1 reads an unquoted off as false
            value = "off"
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if t is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if t is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{key}: expected a list of {meta['length']} values, got {len(value)}")
        vt = meta.get("value_type", str)
        return [_coerce(f"{key}[{i}]", v, vt, {}) for i, v in enumerate(value)]
    if t is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        vt = meta.get("value_type", str)
        return {str(k): _coerce(f"{key}.{k}", v, vt, {}) for k, v in value.items()}
    raise TypeError(f"unsupported config type {t!r} of {key}")  # a bug in this module


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix[:-1]}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    fields_ = _section_fields(cls)
    hints = _hints(cls)
    for k in data:
        if k not in fields_:
            raise _unknown(prefix + str(k), cls, prefix)
    kwargs = {}
    for name, f in fields_.items():
        t = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, data.get(name) or {}, key + ".")
        elif name in data:
            kwargs[name] = _coerce(key, data[name], t, dict(f.metadata))
    return cls(**kwargs)


def _set(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    cls, node, prefix = TrainConfig, tree, ""
    for i, p in enumerate(parts):
        fields_ = _section_fields(cls)
        if p not in fields_:
            raise _unknown(key, cls, prefix)
        t = _hints(cls)[p]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(t):
            if last:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key} is a section; set one of its keys: "
                                      + ", ".join(_valid_keys(t, key + ".")))
                node.setdefault(p, {}).update(value)
                return
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{prefix}{p}: expected a mapping of keys")
            cls, prefix = t, prefix + p + "."
        else:
            if not last:
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section: {key!r} is not a config key")
            node[p] = value


def load_config(config=None, overrides=(), *, check_files: bool = True) -> TrainConfig:
    """The config of a YAML path / shipped name (None: the defaults, i.e. ``tiny``) with
    ``overrides`` (``"key=value"`` strings or (key, value) pairs), validated."""
    tree = _read_yaml(config_path(config)) if config is not None else {}
    pairs = [o if isinstance(o, tuple) else parse_overrides([o])[0] for o in overrides]
    for k, v in pairs:
        _set(tree, k, v)
    cfg = _build(TrainConfig, tree)
    validate(cfg, check_files=check_files)
    return cfg


# keys ``mars train --resume OUTPUT_DIR key=value`` may change: the run's length, what is
# logged and kept, and (for out-of-memory recovery) the memory knobs, which change how
# the same numbers are computed (batching, fusion), so only the first group keeps a resumed
# run bit for bit equal to one that never stopped.
RESUME_KEYS = ("max_steps", "save_every", "checkpoint.", "log.", "dist.timeout_s",
               "rollout.max_batch_rows", "optim.micro_batch_size", "loss.chunk_size", "loss.fused",
               "model.gradient_checkpointing")
RESUME_MEMORY_KEYS = RESUME_KEYS[5:]


def load_resume_config(output_dir: str, overrides=(), *, check_files: bool = True) -> TrainConfig:
    """The config of run directory ``output_dir`` (its config.yaml) for ``mars train
    --resume``, with ``output_dir`` set to the directory given and ``overrides`` limited to
    :data:`RESUME_KEYS` (ConfigError naming the key otherwise)."""
    path = os.path.join(output_dir, "config.yaml")
    if not os.path.isdir(output_dir):
        raise ConfigError(f"--resume {output_dir}: no such directory")
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {output_dir}: {path} not found (not a mars train output directory)")
    pairs = [o if isinstance(o, tuple) else parse_overrides([o])[0] for o in overrides]
    for k, _ in pairs:
        if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUME_KEYS):
            raise ConfigError(f"--resume: {k} cannot change when a run is resumed (it would not be the same "
                              f"run); keys that can: {', '.join(r + '*' if r.endswith('.') else r for r in RESUME_KEYS)}")
    return load_config(path, [*pairs, ("output_dir", output_dir)], check_files=check_files)


def _looks_local(path: str) -> bool:
    """A path that must exist here (not a hub name such as Qwen/Qwen2.5-VL-3B-Instruct)."""
    if path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") > 1:
        return True
    return not re.fullmatch(r"[\w.-]+/[\w.-]+", path)


def validate(cfg: TrainConfig, *, check_files: bool = True) -> None:
    """Semantic checks of a built config (ranges, combinations, files); ConfigError."""
    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for key, value in _numbers(cfg):
        need(math.isfinite(value), key, f"must be a finite number, got {value}")
    need(cfg.output_dir.strip() != "", "output_dir", "must not be empty")
    need(cfg.data.eval_limit is None or cfg.data.eval_limit >= 1, "data.eval_limit",
         f"must be >= 1 or null (all held-out samples), got {cfg.data.eval_limit}")
    _check_device(cfg.model.device, need)
    for key, backend in (("algorithm.backend", cfg.algorithm.backend), ("loss.backend", cfg.loss.backend)):
        _check_backend(key, backend, need)
    if cfg.rollout.n == 1 and cfg.rollout.mono == "none":
        print("mars train: warning: rollout.n=1 with rollout.mono=none: every group has one reward, every advantage "
              "is 0 and nothing can be learned (raise rollout.n or use anchors)", file=sys.stderr)
    need(cfg.max_steps >= 0, "max_steps", f"must be >= 0, got {cfg.max_steps}")
    need(cfg.save_every >= 0, "save_every", f"must be >= 0, got {cfg.save_every}")
    need(cfg.threads >= 0, "threads", f"must be >= 0, got {cfg.threads}")
    r, o, lo, a = cfg.rollout, cfg.optim, cfg.loss, cfg.algorithm
    need(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
    need(r.temperature > 0, "rollout.temperature", f"sampled rollouts need a temperature > 0, got {r.temperature}")
    need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    need(r.max_prompt_length >= 1, "rollout.max_prompt_length", f"must be >= 1, got {r.max_prompt_length}")
    need(r.max_batch_rows is None or r.max_batch_rows >= 1, "rollout.max_batch_rows", "must be >= 1 or null")
    v = r.vllm
    need(0 < v.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
         f"must be in (0, 1], got {v.gpu_memory_utilization}")
    need(v.sleep_level in (1, 2), "rollout.vllm.sleep_level", f"must be 1 or 2, got {v.sleep_level}")
    need(v.max_model_len is None or v.max_model_len >= 1, "rollout.vllm.max_model_len", "must be >= 1 or null")
    need(v.max_images >= 1, "rollout.vllm.max_images", f"must be >= 1, got {v.max_images}")
    t = cfg.model.tiny
    need(r.engine != "vllm" or cfg.model.path != TINY or t.num_heads < 1 or t.hidden_size // t.num_heads >= 32,
         "model.tiny.num_heads", f"rollout.engine=vllm needs a text head size of 32 or more (vLLM's CPU attention "
         f"runs 32, 64, 80, ...; kept on every device so both engines train the same model), and "
         f"model.tiny.hidden_size {t.hidden_size} / num_heads {t.num_heads} gives "
         f"{t.hidden_size // max(t.num_heads, 1)}: set model.tiny.num_heads={max(1, t.hidden_size // 32)}")
    need(o.prompts_per_step >= 1, "optim.prompts_per_step", f"must be >= 1, got {o.prompts_per_step}")
    need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(all(0 <= b < 1 for b in o.betas), "optim.betas", f"must be in [0, 1), got {o.betas}")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    need(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null")
    need(o.mini_batches >= 1, "optim.mini_batches", f"must be >= 1, got {o.mini_batches}")
    need(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
    need(o.micro_batch_size >= 1, "optim.micro_batch_size", f"must be >= 1, got {o.micro_batch_size}")
    need(lo.clip_low >= 0 and lo.clip_high >= 0, "loss.clip_low / loss.clip_high", "must be >= 0")
    need(lo.dual_clip is None or lo.dual_clip > 1, "loss.dual_clip", f"must be > 1 or null, got {lo.dual_clip}")
    need(lo.kl_coef >= 0, "loss.kl_coef", f"must be >= 0, got {lo.kl_coef}")
    need(lo.loss_scale is None or lo.loss_scale > 0, "loss.loss_scale", "must be > 0 or null")
    need(lo.chunk_size is None or lo.chunk_size >= 1, "loss.chunk_size", "must be >= 1 or null")
    need(lo.log_ratio_clamp is None or lo.log_ratio_clamp > 0, "loss.log_ratio_clamp", "must be > 0 or null")
    need(lo.rollout_is_cap > 0, "loss.rollout_is_cap", f"must be > 0, got {lo.rollout_is_cap}")
    need(a.eps >= 0, "algorithm.eps", f"must be >= 0, got {a.eps}")
    need(a.max_gen_batches >= 1, "algorithm.max_gen_batches", f"must be >= 1, got {a.max_gen_batches}")
    need(0 <= a.overlong_buffer < r.max_new_tokens, "algorithm.overlong_buffer",
         f"must be in [0, rollout.max_new_tokens = {r.max_new_tokens}), got {a.overlong_buffer}")
    w = cfg.warmup
    need(w.steps >= 0, "warmup.steps", f"must be >= 0, got {w.steps}")
    need(w.lr > 0, "warmup.lr", f"must be > 0, got {w.lr}")
    need(w.batch_size >= 1, "warmup.batch_size", f"must be >= 1, got {w.batch_size}")
    need(0 <= w.label_noise <= 1, "warmup.label_noise", f"must be in [0, 1], got {w.label_noise}")
    need(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    need(cfg.log.plot_every >= 0, "log.plot_every", f"must be >= 0, got {cfg.log.plot_every}")
    need(cfg.log.samples_every >= 0, "log.samples_every", f"must be >= 0, got {cfg.log.samples_every}")
    need(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", f"must be >= 0, got {cfg.checkpoint.keep_last}")
    if cfg.log.tensorboard:
        import importlib.util

        need(importlib.util.find_spec("tensorboard") is not None, "log.tensorboard",
             "needs the tensorboard package, which is not installed: pip install tensorboard")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", f"must be > 0, got {cfg.dist.timeout_s}")
    need(len(cfg.compare.seeds) >= 1, "compare.seeds", "needs at least one seed")
    need(len(set(cfg.compare.seeds)) == len(cfg.compare.seeds), "compare.seeds", f"has a seed twice: {cfg.compare.seeds}")
    bad = [m for m in cfg.compare.methods if m not in COMPARE_METHODS]
    need(not bad, "compare.methods", f"unknown {bad}; known: {', '.join(COMPARE_METHODS)}")
    need(len(cfg.compare.methods) >= 1, "compare.methods", "needs at least one method")
    need(cfg.compare.workers >= 0, "compare.workers", f"must be >= 0 (0: auto), got {cfg.compare.workers}")
    need(0 < cfg.compare.target <= 1, "compare.target", f"must be in (0, 1], got {cfg.compare.target}")
    t = cfg.task
    from .task import CATEGORIES

    bad = sorted(set(t.mix) - set(CATEGORIES))
    need(not bad, "task.mix", f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
    need(all(v >= 0 for v in t.mix.values()) and sum(t.mix.values()) > 0, "task.mix",
         f"shares must be >= 0 with a positive sum, got {t.mix}")
    need(t.image_size >= 28 and t.image_size % 28 == 0, "task.image_size",
         f"must be a positive multiple of 28, got {t.image_size}")
    need(t.noise >= 0, "task.noise", f"must be >= 0, got {t.noise}")
    need(t.eval_per_category >= 1, "task.eval_per_category", f"must be >= 1, got {t.eval_per_category}")
    if w.categories is not None:
        bad = sorted(set(w.categories) - set(CATEGORIES))
        need(not bad, "warmup.categories", f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
        need(len(w.categories) > 0, "warmup.categories", "is empty (null: all of task.mix)")
    bad = sorted(set(w.unsure) - set(CATEGORIES))
    need(not bad, "warmup.unsure", f"unknown categories {bad}; known: {', '.join(CATEGORIES)}")
    need(0 <= w.single_share <= 1, "warmup.single_share", f"must be in [0, 1], got {w.single_share}")
    need(0 <= w.night_share <= 1, "warmup.night_share", f"must be in [0, 1], got {w.night_share}")
    need(0 <= w.night_both <= 1, "warmup.night_both", f"must be in [0, 1], got {w.night_both}")
    need(cfg.model.path != "", "model.path", "must not be empty")
    tm = cfg.model.tiny
    need(tm.hidden_size % tm.num_heads == 0 and (tm.hidden_size // tm.num_heads) % 8 == 0,
         "model.tiny.hidden_size", f"/ model.tiny.num_heads must be a multiple of 8, got "
         f"{tm.hidden_size} / {tm.num_heads}")
    if cfg.reward.name is not None:
        from mars.rewards import list_rewards

        need(cfg.reward.name in list_rewards(), "reward.name",
             f"{cfg.reward.name!r} is not registered; registered: {', '.join(list_rewards())}")
    if check_files:
        for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
            if value is not None and value != EMBEDDED:
                need(os.path.isfile(value), key, f"file not found: {value!r} ('{EMBEDDED}' is the synthetic task)")
                need(value.endswith((".parquet", ".json", ".jsonl")), key,
                     f"{value!r}: expected a .parquet, .json or .jsonl file")
        if cfg.data.image_root is not None:
            need(os.path.isdir(cfg.data.image_root), "data.image_root",
                 f"directory not found: {cfg.data.image_root!r}")
        p = cfg.model.path
        if p != TINY and _looks_local(p):
            need(os.path.isdir(os.path.expanduser(p)), "model.path",
                 f"directory not found: {p!r} ('{TINY}' is the tiny model built locally; a hub name looks like "
                 "Qwen/Qwen2.5-VL-3B-Instruct)")


def _numbers(cfg, prefix: str = ""):
    """(dotted key, value) of every float and int in the config tree (lists included)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _numbers(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, v
        elif isinstance(v, (list, tuple)):
            yield from ((key, x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool))
        elif isinstance(v, dict):
            yield from ((f"{key}.{k}", x) for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool))


def _check_device(device: str, need) -> None:
    """model.device: auto, cpu, cuda or cuda:N, and a CUDA device only where one is visible."""
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", device)
    need(m is not None, "model.device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need(n > 0, "model.device", f"{device} was asked for but no CUDA device is visible "
                                    "(torch.cuda.is_available() is False); use model.device=cpu or auto")
        need(m.group(1) is None or int(m.group(1)) < n, "model.device", f"{device}: only {n} CUDA device(s) visible")


def _check_backend(key: str, backend: str, need) -> None:
    """A backend of mars.backends() that this install has, or auto."""
    if backend == "auto":
        return
    import mars

    known = mars.backends()
    need(backend in known, key, f"unknown backend {backend!r}; one of auto, {', '.join(known)}")
    need(known[backend].available, key, f"backend {backend!r} is not available here: {known[backend].reason}")


# ----------------------------------------------------------------------------- writing
def to_dict(cfg) -> dict:
    """Nested plain dict of a config."""
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def describe(cls=TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every config key, in order."""
    out = []
    hints = _hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += describe(t, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, _type_name(t), getattr(default, f.name), f.metadata.get("help", "")))
    return out
