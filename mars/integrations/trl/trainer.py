"""`MarsGRPOTrainer`: `trl.GRPOTrainer` with mono-anchored advantages and `mars.loss`
(docs/trl.md).

Per generation batch (``_generate_and_score_completions``, TRL has no smaller hook):

1. TRL's own generation, scoring and batch building (``super()``); the gathered rewards per
   function are kept from its ``_calculate_rewards`` call.
2. With mono sources on, every rank builds the mono-source variants of the prompts whose
   group starts on it, pads its list to the longest rank's (TRL's vLLM paths slice results
   by equal per-rank counts), generates them greedily through TRL's
   ``_tokenize_prompts`` / ``_generate_single_turn`` (vLLM server or colocate,
   transformers) and scores them with the trainer's reward functions
   (``_calculate_rewards``, which gathers). Every rank makes the same collective calls.
3. Advantages from the gathered rewards and anchors with `mars.mono_anchored_advantage`
   (TRL's eps 1e-4, scale_rewards, NaN rewards -> advantage 0), sliced back to this rank.

Anchors never enter the returned batch: no log-probs, no loss, no TRL length metrics; their
rewards and the information gain are logged as ``mars/*`` metrics.

``_compute_loss`` maps TRL's loss types onto `mars.loss.policy_loss` (or, with the fused
lm-head path, `mars.loss.fused_linear_policy_loss`), see `mars.integrations.trl.loss`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch

from ._compat import check_trl_version

check_trl_version(allow_untested=True)  # import-time: warn only; the constructor enforces the pin

import transformers  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.chat_template_utils import parse_response  # noqa: E402
from trl.data_utils import is_conversational, prepare_multimodal_messages  # noqa: E402

from mars.loss import fused_linear_policy_loss, policy_loss  # noqa: E402

from .advantage import trl_advantages, trl_rewards  # noqa: E402
from .loss import LossPlan, loss_normalisers, loss_plan  # noqa: E402
from .mono import MONO_MODES, check_variants, mono_examples  # noqa: E402

__all__ = ["MarsGRPOTrainer", "plan_anchor_requests", "pad_example", "pad_anchor_requests"]

# sampling options removed from generation kwargs for the greedy anchors
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
                  "eta_cutoff", "seed", "n", "best_of")
# multimodal inputs TRL's `_get_per_token_logps_and_entropies` forwards to the model
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class AnchorRequests:
    """This rank's anchor requests: examples, the global group index of each (-1 for the
    padding that equalises the per-rank counts)."""

    examples: list[dict]
    groups: list[int]


def plan_anchor_requests(inputs: list[dict], process_index: int, num_generations: int,
                         variants: Callable[[dict], list[dict]]) -> AnchorRequests:
    """Mono requests of the groups that start on this rank, unpadded.

    TRL's sampler repeats each prompt ``num_generations`` times consecutively over the
    gathered batch (rank r holds global rows [r n, (r + 1) n), n = len(inputs)), so the
    G copies of one prompt may span ranks; the rank holding the group's first row owns its
    anchors (its row has the example)."""
    n = len(inputs)
    start = process_index * n
    examples, groups = [], []
    for i, example in enumerate(inputs):
        row = start + i
        if row % num_generations:
            continue
        for v in variants(example):
            examples.append(v)
            groups.append(row // num_generations)
    return AnchorRequests(examples, groups)


def pad_example(requests: AnchorRequests, inputs: list[dict], variants: Callable[[dict], list[dict]]) -> dict:
    """What a rank pads its requests with: one of its own requests, or, when it owns none,
    a variant of its first row (else the row itself)."""
    if requests.examples:
        return requests.examples[0]
    vs = variants(inputs[0])
    return vs[0] if vs else inputs[0]


def pad_anchor_requests(requests: AnchorRequests, count: int, pad: dict) -> AnchorRequests:
    """``requests`` padded to ``count`` rows with ``pad`` (group -1: dropped after the
    gather)."""
    k = count - len(requests.examples)
    return AnchorRequests(requests.examples + [pad] * k, requests.groups + [-1] * k)


def _patch_mars_head(model) -> None:
    """Let ``model(..., mars_head_fn=fn)`` return ``fn(hidden [B, L, H], weight, bias)``
    from the backbone's last hidden states and the lm head (computed inside the model's
    forward, like TRL's fused head, so DDP / FSDP hooks see one forward)."""
    previous = model.forward

    @functools.wraps(type(model).forward)
    def _forward(self, *args, mars_head_fn=None, **kwargs):
        if mars_head_fn is None:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover
            DTensor = ()
        if isinstance(weight, DTensor):  # FSDP2: as TRL's add_fused_lm_head
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return mars_head_fn(hidden.to(weight.device), weight, bias)

    model.forward = types.MethodType(_forward, model)


class MarsGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` (same constructor) with MARS mono-anchored advantages and the
    `mars.loss` policy loss (docs/trl.md).

    Extra keyword arguments:
        mono_sources: None (no anchors: TRL's GRPO numbers), "duplicate" (each source's
            image in every slot) or "single" (one image); dataset rows carry their sources
            in an ``images`` list column (`mars.integrations.trl.mono.mono_examples`).
        mono_fn: ``fn(example) -> list[example]``, the mono variants of a row instead of
            mono_sources (each variant with the row's columns); a row may return [].
        fused_lm_head: compute the loss with `mars.loss.fused_linear_policy_loss` on the
            backbone's hidden states and the lm-head weight (no log-prob tensor, no
            entropy); None: when ``args.use_liger_kernel`` is set.
        loss_backend: backend of `mars.loss` ("auto", "cpu", "cuda", "triton",
            "reference").
        allow_untested_trl: warn instead of raising outside the pinned TRL versions.

    Attributes:
        mars_loss_plan: `mars.integrations.trl.loss.LossPlan`; ``fallback`` set (a reason)
            when TRL's own ``_compute_loss`` is used (cispo, sapo, vespo, entropy bonus).

    Raises:
        ValueError: a bad mono_sources / mono_fn, both given, mono sources with tools,
            environments or a rollout_func, with multi_objective_aggregation
            "normalize_then_sum"; fused_lm_head with options it cannot serve.
        RuntimeError: TRL outside the pinned versions (see ``allow_untested_trl``).
    """

    _tag_names = [*GRPOTrainer._tag_names, "mars"]

    def __init__(self, model, reward_funcs=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None,
                 rollout_func=None, environment_factory=None, *, mono_sources: str | None = None,
                 mono_fn: Callable[[dict], list[dict]] | None = None, fused_lm_head: bool | None = None,
                 loss_backend: str = "auto", allow_untested_trl: bool = False):
        check_trl_version(allow_untested_trl)
        if mono_sources is not None and mono_sources not in MONO_MODES:
            raise ValueError(f"mono_sources must be one of {MONO_MODES} or None, got {mono_sources!r}")
        if mono_fn is not None and not callable(mono_fn):
            raise ValueError(f"mono_fn must be callable (example -> list of examples), got {type(mono_fn).__name__}")
        if mono_fn is not None and mono_sources is not None:
            raise ValueError("pass mono_sources or mono_fn, not both")
        self.mono_sources = mono_sources
        self.mono_fn = mono_fn
        self.mono_enabled = mono_sources is not None or mono_fn is not None
        if self.mono_enabled:
            for name, value in (("tools", tools), ("rollout_func", rollout_func),
                                ("environment_factory", environment_factory)):
                if value:
                    raise ValueError(f"mono sources are not supported with {name}: the greedy anchors are "
                                     "single-turn generations of TRL's own generation path")
        if loss_backend not in ("auto", "reference", "cpu", "cuda", "triton"):
            raise ValueError(f"loss_backend must be one of auto, reference, cpu, cuda, triton; got {loss_backend!r}")
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config,
                         peft_config=peft_config, tools=tools, rollout_func=rollout_func,
                         environment_factory=environment_factory)
        if self.mono_enabled and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("mono sources need multi_objective_aggregation='sum_then_normalize' (anchors enter "
                             f"the pool of one summed reward), got {self.multi_objective_aggregation!r}")
        a = self.args
        self.mars_loss_plan: LossPlan = loss_plan(
            self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=a.use_bias_correction_kl, delta=a.delta,
            entropy_bonus=self._entropy_bonus_enabled, backend=loss_backend)
        if self.mars_loss_plan.fallback:
            warnings.warn(f"MarsGRPOTrainer uses TRL's own loss: {self.mars_loss_plan.fallback}", UserWarning,
                          stacklevel=2)
        self.fused_lm_head = bool(a.use_liger_kernel if fused_lm_head is None else fused_lm_head)
        if self.fused_lm_head:
            self._check_fused()
            target = self.model.get_base_model() if is_peft_model(self.model) else self.model  # as TRL
            _patch_mars_head(target)

    # ------------------------------------------------------------------ fused lm head

    def _check_fused(self):
        why = []
        if self.mars_loss_plan.fallback:
            why.append(self.mars_loss_plan.fallback)
        if self.top_entropy_quantile < 1.0:
            why.append("top_entropy_quantile < 1 needs the entropies")
        if self.off_policy_mask_threshold is not None:
            why.append("off_policy_mask_threshold needs the per-token log-probs")
        if self.aux_loss_enabled:
            why.append("the MoE router aux loss")
        text = self.model.config.get_text_config()
        for key in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                    "logits_scaling"):
            if getattr(text, key, None) not in (None, 1.0):
                why.append(f"the model's {key}")
        if why:
            raise ValueError("fused_lm_head (mars.loss.fused_linear_policy_loss) cannot serve: " + "; ".join(why))

    # ------------------------------------------------------------------ mono anchors

    def _variants(self, example: dict) -> list[dict]:
        if self.mono_fn is not None:
            return check_variants(self.mono_fn(example), example, self.mono_fn)
        return mono_examples(example, self.mono_sources)

    @contextlib.contextmanager
    def _greedy_generation(self):
        """TRL's generation settings switched to greedy decoding for the block (restored
        after): vLLM temperature 0 (top_p 1, top_k 0, min_p 0; sampling keys dropped from
        generation_kwargs), transformers do_sample=False. Logits processors that are not
        sampling options (repetition_penalty, suppress_tokens) stay."""
        if self.use_vllm:
            vg = self.vllm_generation
            names = ("temperature", "top_p", "top_k", "min_p", "generation_kwargs")
            saved = {k: getattr(vg, k) for k in names}
            vg.temperature, vg.top_p, vg.top_k, vg.min_p = 0.0, 1.0, 0, 0.0
            vg.generation_kwargs = {k: v for k, v in (saved["generation_kwargs"] or {}).items()
                                    if k not in _SAMPLING_KEYS}
            try:
                yield
            finally:
                for k, v in saved.items():
                    setattr(vg, k, v)
            return
        saved = (self.generation_config, getattr(self, "generation_kwargs", None))
        kwargs = {k: v for k, v in (saved[1] or {}).items() if k not in _SAMPLING_KEYS}
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=None, min_p=None)
        self.generation_kwargs = kwargs
        self.generation_config = GenerationConfig(**kwargs, disable_compile=True)
        try:
            yield
        finally:
            self.generation_config, self.generation_kwargs = saved

    @contextlib.contextmanager
    def _private_reward_logs(self):
        """Reward functions' log_extra / log_metric calls on anchors go to a scratch
        buffer (they would misalign TRL's completions table)."""
        saved = (self._pending_extra_logs, self._pending_metrics)
        self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
        try:
            yield
        finally:
            self._pending_extra_logs, self._pending_metrics = saved

    def _mono_prompts(self, examples: list[dict]) -> list:
        """Prompts of the examples as `_generate_and_score_completions` builds them
        (images put into the messages)."""
        prompts = [copy.deepcopy(x["prompt"]) for x in examples]
        if "images" in examples[0]:
            images = [x.get("images") for x in examples]
        elif "image" in examples[0]:
            images = [[x.get("image")] if x.get("image") is not None else None for x in examples]
        else:
            images = None
        if images is not None and all(not im for im in images):
            images = None
        if images is not None:
            if not is_conversational(examples[0]):
                raise ValueError("mono sources need conversational prompts (TRL's multimodal format)")
            prompts = [prepare_multimodal_messages(p, images=im) for p, im in zip(prompts, images, strict=True)]
        return prompts

    def _decode(self, prompts, prompt_ids, completion_ids):
        """Completions as TRL's `_generate` decodes them (no tool calls)."""
        if is_conversational({"prompt": prompts[0]}):
            if Version(transformers.__version__) >= Version("5.0.0") and (
                    getattr(self._tokenizer, "response_template", None) is not None
                    or getattr(self._tokenizer, "response_schema", None) is not None):
                return [[parse_response(self._tokenizer, ids, prefix=prompt_ids[i], tools=self.tools)]
                        for i, ids in enumerate(completion_ids)]
            texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            return [[{"role": "assistant", "content": t}] for t in texts]
        return self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)

    def _generate_anchors(self, examples: list[dict]):
        """Greedy completions of ``examples`` and their rewards per function, gathered over
        processes ([R * len(examples), F]); collective: every rank calls it with the same
        number of examples. Returns (rewards_per_func, completion_ids, completions)."""
        prompts = self._mono_prompts(examples)
        prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)
        with self._greedy_generation():
            completion_ids, _ = self._generate_single_turn(prompt_ids, images, multimodal_fields, 1)
        completions = self._decode(prompts, prompt_ids, completion_ids)
        with self._private_reward_logs():
            rewards_per_func = self._calculate_rewards(examples, prompts, completions, completion_ids)
        return rewards_per_func, completion_ids, completions

    def _anchor_batch(self, inputs: list[dict], num_generations: int):
        """(anchor rewards [K], anchor groups [K], completion lengths [K], rewards per
        function [K, F]) over all processes, padding removed; None when no rank has a mono
        variant (every rank gets the same answer: the count is gathered)."""
        device = self.accelerator.device
        variants = self._variants
        error = None
        try:  # everything that calls mono_fn, before the first collective
            req = plan_anchor_requests(inputs, self.accelerator.process_index, num_generations, variants)
            pad = pad_example(req, inputs, variants)
            n = len(req.examples)
        except Exception as e:  # every rank must learn of it, or the others wait in the gather below
            error, n = e, -1
        counts = self.accelerator.gather(torch.tensor([n], device=device))
        if error is not None:
            raise error
        if (counts < 0).any():
            bad = (counts < 0).nonzero().flatten().tolist()
            raise RuntimeError(f"building the mono variants failed on process(es) {bad}; see their error")
        count = int(counts.max())
        if count == 0:
            return None
        req = pad_anchor_requests(req, count, pad)
        rewards_per_func, completion_ids, _ = self._generate_anchors(req.examples)
        groups = self.accelerator.gather(torch.tensor(req.groups, dtype=torch.long, device=device))
        lengths = self.accelerator.gather(torch.tensor([len(c) for c in completion_ids], device=device))
        rewards = trl_rewards(rewards_per_func, self.reward_weights)
        keep = groups >= 0
        per_func = rewards_per_func[keep]
        return rewards[keep], groups[keep], lengths[keep], per_func

    # ------------------------------------------------------------------ advantages

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._mars_rewards_per_func = out
        return out

    def _generate_and_score_completions(self, inputs):
        self._mars_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func = self._mars_rewards_per_func
        if self.multi_objective_aggregation != "sum_then_normalize" or rewards_per_func is None:
            return output  # TRL's normalize_then_sum advantages (mono sources refused at init)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        anchors = self._anchor_batch(inputs, G) if self.mono_enabled else None
        rewards = trl_rewards(rewards_per_func, self.reward_weights)
        if anchors is None:
            res = trl_advantages(rewards, G, self.scale_rewards)
        else:
            a_rewards, a_groups, a_lengths, a_per_func = anchors
            res = trl_advantages(rewards, G, self.scale_rewards, a_rewards, a_groups)
        n = len(inputs)
        rank = self.accelerator.process_index
        old = output["advantages"]
        output["advantages"] = res.advantages[rank * n:(rank + 1) * n].to(device=old.device, dtype=old.dtype)
        # the completions table gets MARS's advantages instead of TRL's
        logged = self._logs["advantages"]
        k = min(len(logged), res.advantages.numel())
        for _ in range(k):
            logged.pop()
        logged.extend(res.advantages[res.advantages.numel() - k:].tolist())
        if anchors is not None:
            self._log_anchor_metrics(mode, res, a_rewards, a_lengths, a_per_func)
        return output

    def _log_anchor_metrics(self, mode, res, a_rewards, a_lengths, a_per_func):
        m = self._metrics[mode]
        m["mars/mono_reward"].append(torch.nanmean(a_rewards).item() if a_rewards.numel() else float("nan"))
        for i, name in enumerate(self.reward_func_names):
            col = a_per_func[:, i]
            m[f"mars/mono_rewards/{name}/mean"].append(torch.nanmean(col).item() if col.numel() else float("nan"))
        m["mars/gain"].append(torch.nanmean(res.gain).item())
        m["mars/anchors_per_prompt"].append(res.num_anchors.float().mean().item())
        std = res.pooled_std[~torch.isnan(res.pooled_std)]
        m["mars/frac_pool_zero_std"].append(
            torch.isclose(std, torch.zeros_like(std)).float().mean().item() if std.numel() else float("nan"))
        m["mars/mono_completion_length"].append(
            a_lengths.float().mean().item() if a_lengths.numel() else float("nan"))

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model, inputs):
        plan = self.mars_loss_plan
        if plan.fallback:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        # set by the training loop; TRL reads it in train mode only (evaluate() may come first)
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        norms = loss_normalisers(
            self.loss_type, mask, gradient_accumulation_steps=ga,
            train=mode == "train", max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation)
        weights = []  # multiply the policy term, not the KL (TRL's order)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        mm = {k: inputs.get(k) for k in _MM_KEYS}

        if self.fused_lm_head:
            w = self._weights(weights, valid, None)
            model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                            **{k: v for k, v in mm.items() if v is not None}}

            def head(hidden, weight, bias):
                h = hidden[:, -T - 1:-1]
                h = h if h.dtype == weight.dtype else h.to(weight.dtype)
                with torch.autocast(h.device.type, enabled=False):
                    return fused_linear_policy_loss(
                        h, weight, completion_ids, old, advantages, valid, bias=bias,
                        temperature=self.temperature, ref_logp=ref, is_weights=w,
                        **plan.options, **norms)

            with self.accelerator.autocast():
                out = model(**model_inputs, mars_head_fn=head)
            self._log_fused_metrics(mode, out, mask)
            return out.loss

        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, T, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled,
            num_images=inputs.get("num_images"), num_tiles=inputs.get("num_tiles"), **mm)
        old_logp = per_token_logps.detach() if old is None else old
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.off_policy_mask_threshold is not None:
            adv2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            weights.append(self.get_off_policy_mask(
                advantages=adv2, per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logp), mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold))
        w = self._weights(weights, valid, per_token_logps)
        out = policy_loss(per_token_logps, old_logp, advantages, valid, ref_logp=ref, is_weights=w,
                          **plan.options, **norms)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_loss_metrics(mode, out, mask, entropies, per_token_logps.detach(), old_logp, advantages)
        return loss

    @staticmethod
    def _weights(factors, valid, like):
        """Product of TRL's per-token multipliers ([B, T] or [B, 1]) as is_weights [B, T]
        (None without any); zero where the mask is off."""
        if not factors:
            return None
        w = torch.ones(valid.shape, dtype=torch.float32, device=valid.device)
        for f in factors:
            w = w * f.detach().to(w.dtype)
        return torch.where(valid, w, torch.zeros_like(w))

    def _global_mean(self, local_sum, local_count):
        totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def _log_loss_metrics(self, mode, out, mask, entropies, logp, old_logp, advantages):
        """TRL's loss metrics (kl, entropy, clip_ratio/*), computed as `_compute_loss` does."""
        from trl.trainer.utils import nanmax, nanmin

        m = self._metrics[mode]
        maskf = mask.float()
        n_tok = out.metrics["num_tokens"]
        if self.beta != 0.0:
            m["kl"].append(self._global_mean(out.metrics["ref_kl"] * n_tok, n_tok))
        m["entropy"].append(self._global_mean((entropies * maskf).sum(), maskf.sum()))
        log_ratio = logp - old_logp
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_ratio)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        low = ((coef_1 < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef_1 > 1 + self.epsilon_high) & (adv > 0)).float()

        def gmean(x):
            if x.shape[1] == 1:
                return self._global_mean(x.sum(), torch.tensor(float(x.shape[0]), device=x.device))
            return self._global_mean((x * maskf).sum(), maskf.sum())

        def seq_mean(x):
            return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

        m["clip_ratio/low_mean"].append(gmean(low))
        m["clip_ratio/high_mean"].append(gmean(high))
        m["clip_ratio/region_mean"].append(gmean(((low + high) > 0).float()))
        m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())

    def _log_fused_metrics(self, mode, out, mask):
        """The fused path's metrics: kl and the clip fractions, token-weighted over the
        valid tokens (no entropy: the fused loss has no logits to take it from)."""
        m = self._metrics[mode]
        n_tok = out.metrics["num_tokens"]
        if self.beta != 0.0:
            m["kl"].append(self._global_mean(out.metrics["ref_kl"] * n_tok, n_tok))
        low = out.metrics["clip_frac_low"] * n_tok
        high = out.metrics["clip_frac_high"] * n_tok
        m["clip_ratio/low_mean"].append(self._global_mean(low, n_tok))
        m["clip_ratio/high_mean"].append(self._global_mean(high, n_tok))
        m["clip_ratio/region_mean"].append(self._global_mean(low + high, n_tok))
