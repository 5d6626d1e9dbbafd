"""Parity of mars.loss.policy_loss with the peers on the same inputs (the formulas of
docs/loss.md): verl's compute_policy_loss_vanilla + agg_loss + kl_penalty,
TRL's GRPOTrainer._compute_loss (the real method, on a stub trainer), Liger's torch
ppo_loss_fn. Skipped when the peer is not installed."""

import pytest
import torch

import mars
from mars.reference import LOSS_AGGS
from test_policy_loss import KERNELS, batch
from trl_peer import trl_compute_loss

BACKENDS = ["reference"] + KERNELS


def finite_batch(B=8, T=30, seed=0, adv_2d=False):
    """Peers multiply by the mask (NaN * 0 = NaN), so masked positions hold finite junk here."""
    logp, old, adv, mask, ref = batch(B, T, seed=seed, adv_2d=adv_2d, poison_masked=False)
    return logp, old, adv, mask, ref


def grad_of(loss, x):
    return torch.autograd.grad(loss, x)[0]


# ------------------------------------------------------------------------------- verl

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl not installed")


class VerlConfig(dict):
    """What compute_policy_loss_vanilla reads from an ActorConfig."""
    def __getattr__(self, k):
        return self[k]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", LOSS_AGGS)
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("global_norm", [False, True])
def test_verl_parity(backend, agg, kl_type, global_norm):
    """verl's actor loss: agg(compute_policy_loss_vanilla) + kl_coef * agg(kl_penalty), dual
    clip c = 3 always on in verl, log-ratio clamped at 20; metrics: pg_clipfrac = high + low,
    ppo_kl = approx_kl, pg_clipfrac_lower = dual_clip_frac."""
    logp, old, adv, mask, ref = finite_batch(seed=LOSS_AGGS.index(agg), adv_2d=kl_type == "k2")
    info = {}
    mine = dict(agg=agg)
    if global_norm:
        info = dict(batch_num_tokens=int(mask.sum()) + 17, global_batch_size=11,
                    loss_scale_factor=64)
        mine.update(num_tokens=info["batch_num_tokens"], num_seqs=11, loss_scale=64)
    cfg = VerlConfig(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
                     global_batch_info=info)
    adv_bt = adv if adv.dim() == 2 else adv[:, None].expand_as(logp)
    maskf = mask.double()
    pg, metrics = verl_core.compute_policy_loss_vanilla(old, logp, adv_bt, maskf, agg, cfg)
    kl = verl_core.agg_loss(verl_core.kl_penalty(logp, ref, kl_type), maskf, agg, **info)
    want = pg + 0.05 * kl
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28,
                                dual_clip=3.0, kl_coef=0.05, kl_type=kl_type, backend=backend,
                                **mine)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(want, logp), rtol=1e-7, atol=1e-10)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["clip_frac_high"] + m["clip_frac_low"] == pytest.approx(metrics["actor/pg_clipfrac"], rel=1e-6)
    assert m["approx_kl"] == pytest.approx(metrics["actor/ppo_kl"], rel=1e-6, abs=1e-9)
    assert m["dual_clip_frac"] == pytest.approx(metrics["actor/pg_clipfrac_lower"], rel=1e-6, abs=1e-9)
    assert m["ref_kl"] == pytest.approx(verl_core.agg_loss(
        verl_core.kl_penalty(logp, ref, kl_type), maskf, "token-mean").item(), rel=1e-6)


# -------------------------------------------------------------------------------- TRL

def trl_loss(loss_type, logp, old, adv, mask, ref, beta, eps_low, eps_high, level="token",
             max_completion_length=None, num_items_in_batch=None):
    """TRL's own GRPOTrainer._compute_loss on a stub trainer (tests/trl_peer.py)."""
    return trl_compute_loss(loss_type, logp, old, adv, mask, ref, beta=beta, eps_low=eps_low,
                            eps_high=eps_high, level=level,
                            max_completion_length=max_completion_length,
                            num_items_in_batch=num_items_in_batch)


TRL_MAP = {  # TRL loss types on mars's aggregation modes (docs/trl.md)
    "grpo": dict(agg="seq-mean-token-mean"),
    "dapo": dict(agg="token-mean"),  # with the global token count num_items_in_batch
    "bnpo": dict(agg="token-mean"),  # with the local count
    "dr_grpo": dict(agg="seq-mean-token-sum-norm"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", list(TRL_MAP))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_parity(backend, loss_type, level):
    """TRL: no log-ratio clamp, no dual clip, k3 without clamps (inputs keep it in range);
    grpo / dr_grpo divide by all B rows, empty ones included (num_seqs=B), dr_grpo also by
    max_completion_length (loss_scale)."""
    pytest.importorskip("trl")
    logp, old, adv, mask, ref = finite_batch(seed=3, B=6, T=25)
    kw = dict(TRL_MAP[loss_type], num_seqs=6)
    extra = {}
    if loss_type == "dapo":
        extra["num_items_in_batch"] = int(mask.sum()) + 40
        kw["num_tokens"] = extra["num_items_in_batch"]
    if loss_type == "dr_grpo":
        extra["max_completion_length"] = 32
        kw["loss_scale"] = 32
    want, metrics = trl_loss(loss_type, logp, old, adv, mask, ref, 0.04, 0.2, 0.28, level, **extra)
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28,
                                kl_coef=0.04, kl_type="k3", log_ratio_clamp=None,
                                ratio_level=level, backend=backend, **kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(want, logp), rtol=1e-7, atol=1e-10)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert out.metrics["clip_frac_low"].item() == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert out.metrics["ref_kl"].item() == pytest.approx(metrics["kl"][0], rel=1e-7)


# ------------------------------------------------------------------------------ Liger

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_liger_parity(backend, loss_type, level):
    """Liger's chunked GRPO loss function (pure torch; runs on CPU): one chunk = the batch."""
    grpo = pytest.importorskip("liger_kernel.chunked_loss.grpo_loss")
    logp, old, adv, mask, ref = finite_batch(seed=5, B=7, T=19)
    maskf = mask.double()
    want, metrics = grpo.LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp, maskf, adv, maskf, ref_per_token_logps=ref, old_per_token_logps=old,
        epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type=loss_type,
        max_completion_length=40, importance_sampling_level=level,
        num_items_in_batch=torch.tensor(float(mask.sum())) if loss_type == "dapo" else None)
    kw = dict(TRL_MAP[loss_type], num_seqs=7)
    if loss_type == "dr_grpo":
        kw["loss_scale"] = 40
    out = mars.loss.policy_loss(logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28,
                                kl_coef=0.04, log_ratio_clamp=None, ratio_level=level,
                                backend=backend, **kw)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-7, abs=1e-10)
    torch.testing.assert_close(grad_of(out.loss, logp), grad_of(want, logp), rtol=1e-7, atol=1e-10)
    assert out.metrics["ref_kl"].item() == pytest.approx(metrics[0].item(), rel=1e-7)
    clip = out.metrics["clip_frac_high"] + out.metrics["clip_frac_low"]
    assert clip.item() == pytest.approx(metrics[1].item(), rel=1e-7, abs=1e-12)
