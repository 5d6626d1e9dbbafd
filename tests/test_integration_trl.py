"""mars.integrations.trl.MarsGRPOTrainer with the real trl 1.16 on CPU, tiny models built
locally (a Qwen2 text model and a Qwen2-VL with the project's word-level tokenizer; no hub):

- mono sources off: advantages, loss, gradients and loss metrics equal stock
  trl.GRPOTrainer's on the same batch (1e-6) for every loss_type, GSPO, scale_rewards
  group / batch / none, unscorable (None) rewards, masked truncated completions, beta > 0
  with and without use_bias_correction_kl, delta, the entropy and off-policy masks, and
  over two training steps through ``train()``;
- the fused lm-head path (mars.loss.fused_linear_policy_loss) equals the unfused one;
- mono sources on (a VLM prompt with two images, "duplicate" and "single"): advantages
  equal mars.mono_anchored_advantage of the rewards the reward function returned, the
  anchors are greedy, score the mono images, stay out of the batch and of TRL's length
  metrics; training and evaluation run;
- the greedy switch of TRL's vLLM generation settings (a stand-in engine: no vLLM here),
  the anchor bookkeeping over ranks, the errors, and two real processes (gloo)."""

import copy
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import mars  # noqa: E402
from mars.integrations.trl import MarsGRPOTrainer, mono_examples, trl_advantages  # noqa: E402
from mars.integrations.trl.trainer import pad_anchor_requests, pad_example, plan_anchor_requests  # noqa: E402
from mars.train.tiny import build_tiny, build_tiny_tokenizer  # noqa: E402

WORDS = "a b c d e f g h yes no one two three four left right".split()
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
G = 4
# transformers' processor calls np.array on PIL images (processing_utils.py L928) under numpy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def setup_module():
    torch.set_num_threads(1)


# ----------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny Qwen2 saved to disk (TRL builds the beta > 0 reference model from the path)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer(WORDS)
    tok.chat_template = TEMPLATE
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    with torch.no_grad():  # eos as likely as the other tokens: a mix of ended and truncated completions
        model.lm_head.weight[tok.eos_token_id] = 0
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


class _NoVideo:
    merge_size = 2


def _processor(improc, tok):
    """Qwen2VLProcessor; without torchvision (Qwen2VLVideoProcessor needs it) a stand-in
    video processor: the prompts here have no videos."""
    from transformers import Qwen2VLProcessor

    try:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
        return Qwen2VLProcessor(image_processor=improc, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                chat_template=TEMPLATE)
    except ImportError:
        class TinyQwen2VLProcessor(Qwen2VLProcessor):
            def check_argument_for_proper_class(self, name, arg):
                return type(arg) if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

        return TinyQwen2VLProcessor(image_processor=improc, tokenizer=tok, video_processor=_NoVideo(),
                                    chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def vlm():
    model, tok, improc = build_tiny(WORDS, hidden_size=32, num_heads=4, vision_hidden_size=16, vision_depth=1,
                                    num_layers=1)
    tok.chat_template = TEMPLATE
    return model, _processor(improc, tok)


def _image(value):
    import numpy as np
    g = np.random.default_rng(value)
    return Image.fromarray(g.integers(0, 256, (56, 56, 3), dtype=np.uint8))


def vlm_rows(n=4):
    """Prompts with two image slots (placeholders in the text) and two images."""
    return [{"prompt": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "left"}, {"type": "image"},
                {"type": "text", "text": f"right {w}"}]}],
             "images": [_image(2 * i), _image(2 * i + 1)], "answer": w} for i, w in enumerate(WORDS[:n])]


def text_rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"a b {w}"}], "answer": w} for w in WORDS[:n]]


# ----------------------------------------------------------------------------- rewards

def reward_answer(prompts, completions, answer, **kw):
    return [float(a in c[0]["content"]) + 0.1 * len(c[0]["content"].split()) for c, a in zip(completions, answer)]


def reward_flaky(prompts, completions, **kw):
    """None (unscorable by this function) for every 5th completion; with reward_answer the
    row keeps a reward; alone the row is unscorable."""
    return [None if i % 5 == 0 else float(len(c[0]["content"]) % 3) for i, c in enumerate(completions)]


