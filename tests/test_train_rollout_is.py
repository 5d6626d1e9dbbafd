"""mars train: loss.rollout_is (truncated importance sampling of the engine / trainer
log-prob mismatch) and loss.kl_type=k3_ratio. The weights function against a float64
hand computation (token / sequence, the cap, masks, rows without tokens); one trainer
step whose engine log-probs are perturbed on purpose: the loss the loop computes is
mars.loss.policy_loss (or the fused loss) with the hand-made weights, in every
micro-batch; rollout_is=off passes no weights; k3_ratio reaches mars.loss."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import mars  # noqa: E402
from mars.train import advantages, loop, update  # noqa: E402
from mars.train.config import ConfigError, load_config  # noqa: E402
from mars.train.update import rollout_is_weights  # noqa: E402

FAST = ["max_steps=1", "warmup.steps=1", "warmup.batch_size=2", "rollout.n=3", "optim.prompts_per_step=2",
        "rollout.max_new_tokens=8", "log.progress=false", "optim.micro_batch_size=2", "data.eval=null",
        "log.plot_every=0", "log.samples_every=0", "rollout.mono=single",
        "optim.mini_batches=1"]  # every micro-batch then holds a row with a non-zero advantage


# --------------------------------------------------------------------------- the weights
def _hand(old, eng, mask, level, cap):
    """Loops over rows and tokens in Python floats."""
    B, T = old.shape
    if level == "token":
        w = [[min(math.exp(max(-20.0, min(20.0, old[i, t].item() - eng[i, t].item()))), cap) if mask[i, t] else 1.0
              for t in range(T)] for i in range(B)]
        return torch.tensor(w, dtype=torch.float64)
    out = []
    for i in range(B):
        d = [old[i, t].item() - eng[i, t].item() for t in range(T) if mask[i, t]]
        out.append(min(math.exp(sum(d) / len(d)), cap) if d else 1.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [1.3, 2.0, float("inf")])
def test_weights_match_a_hand_computation(level, cap):
    g = torch.Generator().manual_seed(7)
    B, T = 5, 7
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2
    shift = torch.tensor([-1.0, 0.5, -0.2, 0.0, 0.3], dtype=torch.float64)[:, None]  # per-row mismatch
    eng = old + shift + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[3] = False  # a row without tokens
    old[~mask] = float("nan")  # masked positions may hold anything
    eng[~mask] = float("-inf")
    w, clipped = rollout_is_weights(old, eng, mask, level, cap)
    want = _hand(old, eng, mask, level, cap)
    assert w.shape == want.shape and w.dtype == torch.float64
    torch.testing.assert_close(w, want, rtol=1e-12, atol=0)
    if math.isfinite(cap):
        assert clipped.any() and (w[clipped] == cap).all() and (w[~clipped] < cap + 1e-12).all()
    assert not clipped[~mask].any() if level == "token" else not clipped[3]


def test_weights_clamp_an_engine_minus_inf_and_need_a_level():
    old = torch.tensor([[-1.0, -2.0]])
    eng = torch.tensor([[float("-inf"), -2.0]])
    w, clipped = rollout_is_weights(old, eng, torch.ones(1, 2, dtype=torch.bool), "token", 2.0)
    assert w.tolist() == [[2.0, 1.0]] and clipped.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        rollout_is_weights(old, eng, torch.ones(1, 2), "row", 2.0)


def test_config_keys():
    cfg = load_config(None, ["loss.rollout_is=sequence", "loss.rollout_is_cap=3", "loss.kl_type=k3_ratio"])
    assert (cfg.loss.rollout_is, cfg.loss.rollout_is_cap, cfg.loss.kl_type) == ("sequence", 3.0, "k3_ratio")
    assert load_config(None, ["loss.rollout_is=off"]).loss.rollout_is == "off"  # YAML's off is false
    assert load_config(None).loss.rollout_is == "off" and load_config(None).loss.rollout_is_cap == 2.0
    assert update.loss_options(load_config(None, ["loss.kl_type=k3_ratio"]))["kl_type"] == "k3_ratio"
    with pytest.raises(ConfigError, match="loss.rollout_is_cap: must be > 0"):
        load_config(None, ["loss.rollout_is_cap=0"])
    with pytest.raises(ConfigError, match="loss.rollout_is"):
        load_config(None, ["loss.rollout_is=geometric"])


# --------------------------------------------------------------------------- one trainer step
def _spy(monkeypatch, name):
    """Record every call of mars.loss.<name> the loop makes (inputs detached + output)."""
    real = getattr(mars.loss, name)
    calls = []

    def spy(*args, **kw):
        out = real(*args, **kw)
        calls.append(([a.detach().clone() if torch.is_tensor(a) else a for a in args],
                      {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kw.items()}, out.loss.detach()))
        return out

    monkeypatch.setattr(mars.loss, name, spy)
    return real, calls


def _perturb_engine(monkeypatch):
    """The engine's log-probs moved by -/+0.6 per row (alternating) plus per-token noise
    (a stand-in mismatch: some weights above the cap, some below 1)."""
    real = advantages.generate_rollouts

    def gen(engine, drawn, cfg, timer):
        rows = real(engine, drawn, cfg, timer)
        g = torch.Generator().manual_seed(3)
        for j, r in enumerate(rows):
            lp = torch.tensor(r.completion.logprobs)
            r.completion.logprobs = (lp + 0.6 * (-1) ** j + torch.randn(len(lp), generator=g) * 0.3).tolist()
        return rows

    monkeypatch.setattr(advantages, "generate_rollouts", gen)


def _spread_rewards(monkeypatch):
    """Rewards 0, 1, 2, 0, ... in row order (the tiny model's first step often scores all
    rollouts alike, which gives advantages 0 and a policy term 0)."""
    real = advantages.score_rollouts

    def score(rows, *a, **kw):
        out = real(rows, *a, **kw)
        for j, r in enumerate(rows):
            r.reward = float(j % 3)
        return out

    monkeypatch.setattr(advantages, "score_rollouts", score)


def _run(tmp_path, extra):
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *FAST, *extra])
    loop.train(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1]


def _mask_and_rollout_logp(calls, engine_rows, fused):
    """The [B, T] engine log-probs of each recorded micro-batch, in the loop's row order."""
    out, k = [], 0
    for args, kw, _ in calls:
        mask = args[5] if fused else args[3]
        B, T = mask.shape
        eng = torch.zeros(B, T)
        for i in range(B):
            lp = engine_rows[k + i]
            eng[i, :len(lp)] = torch.tensor(lp)
        k += B
        out.append((mask, eng))
    return out