class Recorder:
    """A reward function that records every call (completions, images, returned values)."""

    __name__ = "recorded"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, answer, images=None, **kw):
        out = reward_answer(prompts, completions, answer)
        self.calls.append(dict(completions=[c[0]["content"] for c in completions], images=images, out=out,
                               answer=list(answer)))
        return out


def config(tmp_path, **over):
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
              num_generations=G, max_completion_length=6, use_cpu=True, bf16=False, report_to="none", max_steps=2,
              logging_steps=1, save_strategy="no", gradient_checkpointing=False, beta=0.1, seed=0,
              num_iterations=2, mask_truncated_completions=True, reward_weights=[1.0, 0.5], loss_type="dapo",
              disable_tqdm=True)
    kw.update(over)
    return GRPOConfig(**kw)


def make(cls, path, tok, args, reward_funcs=(reward_answer, reward_flaky), rows=None, **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's use_liger_kernel / luspo hints, MARS's fallback notice
        return cls(model=path, reward_funcs=list(reward_funcs), args=args, processing_class=tok,
                   train_dataset=Dataset.from_list(rows or text_rows()), **extra)


def perturb(models, scale=0.05, seed=3):
    """The same random step on every model: ratios != 1 (clipping active) and a reference
    that differs from the policy (k3 stays below mars's clamp of 10)."""
    g = torch.Generator().manual_seed(seed)
    noise = [scale * torch.randn(p.shape, generator=g) for p in models[0].parameters()]
    with torch.no_grad():
        for m in models:
            for p, n in zip(m.parameters(), noise):
                p.add_(n)


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]


def assert_grads_close(a, b, rtol=1e-5):
    scale = max(x.abs().max().item() for x in a)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=rtol, atol=rtol * scale), (x - y).abs().max().item()


# ----------------------------------------------------------------------------- pure parts

def test_mono_examples_duplicate_and_single():
    a, b = _image(0), _image(1)
    structured = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"},
                                                          {"type": "image"}]}], "images": [a, b], "id": 7}
    dup = mono_examples(structured, "duplicate")
    assert [v["images"] for v in dup] == [[a, a], [b, b]]
    assert all(v["prompt"] == structured["prompt"] and v["id"] == 7 for v in dup)
    single = mono_examples(structured, "single")
    assert [v["images"] for v in single] == [[a], [b]]
    for v in single:  # one placeholder left, the text kept
        assert [p["type"] for p in v["prompt"][0]["content"]] in (["image", "text"], ["text", "image"])
    assert [p["type"] for p in single[0]["prompt"][0]["content"]] == ["image", "text"]
    assert [p["type"] for p in single[1]["prompt"][0]["content"]] == ["text", "image"]
    assert structured["images"] == [a, b] and len(structured["prompt"][0]["content"]) == 3  # untouched
    text = {"prompt": [{"role": "user", "content": "x"}], "images": [a, b]}  # TRL inserts the placeholders
    assert [v["prompt"] for v in mono_examples(text, "single")] == [text["prompt"]] * 2
    assert mono_examples({"prompt": [{"role": "user", "content": "x"}]}, "duplicate") == []
    one = mono_examples({"prompt": [{"role": "user", "content": "x"}], "image": a}, "single")
    assert len(one) == 1 and one[0]["image"] is a


def test_mono_examples_errors():
    a = _image(0)
    with pytest.raises(ValueError, match="mono_sources must be one of"):
        mono_examples({"prompt": [], "images": [a]}, "both")
    with pytest.raises(ValueError, match="2 images but its prompt has 1 image placeholders"):
        mono_examples({"prompt": [{"role": "user", "content": [{"type": "image"}]}], "images": [a, a]}, "single")
    embedded = {"prompt": [{"role": "user", "content": [{"type": "image", "image": a}]}]}
    with pytest.raises(ValueError, match="'images' \\(or 'image'\\) column"):
        mono_examples(embedded, "duplicate")


def test_anchor_requests_over_ranks():
    """2 ranks x 6 rows, G = 4: groups 0 | 1 | 2 = rows 0-3 | 4-7 | 8-11; group 1 spans both
    ranks and belongs to rank 0 (its first row); rank 1 pads its 2 requests to rank 0's 4."""
    rows = [{"prompt": p, "images": [p, p + 100]} for p in (0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2)]
    dup = lambda x: mono_examples(x, "duplicate")  # noqa: E731
    r0 = plan_anchor_requests(rows[:6], 0, 4, dup)
    r1 = plan_anchor_requests(rows[6:], 1, 4, dup)
    assert r0.groups == [0, 0, 1, 1] and [e["images"] for e in r0.examples] == [[0, 0], [100, 100], [1, 1],
                                                                                 [101, 101]]
    assert r1.groups == [2, 2] and [e["images"][0] for e in r1.examples] == [2, 102]
    p1 = pad_anchor_requests(r1, 4, pad_example(r1, rows[6:], dup))
    assert p1.groups == [2, 2, -1, -1] and p1.examples[2:] == [r1.examples[0]] * 2
    # a rank without a group start pads with a variant of its first row
    none = plan_anchor_requests(rows[1:3], 1, 4, dup)
    p = pad_anchor_requests(none, 2, pad_example(none, rows[1:3], dup))
    assert p.groups == [-1, -1] and p.examples[0]["images"] == [0, 0]


def test_trl_advantages_anchor_identities():
    """Pool = scorable rewards + scorable anchors of the group; NaN rows get 0; a group
    without scorable rewards drops its anchors."""
    r = torch.tensor([1.0, 0.0, 1.0, float("nan"), float("nan"), float("nan"), 0.5, 0.5])
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0, 0.5])
    ga = torch.tensor([0, 0, 0, 1, 2])  # anchor 2 unscorable, anchor 4's group has no scorable reward
    res = trl_advantages(r, 2, "group", a, ga)
    want = mars.mono_anchored_advantage(r[[0, 1, 2, 6, 7]], torch.tensor([0, 0, 1, 3, 3]), a[[0, 1, 3]],
                                        torch.tensor([0, 0, 1]), eps=1e-4)
    assert torch.allclose(res.advantages[[0, 1, 2, 6, 7]], want, atol=1e-7)
    assert res.advantages[2].item() == pytest.approx((1.0 - 1.5) / (math.sqrt(0.5) + 1e-4))
    assert (res.advantages[[3, 4, 5]] == 0).all()
    assert res.num_anchors.tolist() == [2, 1, 0, 0]
    assert res.gain[:2].tolist() == pytest.approx([0.0, -1.0]) and res.gain[2:].isnan().all()
    batch = trl_advantages(r, 2, "batch", a, ga)
    pool = torch.cat([r[[0, 1, 2, 6, 7]], a[[0, 1, 3]]]).double()
    num = mars.mono_anchored_advantage(r[[0, 1, 2, 6, 7]], torch.tensor([0, 0, 1, 3, 3]), a[[0, 1, 3]],
                                       torch.tensor([0, 0, 1]), norm_by_std=False)
    assert torch.allclose(batch.advantages[[0, 1, 2, 6, 7]], (num / (pool.std() + 1e-4)).float(), atol=1e-7)
    with pytest.raises(ValueError, match="scale_rewards"):
        trl_advantages(r, 2, "pool")
    with pytest.raises(ValueError, match="multiple of num_generations"):
        trl_advantages(r[:7], 2)
    with pytest.raises(ValueError, match="anchor_groups must lie in"):
        trl_advantages(r, 2, "group", a, torch.tensor([0, 0, 0, 1, 4]))


# ----------------------------------------------------------------------------- TRL's numbers

CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="grpo", importance_sampling_level="sequence", scale_rewards="none",
         off_policy_mask_threshold=0.01),
    dict(loss_type="bnpo", scale_rewards="batch", beta=0.0, num_iterations=1),
    dict(loss_type="dr_grpo", top_entropy_quantile=0.5, temperature=0.7),
    dict(loss_type="dapo", delta=1.5, use_bias_correction_kl=False),
    dict(loss_type="dapo", epsilon_high=0.28, reward_funcs=(reward_flaky,)),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="cispo"),
    dict(loss_type="sapo"),
    dict(loss_type="vespo"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" if k == "loss_type" else k
                                                                for k, v in c.items()))