@pytest.mark.parametrize("level, fused", [("token", False), ("sequence", True)])
def test_step_passes_the_hand_made_weights(tmp_path, monkeypatch, level, fused):
    name = "fused_linear_policy_loss" if fused else "policy_loss"
    real, calls = _spy(monkeypatch, name)
    _perturb_engine(monkeypatch)
    _spread_rewards(monkeypatch)
    seen = []
    real_mb = update.micro_batch_loss

    def mb(model, rows, *a, **kw):  # the rows of each micro-batch, in order
        seen.extend(r.completion.logprobs for r in rows)
        return real_mb(model, rows, *a, **kw)

    monkeypatch.setattr(update, "micro_batch_loss", mb)
    rec = _run(tmp_path, [f"loss.rollout_is={level}", "loss.rollout_is_cap=1.5", f"loss.fused={str(fused).lower()}"])
    assert len(calls) >= 3  # 6 rollouts in micro-batches of 2
    clipped = total = 0
    for (args, kw, loss), (mask, eng) in zip(calls, _mask_and_rollout_logp(calls, seen, fused)):
        old = args[3] if fused else args[1]
        want, cl = rollout_is_weights(old.double(), eng.double(), mask, level, 1.5)
        assert kw["is_weights"].shape == want.shape
        torch.testing.assert_close(kw["is_weights"].double(), want, rtol=1e-6, atol=1e-7)
        m = mask.bool() if level == "token" else mask.bool().any(-1)
        clipped += int(cl[m].sum()) if level == "token" else int((cl[:, None] & mask.bool()).sum())
        total += int(mask.bool().sum())
        # the loss of the call is mars.loss with those weights (recomputed on the same tensors)
        kw2 = dict(kw, is_weights=want.float())
        torch.testing.assert_close(real(*args, **kw2).loss, loss, rtol=1e-6, atol=1e-7)
        # and differs from no weights (the advantages are not 0, some weights are not 1)
        assert (args[4] if fused else args[2]).abs().max() > 0.1 and (want[m] - 1).abs().max() > 0.1
        assert not torch.allclose(real(*args, **dict(kw, is_weights=None)).loss, loss, rtol=1e-4, atol=1e-6)
    assert 0 < rec["rollout_is_mean"] <= 1.5
    assert rec["rollout_is_clipped_frac"] == pytest.approx(clipped / total)
    assert 0 < rec["rollout_is_clipped_frac"] < 1


def test_off_passes_no_weights_and_no_metrics(tmp_path, monkeypatch):
    _, calls = _spy(monkeypatch, "policy_loss")
    _perturb_engine(monkeypatch)
    rec = _run(tmp_path, [])
    assert calls and all(kw["is_weights"] is None for _, kw, _ in calls)
    assert "rollout_is_mean" not in rec and "rollout_is_clipped_frac" not in rec


def test_engine_without_logprobs_is_an_error(tmp_path, monkeypatch):
    real = advantages.generate_rollouts

    def gen(engine, drawn, cfg, timer):
        rows = real(engine, drawn, cfg, timer)
        for r in rows:
            r.completion.logprobs = None
        return rows

    monkeypatch.setattr(advantages, "generate_rollouts", gen)
    with pytest.raises(ValueError, match=r"loss.rollout_is=token needs the engine's per-token log-probs, but "
                                         r"rollout.engine=hf gave no log-probs"):
        _run(tmp_path, ["loss.rollout_is=token"])


def test_k3_ratio_reaches_the_loss(tmp_path, monkeypatch):
    real, calls = _spy(monkeypatch, "policy_loss")
    _spread_rewards(monkeypatch)
    # two mini-batches at a large lr: the second one's policy is no longer the old / reference one (ratio != 1,
    # KL > 0)
    rec = _run(tmp_path, ["loss.kl_coef=0.5", "loss.kl_type=k3_ratio", "optim.mini_batches=2",
                          "optim.lr=0.05"])
    assert calls and math.isfinite(rec["loss"])
    differs = False
    for args, kw, loss in calls:
        assert kw["kl_type"] == "k3_ratio" and kw["kl_coef"] == 0.5 and kw["ref_logp"] is not None
        torch.testing.assert_close(real(*args, **kw).loss, loss, rtol=0, atol=0)
        k3 = real(*args, **dict(kw, kl_type="k3")).loss
        differs |= not torch.allclose(k3, loss, rtol=1e-6, atol=1e-9)
    assert differs  # k3_ratio multiplies k3 by the (not detached) ratio: the loss value differs too