def test_mono_off_equals_trl(text_model, tmp_path, case):
    path, tok = text_model
    case = dict(case)
    funcs = case.pop("reward_funcs", (reward_answer, reward_flaky))
    args = dict(reward_weights=[1.0, 0.5][:len(funcs)], **case)
    stock = make(GRPOTrainer, path, tok, config(tmp_path, **args), reward_funcs=funcs)
    ours = make(MarsGRPOTrainer, path, tok, config(tmp_path, **args), reward_funcs=funcs)
    expect_mars = case["loss_type"] in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    assert (ours.mars_loss_plan.fallback is None) == expect_mars, ours.mars_loss_plan.fallback
    for t in (stock, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = 2  # set by the training loop
    inputs = [r for r in text_rows()[:2] for _ in range(G)]
    torch.manual_seed(1)
    b_stock = stock._generate_and_score_completions(copy.deepcopy(inputs))
    torch.manual_seed(1)
    b_ours = ours._generate_and_score_completions(copy.deepcopy(inputs))
    assert torch.equal(b_stock["completion_ids"], b_ours["completion_ids"])  # the same sampled batch
    assert torch.allclose(b_ours["advantages"], b_stock["advantages"], rtol=1e-6, atol=1e-6)
    assert b_stock["advantages"].abs().max() > 0.1
    mask = b_stock["completion_mask"]
    assert ((mask.sum(1) == 0).any() and (mask.sum(1) > 0).any()) or not stock.mask_truncated_completions
    if len(funcs) == 1:  # unscorable rows: advantage 0 in both
        assert (b_stock["advantages"][[0, 5]] == 0).all() and (b_ours["advantages"][[0, 5]] == 0).all()

    perturb([stock.model, ours.model])
    l_stock, g_stock = loss_and_grads(stock, b_stock)
    l_ours, g_ours = loss_and_grads(ours, b_stock)
    assert l_ours.item() == pytest.approx(l_stock.item(), rel=1e-6, abs=1e-7)
    assert_grads_close(g_stock, g_ours)
    m_stock, m_ours = stock._metrics["train"], ours._metrics["train"]
    for key in ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert (key in m_stock) == (key in m_ours), key
        if key in m_stock:
            assert m_ours[key][-1] == pytest.approx(m_stock[key][-1], rel=1e-5, abs=1e-7), key
    if expect_mars and "old_per_token_logps" in b_stock and case.get("importance_sampling_level") != "sequence":
        assert m_stock["clip_ratio/region_mean"][-1] > 0  # the clipped branch is exercised


def test_train_steps_equal_trl(text_model, tmp_path):
    """Two optimizer steps through train() (generation every step, gradient accumulation 2,
    dapo's global token count): the logged loss, grad norm and reward equal TRL's."""
    path, tok = text_model
    logs = []
    for cls in (GRPOTrainer, MarsGRPOTrainer):
        t = make(cls, path, tok, config(tmp_path, num_iterations=1, beta=0.05, learning_rate=1e-2))
        t.train()
        logs.append([h for h in t.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 2
    for a, b in zip(*logs):
        for key in ("loss", "grad_norm", "reward", "kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_kl_far_past_verls_clamp_equals_trl(text_model, tmp_path, bias_correction, fused):
    """beta > 0 with the reference far from the policy on some tokens (d = ref - logp about
    3.5, 6, -6: k3 ~ 29, 400, 5, where verl's clamp would stop at 10): MarsGRPOTrainer's
    loss, gradients and kl metric equal TRL's (the plug-in passes kl_clamp=None). In
    float32; tests/test_loss_kl_clamp.py goes to d = 12 in float64."""
    path, tok = text_model
    args = dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=bias_correction, reward_weights=[1.0, 0.5])
    stock = make(GRPOTrainer, path, tok, config(tmp_path, **args))
    ours = make(MarsGRPOTrainer, path, tok, config(tmp_path, **args),
                **({"fused_lm_head": True} if fused else {}))
    assert ours.mars_loss_plan.fallback is None and ours.mars_loss_plan.options["kl_clamp"] is None
    for t in (stock, ours):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
    inputs = [r for r in text_rows()[:2] for _ in range(G)]
    torch.manual_seed(1)
    batch = stock._generate_and_score_completions(copy.deepcopy(inputs))
    ref = batch["ref_per_token_logps"].clone()
    shift = torch.tensor([3.5, 6.0, -6.0, 2.5, 0.0, 0.5])[: ref.shape[1]]
    batch["ref_per_token_logps"] = ref + shift          # every row: tokens far past the clamp
    perturb([stock.model, ours.model])
    l_stock, g_stock = loss_and_grads(stock, batch)
    l_ours, g_ours = loss_and_grads(ours, batch)
    assert l_ours.item() == pytest.approx(l_stock.item(), rel=1e-5)
    assert_grads_close(g_stock, g_ours, 1e-4 if fused else 1e-5)
    assert ours._metrics["train"]["kl"][-1] == pytest.approx(stock._metrics["train"]["kl"][-1], rel=1e-5)
    ours.mars_loss_plan.options["kl_clamp"] = 10.0       # verl's clamp: not TRL's numbers here
    l_clamped, _ = loss_and_grads(ours, batch)
    assert abs(l_clamped.item() - l_stock.item()) > 0.05 * abs(l_stock.item())


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_lm_head_equals_unfused(text_model, tmp_path, level):
    path, tok = text_model
    args = dict(loss_type="grpo" if level == "sequence" else "dapo", importance_sampling_level=level,
                temperature=0.7)
    plain = make(MarsGRPOTrainer, path, tok, config(tmp_path, **args))
    fused = make(MarsGRPOTrainer, path, tok, config(tmp_path, **args), fused_lm_head=True)
    for t in (plain, fused):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
    torch.manual_seed(1)
    batch = plain._generate_and_score_completions([r for r in text_rows()[:2] for _ in range(G)])
    perturb([plain.model, fused.model])
    l_plain, g_plain = loss_and_grads(plain, batch)
    l_fused, g_fused = loss_and_grads(fused, batch)
    assert l_fused.item() == pytest.approx(l_plain.item(), rel=1e-5, abs=1e-7)
    assert_grads_close(g_plain, g_fused, 1e-4)
    for key in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert fused._metrics["train"][key][-1] == pytest.approx(plain._metrics["train"][key][-1], abs=1e-6)
    assert "entropy" not in fused._metrics["train"]


# ----------------------------------------------------------------------------- mono sources

def vlm_trainer(vlm, tmp_path, mono="duplicate", reward=None, fused=False, mono_fn=None, **over):
    model, proc = vlm
    kw = dict(beta=0.0, num_iterations=1, reward_weights=None, max_completion_length=5,
              gradient_accumulation_steps=2, mask_truncated_completions=False)  # generation batch: 2 prompts x G
    args = config(tmp_path, **{**kw, **over})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MarsGRPOTrainer(model=copy.deepcopy(model), reward_funcs=[reward or Recorder()], args=args,
                               processing_class=proc, train_dataset=Dataset.from_list(vlm_rows()),
                               mono_sources=mono, mono_fn=mono_fn, fused_lm_head=fused)


@pytest.mark.parametrize("mono", ["duplicate", "single"])
@pytest.mark.parametrize("scale", ["group", "none"])
def test_mono_advantages_equal_mars(vlm, tmp_path, mono, scale):
    rec = Recorder()
    t = vlm_trainer(vlm, tmp_path, mono, rec, scale_rewards=scale)
    t.model.train()
    rows = vlm_rows()
    inputs = [r for r in rows[:2] for _ in range(G)]
    out = t._generate_and_score_completions(copy.deepcopy(inputs))
    assert len(rec.calls) == 2 and len(rec.calls[0]["out"]) == 2 * G and len(rec.calls[1]["out"]) == 4
    r, m = torch.tensor(rec.calls[0]["out"]), torch.tensor(rec.calls[1]["out"])
    want = mars.mono_anchored_advantage(r, torch.arange(2 * G) // G, m, torch.tensor([0, 0, 1, 1]),
                                        eps=1e-4, norm_by_std=scale == "group")
    assert torch.allclose(out["advantages"], want, atol=1e-6)
    # anchors score the mono images with the row's own reward inputs
    imgs = rec.calls[1]["images"]
    src = [rows[0]["images"][0], rows[0]["images"][1], rows[1]["images"][0], rows[1]["images"][1]]
    want_imgs = [[s, s] for s in src] if mono == "duplicate" else [[s] for s in src]
    assert imgs == want_imgs and rec.calls[1]["answer"] == [rows[0]["answer"]] * 2 + [rows[1]["answer"]] * 2
    # anchors are not in the batch, nor in TRL's length metrics
    assert out["completion_ids"].shape[0] == 2 * G and out["advantages"].shape == (2 * G,)
    met = t._metrics["train"]
    assert len(met["completions/mean_length"]) == 1
    assert met["completions/mean_length"][0] == pytest.approx(out["completion_mask"].sum(1).float().mean().item())
    gain = torch.stack([r[:G].mean() - m[:2].mean(), r[G:].mean() - m[2:].mean()]).mean()
    assert met["mars/gain"][0] == pytest.approx(gain.item(), abs=1e-6)
    assert met["mars/mono_reward"][0] == pytest.approx(m.mean().item(), abs=1e-6)
    assert met["mars/anchors_per_prompt"] == [2.0]
    assert list(t._logs["advantages"]) == pytest.approx(out["advantages"].tolist(), abs=1e-6)


def test_mono_fn(vlm, tmp_path):
    """A user's variants: only the second source, as a single image; one anchor per prompt."""
    rec = Recorder()
    t = vlm_trainer(vlm, tmp_path, None, rec, mono_fn=lambda x: mono_examples(x, "single")[1:])
    t.model.train()
    rows = vlm_rows()
    out = t._generate_and_score_completions([r for r in rows[:2] for _ in range(G)])
    assert rec.calls[1]["images"] == [[rows[0]["images"][1]], [rows[1]["images"][1]]]
    r, m = torch.tensor(rec.calls[0]["out"]), torch.tensor(rec.calls[1]["out"])
    want = mars.mono_anchored_advantage(r, torch.arange(2 * G) // G, m, torch.tensor([0, 1]), eps=1e-4)
    assert torch.allclose(out["advantages"], want, atol=1e-6)
    assert t._metrics["train"]["mars/anchors_per_prompt"] == [1.0]


def _greedy_reference(model, proc, example, max_new_tokens):
    from trl.data_utils import prepare_multimodal_messages

    msgs = prepare_multimodal_messages(example["prompt"], images=example["images"])
    enc = proc.apply_chat_template([msgs], add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    tok = proc.tokenizer
    with torch.no_grad():
        ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, suppress_tokens=[model.config.image_token_id])
    return proc.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def test_anchors_are_greedy(vlm, tmp_path):
    rec = Recorder()
    t = vlm_trainer(vlm, tmp_path, "duplicate", rec)
    t.model.train()
    inputs = [r for r in vlm_rows()[:2] for _ in range(G)]
    seen = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        rec.calls.clear()
        t._generate_and_score_completions(copy.deepcopy(inputs))
        seen.append(rec.calls[1]["completions"])
    assert seen[0] == seen[1]  # no sampling: the seed does not matter
    variants = [v for r in vlm_rows()[:2] for v in mono_examples(r, "duplicate")]
    model = t.model.eval()
    want = [_greedy_reference(model, t.processing_class, v, 5) for v in variants]
    assert seen[0] == want


def test_vlm_two_images_trains_and_evaluates(vlm, tmp_path):
    """A few steps of MARS training on two-image prompts with the fused lm-head loss, then
    an evaluation pass (anchors in eval mode too)."""
    model, proc = vlm
    args = config(tmp_path, beta=0.01, num_iterations=1, reward_weights=None, max_completion_length=5,
                  gradient_accumulation_steps=1, max_steps=3, learning_rate=1e-2, per_device_eval_batch_size=4,
                  num_generations_eval=2)
    model.save_pretrained(tmp_path / "vlm")  # beta > 0: TRL loads the reference model from the path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = MarsGRPOTrainer(model=str(tmp_path / "vlm"), reward_funcs=[Recorder()], args=args, processing_class=proc,
                            train_dataset=Dataset.from_list(vlm_rows()), eval_dataset=Dataset.from_list(vlm_rows(2)),
                            mono_sources="single", fused_lm_head=True)
    ev0 = t.evaluate()  # before any training step (no gradient-accumulation count yet)
    assert math.isfinite(ev0["eval_loss"]) and "eval_mars/gain" in ev0
    before = [p.detach().clone() for p in t.model.parameters()]
    t.train()
    steps = [h for h in t.state.log_history if "loss" in h]
    assert len(steps) == 3 and all(math.isfinite(h["loss"]) and "mars/gain" in h for h in steps)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    ev = t.evaluate()
    assert math.isfinite(ev["eval_loss"]) and "eval_mars/mono_reward" in ev


def test_vlm_fused_lm_head_equals_unfused(vlm, tmp_path):
    """The fused path feeds the VLM backbone the same inputs (pixel_values, image_grid_thw,
    mm_token_type_ids for M-RoPE) as TRL's forward: same loss and gradients."""
    plain = vlm_trainer(vlm, tmp_path, "duplicate", num_iterations=2)
    fused = vlm_trainer(vlm, tmp_path, "duplicate", num_iterations=2, fused=True)
    for t in (plain, fused):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
    torch.manual_seed(1)
    batch = plain._generate_and_score_completions([r for r in vlm_rows()[:2] for _ in range(G)])
    assert "pixel_values" in batch and "mm_token_type_ids" in batch and "old_per_token_logps" in batch
    perturb([plain.model, fused.model], scale=0.02)
    l_plain, g_plain = loss_and_grads(plain, batch)
    l_fused, g_fused = loss_and_grads(fused, batch)
    assert l_fused.item() == pytest.approx(l_plain.item(), rel=1e-5, abs=1e-7)
    assert_grads_close(g_plain, g_fused, 1e-4)


class FakeVLLM:
    """Stands in for TRL's VLLMGeneration (no vLLM here): records the sampling settings of
    each generate call and returns fixed completions."""

    def __init__(self, eos):
        self.temperature, self.top_p, self.top_k, self.min_p = 0.9, 0.8, 20, 0.05
        self.generation_kwargs = {"seed": 3, "temperature": 0.9, "presence_penalty": 0.5}
        self.eos, self.calls, self.syncs = eos, [], 0

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls.append(dict(n=len(prompts), num_generations=num_generations, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                               kwargs=dict(self.generation_kwargs), images=images))
        comp = [[5, 6, self.eos] for _ in prompts]
        return prompts, comp, [[[-0.1]] * 3 for _ in prompts], None


def test_vllm_anchor_generation_is_greedy(vlm, tmp_path):
    rec = Recorder()
    t = vlm_trainer(vlm, tmp_path, "duplicate", rec)
    t.model.train()
    fake = FakeVLLM(t.eos_token_ids[0])
    t.use_vllm, t.vllm_generation, t._last_loaded_step = True, fake, -1
    t.vllm_importance_sampling_correction = False
    t._generate_and_score_completions([r for r in vlm_rows()[:2] for _ in range(G)])
    sampled, anchors = fake.calls
    assert sampled["temperature"] == 0.9 and sampled["num_generations"] == G and sampled["n"] == 2 * G
    assert anchors == dict(n=4, num_generations=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0,
                           kwargs={"presence_penalty": 0.5}, images=anchors["images"])
    assert [len(i) for i in anchors["images"]] == [2, 2, 2, 2]
    assert fake.syncs == 1  # the weights were pushed once, for the sampled rollouts
    assert (fake.temperature, fake.top_k, fake.generation_kwargs["seed"]) == (0.9, 20, 3)  # restored


def test_errors(text_model, vlm, tmp_path, monkeypatch):
    path, tok = text_model
    with pytest.raises(ValueError, match="mono_sources must be one of"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path), mono_sources="dup")
    with pytest.raises(ValueError, match="not both"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path), mono_sources="single", mono_fn=lambda x: [])
    with pytest.raises(ValueError, match="not supported with tools"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path), mono_sources="single", tools=[len])
    with pytest.raises(ValueError, match="sum_then_normalize"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path, multi_objective_aggregation="normalize_then_sum"),
             mono_sources="single")
    with pytest.raises(ValueError, match="fused_lm_head .* cannot serve: .*top_entropy_quantile"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path, top_entropy_quantile=0.5), fused_lm_head=True)
    with pytest.warns(UserWarning, match="TRL's own loss: loss_type='cispo'"):
        MarsGRPOTrainer(model=path, reward_funcs=[reward_answer],
                        args=config(tmp_path, loss_type="cispo", reward_weights=None),
                        processing_class=tok, train_dataset=Dataset.from_list(text_rows()))
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match="pinned to trl >=1.16.0,<1.17.0 .* this is trl 1.17.0"):
        make(MarsGRPOTrainer, path, tok, config(tmp_path))
    with pytest.warns(UserWarning, match="pinned to trl"):
        MarsGRPOTrainer(model=path, reward_funcs=[reward_answer], args=config(tmp_path, reward_weights=None),
                        processing_class=tok,
                        train_dataset=Dataset.from_list(text_rows()), allow_untested_trl=True)
    monkeypatch.undo()
    # a mono_fn whose variants lose a column
    bad = vlm_trainer(vlm, tmp_path, None)
    bad.mono_fn, bad.mono_enabled = (lambda x: [{"prompt": x["prompt"]}]), True
    bad.model.train()
    with pytest.raises(ValueError, match="must have the row's columns .*missing \\['answer', 'images'\\]"):
        bad._generate_and_score_completions([r for r in vlm_rows()[:2] for _ in range(G)])


# ----------------------------------------------------------------------------- two processes

SCRIPT = textwrap.dedent('''
    import copy, json, os, sys, warnings
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, os.environ["TEST_DIR"])
    import test_integration_trl as T
    from datasets import Dataset
    from mars.integrations.trl import MarsGRPOTrainer

    model, tok, improc = T.build_tiny(T.WORDS, hidden_size=32, num_heads=4, vision_hidden_size=16,
                                      vision_depth=1, num_layers=1)
    tok.chat_template = T.TEMPLATE
    proc = T._processor(improc, tok)
    rec = T.Recorder()
    from trl import GRPOConfig
    args = GRPOConfig(output_dir=os.environ["OUT"], per_device_train_batch_size=3, gradient_accumulation_steps=2,
                      num_generations=4, max_completion_length=4, use_cpu=True, bf16=False, report_to="none",
                      max_steps=1, logging_steps=1, save_strategy="no", gradient_checkpointing=False, beta=0.0,
                      seed=0, disable_tqdm=True, loss_type="dapo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = MarsGRPOTrainer(model=model, reward_funcs=[rec], args=args, processing_class=proc,
                            train_dataset=Dataset.from_list(T.vlm_rows(3)), mono_sources="duplicate")
    rank = t.accelerator.process_index
    rows = T.vlm_rows(3)
    inputs = [r for r in rows for _ in range(4)][rank * 6:(rank + 1) * 6]  # group 1 spans both ranks
    t.model.train()
    out = t._generate_and_score_completions(copy.deepcopy(inputs))
    local = dict(rank=rank, adv=out["advantages"].tolist(), sampled=rec.calls[0]["out"],
                 anchors=rec.calls[1]["out"], gain=t._metrics["train"]["mars/gain"][0])
    everything = [None, None]
    dist.all_gather_object(everything, local)
    t.train()  # one optimizer step end to end with 2 processes
    if rank == 0:
        json.dump(everything, open(os.path.join(os.environ["OUT"], "result.json"), "w"))
''')


@pytest.mark.slow
def test_two_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo): the groups span ranks, rank 1 pads its anchor
    requests; the gathered advantages equal mars.mono_anchored_advantage of all rewards."""
    env = dict(os.environ, TEST_DIR=os.path.dirname(__file__), OUT=str(tmp_path), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    script = tmp_path / "two_procs.py"
    script.write_text(SCRIPT)
    import socket
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json
    res = json.load(open(tmp_path / "result.json"))
    r = torch.tensor(res[0]["sampled"] + res[1]["sampled"])
    # anchor calls: rank 0 owns groups 0, 1 (4 anchors), rank 1 group 2 (2 + 2 padding)
    assert len(res[0]["anchors"]) == len(res[1]["anchors"]) == 4
    m = torch.tensor(res[0]["anchors"] + res[1]["anchors"][:2])
    want = mars.mono_anchored_advantage(r, torch.arange(12) // 4, m, torch.tensor([0, 0, 1, 1, 2, 2]), eps=1e-4)
    got = torch.tensor(res[0]["adv"] + res[1]["adv"])
    assert torch.allclose(got, want, atol=1e-6)
    assert res[0]["gain"] == pytest.approx(res[1]["gain"])
