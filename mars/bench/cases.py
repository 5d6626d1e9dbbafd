"""The cases of `mars bench`: each op's shapes and implementations, defined once (docs/bench.md).

An op has sizes per device (the smallest is the `--quick` one), inputs made from a fixed
seed, and implementations. Building an implementation gives a `Call`: `fn()` runs one
call (forward + backward where the op trains) and returns the tensors to compare with the
reference; `reset()` frees what a previous call left (gradients) so that peak memory is
measured from a clean start. Building raises `Skip` with a note where the implementation
cannot run here (a peer not installed, a Triton kernel on a CPU, a shape too large).

bench/test_bench_*.py (pytest-benchmark) time the same cases.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .peers import Skip, verl_actor_config
from . import peers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Size:
    name: str          # unique within an op and device, e.g. "1024x(16+2)", "256x4096 bf16"
    label: str         # "quick", "small", "paper", "large"
    params: dict
    x: int             # abscissa of the plots: rows or tokens
    series: str = ""   # plot panel (the dtype where an op has several)


@dataclass
class Call:
    fn: Callable[[], tuple]
    reset: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str                       # "mars" | "reference" | "peer" | "baseline"
    build: Callable                 # (inputs: dict, size: Size, device) -> Call; may raise Skip
    devices: tuple = ("cpu", "cuda")
    quick: bool = True              # part of --quick runs
    variant: str = "default"        # which reference output it must match
    note: str = ""


@dataclass
class Op:
    name: str
    title: str
    what: str                       # one paragraph for the Markdown
    sizes: Callable                 # (device: str, quick: bool) -> list[Size]
    inputs: Callable                # (size, device) -> dict
    impls: list
    baseline: Callable              # device -> name of the mars impl the ratios divide by
    memory: bool = False            # measure peak memory
    bytes_moved: Callable | None = None   # size -> bytes the op must read + write
    flops: Callable | None = None         # size -> floating point operations
    expected: Callable | None = None      # (inputs, variant) -> tensors, else the reference impl's output
    sync_check: bool = False        # count host syncs of the mars impls on a GPU
    tolerance: Callable = field(default=lambda size: 1e-4)  # max relative error of a mars impl

    def impls_for(self, device: str, quick: bool) -> list[Impl]:
        return [i for i in self.impls if device in i.devices and (i.quick or not quick)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mars():
    import mars
    return mars


def _need_backend(backend: str) -> None:
    """Skip (with the reason) when an explicitly named backend is not in this install."""
    if backend != "auto":
        info = _mars().backends()[backend]
        if not info.available:
            raise Skip(f"backend {backend!r} not available: {info.reason}")


def _compiled(fn):
    """torch.compile(fn); the first call (the warm-up) compiles."""
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------------------------------
# advantage
# ---------------------------------------------------------------------------------------

def _adv_sizes(device, quick):
    shapes = [("small", 64, 8, 2), ("paper", 1024, 16, 2), ("large", 8192, 16, 2)]
    if quick:
        shapes = shapes[:1]
    return [Size(f"{p}x({g}+{k})", label, dict(prompts=p, G=g, K=k), p * g)
            for label, p, g, k in shapes]


def _adv_inputs(size, device):
    p, G, K = size.params["prompts"], size.params["G"], size.params["K"]
    gen = _gen()
    rewards = torch.randint(0, 2, (p * G,), generator=gen).float()
    rewards += torch.rand(p * G, generator=gen) * 0.1    # distinct values: a real spread
    labels = torch.randperm(p * G, generator=gen) % p    # rows of a group anywhere
    anchors = torch.randint(0, 2, (p * K,), generator=gen).float()
    alabels = torch.arange(p).repeat_interleave(K)
    uid = np.array([f"uid-{i:08d}" for i in labels.tolist()], dtype=object)
    auid = np.array([f"uid-{i:08d}" for i in alabels.tolist()], dtype=object)
    d = torch.device(device)
    return dict(r=rewards.to(d), g=labels.to(d), a=anchors.to(d), ag=alabels.to(d),
                uid=uid, auid=auid)


def _adv_expected(inp, variant):
    ref = _mars().reference.mono_anchored_advantage
    if variant == "noanchor":
        return (ref(inp["r"], inp["g"], singleton="raw"),)
    return (ref(inp["r"], inp["g"], inp["a"], inp["ag"]),)


def python_loop(rewards, labels, anchors, anchor_labels, eps=1e-6):
    """The reference implementation's style: a dict of lists per label, torch per group."""
    keys = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    akeys = anchor_labels.tolist() if isinstance(anchor_labels, torch.Tensor) else anchor_labels
    scores = rewards.clone()
    pools = defaultdict(list)
    for i in range(len(scores)):
        pools[keys[i]].append(scores[i])
    for k in range(len(anchors)):
        pools[akeys[k]].append(anchors[k])
    mean, std = {}, {}
    for key, pool in pools.items():
        t = torch.stack(pool)
        mean[key], std[key] = t.mean(), t.std()
    for i in range(len(scores)):
        scores[i] = (scores[i] - mean[keys[i]]) / (std[keys[i]] + eps)
    return scores


def _adv_mars(labels: str, anchors: bool, backend: str = "auto"):
    def build(inp, size, device):
        _need_backend(backend)
        f = _mars().mono_anchored_advantage
        g = inp["g"] if labels == "int" else inp["uid"]
        if anchors:
            ag = inp["ag"] if labels == "int" else inp["auid"]
            return Call(lambda: (f(inp["r"], g, inp["a"], ag, backend=backend),))
        return Call(lambda: (f(inp["r"], g, singleton="raw", backend=backend),))
    return build


def _adv_reference(compiled: bool):
    def build(inp, size, device):
        f = _mars().reference.mono_anchored_advantage
        f = _compiled(f) if compiled else f
        return Call(lambda: (f(inp["r"], inp["g"], inp["a"], inp["ag"]),))
    return build


def _adv_loop(labels: str):
    def build(inp, size, device):
        if device == "cuda" and size.x > 20000:
            raise Skip("a per-row loop over CUDA tensors at this size takes minutes")
        if labels == "int":
            return Call(lambda: (python_loop(inp["r"], inp["g"], inp["a"], inp["ag"]),))
        return Call(lambda: (python_loop(inp["r"], inp["uid"], inp["a"], inp["auid"]),))
    return build


def _adv_verl(vectorized: bool, labels: str):
    def build(inp, size, device):
        core = peers.verl_core()
        f = (core.compute_grpo_vectorized_outcome_advantage if vectorized
             else core.compute_grpo_outcome_advantage)
        if not vectorized and device == "cuda" and size.x > 20000:
            raise Skip("verl's per-row loop over CUDA tensors at this size takes minutes")
        r = inp["r"]
        tok, mask = r[:, None], torch.ones_like(r)[:, None]   # T = 1: verl's cheapest case
        index = inp["g"] if labels == "int" else inp["uid"]
        return Call(lambda: (f(tok, mask, index)[0][:, 0],))
    return build


ADVANTAGE = Op(
    name="advantage",
    title="Mono-anchored advantage",
    what=("`mars.mono_anchored_advantage` on prompts x (G rollouts + K anchors), the rows of a "
          "group shuffled across the batch. `-int`: an int tensor of labels (TRL, plain loops); "
          "`-str`: a numpy array of uid strings (what verl passes). `noanchor`: K = 0 with "
          "singleton='raw', the work verl's functions do (they take no anchors). verl's "
          "functions get token_level_rewards [B, 1] (their cheapest case); "
          "`verl-vectorized-int` gets the int tensor, which verl uses as dense indices. "
          "`loop-*`: a dict of lists per label and torch per group, the reference "
          "implementation's style."),
    sizes=_adv_sizes,
    inputs=_adv_inputs,
    impls=[
        Impl("reference", "reference", _adv_reference(False)),
        Impl("compile-reference", "reference", _adv_reference(True), quick=False),
        Impl("mars-int", "mars", _adv_mars("int", True)),
        Impl("mars-str", "mars", _adv_mars("str", True)),
        Impl("mars-noanchor-int", "mars", _adv_mars("int", False), variant="noanchor"),
        Impl("mars-noanchor-str", "mars", _adv_mars("str", False), variant="noanchor"),
        Impl("mars-cuda-int", "mars", _adv_mars("int", True, "cuda"), devices=("cuda",)),
        Impl("mars-triton-int", "mars", _adv_mars("int", True, "triton"), devices=("cuda",)),
        Impl("loop-int", "baseline", _adv_loop("int")),
        Impl("loop-str", "baseline", _adv_loop("str")),
        Impl("verl", "peer", _adv_verl(False, "str"), variant="noanchor"),
        Impl("verl-vectorized", "peer", _adv_verl(True, "str"), variant="noanchor"),
        Impl("verl-vectorized-int", "peer", _adv_verl(True, "int"), variant="noanchor"),
    ],
    baseline=lambda device: "mars-int",
    # rewards, labels (int64), anchors, anchor labels read once; advantages written once
    bytes_moved=lambda s: (s.params["prompts"] * s.params["G"] * (4 + 8 + 4)
                           + s.params["prompts"] * s.params["K"] * (4 + 8)),
    expected=_adv_expected,
    sync_check=True,
    tolerance=lambda size: 1e-5,
)


# ---------------------------------------------------------------------------------------
# policy loss, forward + backward
# ---------------------------------------------------------------------------------------

PL_OPTS = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=1e-3, kl_type="k3",
               agg="token-mean")


def _pl_sizes(device, quick):
    shapes = [("small", 64, 1024), ("paper", 256, 4096), ("large", 1024, 8192)]
    dtypes = ["fp32", "bf16"]
    if quick:   # a smoke test: the profiler's memory pass over the reference's many ops
        shapes, dtypes = [("quick", 16, 512)], dtypes[:1]
    return [Size(f"{B}x{T} {dt}", label, dict(B=B, T=T, dtype=dt), B * T, dt)
            for dt in dtypes for label, B, T in shapes]


def _pl_inputs(size, device):
    B, T, dt = size.params["B"], size.params["T"], DTYPES[size.params["dtype"]]
    gen = _gen()
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + torch.randn(B, T, generator=gen) * 0.1
    ref = logp + torch.randn(B, T, generator=gen) * 0.1
    adv = torch.randn(B, generator=gen)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]               # right padding
    logp = torch.where(mask, logp, float("-inf"))                     # padding as a model gives it
    cast = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    return dict(logp=cast(logp), old=cast(old), adv=cast(adv), mask=mask.to(device),
                ref=cast(ref))


def _fwd_bwd(loss_fn, logp):
    x = logp.detach().clone().requires_grad_()

    def fn():
        x.grad = None
        loss = loss_fn(x)
        loss.backward()
        return loss.detach(), x.grad

    def reset():
        x.grad = None
    return Call(fn, reset)


def _pl_reference(compiled: bool):
    def build(inp, size, device):
        f = _mars().reference.policy_loss
        f = _compiled(f) if compiled else f
        return _fwd_bwd(lambda x: f(x, inp["old"], inp["adv"], inp["mask"], ref_logp=inp["ref"],
                                    **PL_OPTS).loss, inp["logp"])
    return build


def _pl_mars(backend: str):
    def build(inp, size, device):
        _need_backend(backend)
        f = _mars().loss.policy_loss
        return _fwd_bwd(lambda x: f(x, inp["old"], inp["adv"], inp["mask"], ref_logp=inp["ref"],
                                    backend=backend, **PL_OPTS).loss, inp["logp"])
    return build


def _verl_pg_loss(core, cfg, old, adv_bt, maskf, ref=None, kl_coef=0.0):
    def loss_fn(x):
        pg, _ = core.compute_policy_loss_vanilla(old, x, adv_bt, maskf, "token-mean", cfg)
        if ref is not None and kl_coef:
            pg = pg + kl_coef * core.agg_loss(core.kl_penalty(x, ref, "low_var_kl"), maskf,
                                              "token-mean")
        return pg
    return loss_fn


def _pl_verl(inp, size, device):
    core = peers.verl_core()
    B, T = inp["logp"].shape
    cfg = verl_actor_config(PL_OPTS["clip_low"], PL_OPTS["clip_high"], PL_OPTS["dual_clip"])
    adv_bt = inp["adv"][:, None].expand(B, T).contiguous()   # verl's layout, not timed
    maskf = inp["mask"].to(inp["logp"].dtype)
    # verl multiplies by the mask: -inf padding would give NaN, so it gets zeros
    logp = torch.where(inp["mask"], inp["logp"], 0.0)
    return _fwd_bwd(_verl_pg_loss(core, cfg, inp["old"], adv_bt, maskf, inp["ref"],
                                  PL_OPTS["kl_coef"]), logp)


def _pl_bytes(s):
    e = DTYPES[s.params["dtype"]].itemsize
    B, T = s.params["B"], s.params["T"]
    # read logp, old_logp, ref_logp and the bool mask, write dlogp; [B] advantages
    return B * T * (4 * e + 1) + B * e


POLICY_LOSS = Op(
    name="policy_loss",
    title="Policy loss, forward + backward",
    what=("`mars.loss.policy_loss` forward + backward at B x T tokens in the paper's GRPO "
          "setting: clip 0.2 / 0.28, dual clip 3, k3 KL to a reference policy with beta 1e-3, "
          "token-mean, [B] advantages, right padding with -inf log-probs. `reference` is the "
          "eager float64 specification (`mars.reference.policy_loss`); `verl`: "
          "compute_policy_loss_vanilla + agg_loss(kl_penalty(..., 'low_var_kl')) on [B, T] "
          "advantages (verl's layout; the broadcast is not timed; it calls .item() for its "
          "metrics, as it does in training)."),
    sizes=_pl_sizes,
    inputs=_pl_inputs,
    impls=[
        Impl("reference", "reference", _pl_reference(False)),
        Impl("compile-reference", "reference", _pl_reference(True), quick=False),
        Impl("mars-cpu", "mars", _pl_mars("cpu"), devices=("cpu",)),
        Impl("mars-cuda", "mars", _pl_mars("cuda"), devices=("cuda",)),
        Impl("mars-triton", "mars", _pl_mars("triton"), devices=("cuda",)),
        Impl("verl", "peer", _pl_verl),
    ],
    baseline=lambda device: "mars-cpu" if device == "cpu" else "mars-cuda",
    memory=True,
    bytes_moved=_pl_bytes,
    sync_check=True,
    tolerance=lambda size: 1e-4 if size.params["dtype"] == "fp32" else 2e-2,
)


# ---------------------------------------------------------------------------------------
# lm head: fused loss (forward + backward) and token log-probs (forward)
# ---------------------------------------------------------------------------------------

HEAD_OPTS = dict(clip_low=0.2, clip_high=0.2, agg="token-mean")   # = Liger's "dapo", no KL


def _head_sizes(device, quick):
    if device == "cuda":
        H, V, dt = 2048, 151936, "bf16"
        shapes = [("quick", 2, 256), ("small", 8, 512), ("paper", 8, 2048), ("large", 16, 2048)]
    else:
        H, V, dt = 256, 32000, "fp32"
        shapes = [("quick", 2, 64), ("small", 1, 512), ("paper", 4, 512), ("large", 8, 512)]
    if quick:
        shapes = shapes[:1]
        if device == "cpu":
            H, V = 64, 2048
    else:
        shapes = shapes[1:]
    return [Size(f"tokens={B * T} H={H} V={V} {dt}", label, dict(B=B, T=T, H=H, V=V, dtype=dt),
                 B * T, dt) for label, B, T in shapes]


def _head_inputs(size, device, grad: bool):
    p = size.params
    B, T, H, V, dt = p["B"], p["T"], p["H"], p["V"], DTYPES[p["dtype"]]
    gen = _gen()
    hidden = torch.randn(B, T, H, generator=gen).to(device, dt)
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5).to(device, dt)
    ids = torch.randint(0, V, (B, T), generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    adv = torch.randn(B, generator=gen).to(device)
    inp = dict(hidden=hidden, weight=weight, ids=ids, mask=mask, adv=adv)
    if grad:
        # old log-probs near the current ones (ratios near 1, as in training), computed in
        # plain torch chunk by chunk (no mars kernel: a broken one must not break the inputs)
        h2, i2 = hidden.reshape(B * T, H), ids.reshape(-1)
        logp = torch.cat([torch.log_softmax(h2[j:j + 1024].float() @ weight.float().T, -1)
                          .gather(-1, i2[j:j + 1024, None])[:, 0]
                          for j in range(0, B * T, 1024)]).reshape(B, T)
        inp["old"] = logp + (torch.randn(B, T, generator=gen) * 0.05).to(device)
        hidden.requires_grad_()
        weight.requires_grad_()
    return inp


def _logits_bytes(size, copies: int) -> int:
    p = size.params
    return copies * p["B"] * p["T"] * p["V"] * 4


def _too_big(size, device, copies: int, what: str):
    """Skip a materialised-logits implementation whose fp32 [tokens, V] buffers would take
    more than half of the GPU's memory."""
    if device == "cuda":
        need = _logits_bytes(size, copies)
        total = torch.cuda.get_device_properties(0).total_memory
        if need > total / 2:
            raise Skip(f"{what} materialises [tokens, V] logits: about {need / 2**30:.0f} GiB "
                       f"of {total / 2**30:.0f} GiB")


def _grad_call(inp, run):
    """Forward + backward through the lm head; returns (loss, grad hidden, grad weight)."""
    h, w = inp["hidden"], inp["weight"]

    def reset():
        h.grad = w.grad = None

    def fn():
        reset()
        loss = run()
        loss.backward()
        return loss.detach(), h.grad, w.grad
    return Call(fn, reset)


def _fused_mars(backend: str):
    def build(inp, size, device):
        _need_backend(backend)
        f = _mars().loss.fused_linear_policy_loss
        return _grad_call(inp, lambda: f(inp["hidden"], inp["weight"], inp["ids"], inp["old"],
                                         inp["adv"], inp["mask"], backend=backend,
                                         **HEAD_OPTS).loss)
    return build


def _fused_reference(compiled: bool):
    def build(inp, size, device):
        _too_big(size, device, 5, "the reference")
        f = _mars().reference.fused_linear_policy_loss
        f = _compiled(f) if compiled else f
        return _grad_call(inp, lambda: f(inp["hidden"], inp["weight"], inp["ids"], inp["old"],
                                         inp["adv"], inp["mask"], **HEAD_OPTS).loss)
    return build


def _fused_liger(inp, size, device):
    liger = peers.liger_chunked()
    crit = liger.LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                          epsilon_low=HEAD_OPTS["clip_low"],
                                          epsilon_high=HEAD_OPTS["clip_high"],
                                          compiled=device == "cuda")
    return _grad_call(inp, lambda: crit(inp["hidden"], inp["weight"], inp["ids"], inp["mask"],
                                        inp["adv"], old_per_token_logps=inp["old"])[0])


def _cce_logp(inp, device):
    cce = peers.cce()
    h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
    B, T, H = h.shape
    impl = "cce" if device == "cuda" else "torch_compile"   # CCE's kernel is Triton (GPU)
    return lambda: -cce.linear_cross_entropy(h.reshape(B * T, H), w, ids.reshape(-1),
                                             reduction="none", impl=impl).reshape(B, T).float()


def _fused_cce(inp, size, device):
    if device == "cpu":
        _too_big(size, device, 3, "CCE's torch_compile impl")
    logp = _cce_logp(inp, device)
    pl = _mars().loss.policy_loss
    return _grad_call(inp, lambda: pl(logp(), inp["old"], inp["adv"], inp["mask"],
                                      **HEAD_OPTS).loss)


def _fused_verl(inp, size, device):
    F = peers.verl_functional()
    core = peers.verl_core()
    head = F.FusedLinearForPPO(chunk_size=512)
    B, T = inp["ids"].shape
    adv_bt = inp["adv"][:, None].expand(B, T).contiguous()
    maskf = inp["mask"].float()
    # verl always applies its dual clip (c = 3); at ratios near 1 it is never active
    cfg = verl_actor_config(HEAD_OPTS["clip_low"], HEAD_OPTS["clip_high"], 3.0)
    loss = _verl_pg_loss(core, cfg, inp["old"], adv_bt, maskf)
    return _grad_call(inp, lambda: loss(head(inp["hidden"], inp["weight"], inp["ids"])[0]))


def _head_flops(passes: int):
    return lambda s: passes * 2 * s.params["B"] * s.params["T"] * s.params["H"] * s.params["V"]


def _head_bytes(grad: bool):
    def f(s):
        p = s.params
        e = DTYPES[p["dtype"]].itemsize
        n = p["B"] * p["T"]
        # read hidden and the weight (and write their gradients); ids, logp / old_logp
        return (1 + grad) * (n * p["H"] + p["V"] * p["H"]) * e + n * (8 + 4 + 4 * grad)
    return f


def _head_tolerance(size):
    return 1e-4 if size.params["dtype"] == "fp32" else 3e-2


def _head_op(name: str, title: str, what: str, impls: list, *, grad: bool, passes: int) -> Op:
    """An op over hidden [tokens, H] and the lm-head weight [V, H] (fused loss, token
    log-probs): same sizes, inputs, peak-memory column, roofline and tolerance."""
    return Op(name=name, title=title, what=what, sizes=_head_sizes,
              inputs=lambda size, device: _head_inputs(size, device, grad=grad), impls=impls,
              baseline=lambda device: "mars", memory=True, bytes_moved=_head_bytes(grad),
              flops=_head_flops(passes), tolerance=_head_tolerance)


FUSED_LM_HEAD = _head_op(
    "fused_lm_head",
    "Fused lm-head + policy loss, forward + backward",
    ("`mars.loss.fused_linear_policy_loss`: hidden [tokens, H] and the lm-head weight "
          "[V, H] to the policy loss (clip 0.2 / 0.2, token-mean = Liger's 'dapo', no KL) "
          "with gradients for hidden and weight, never holding [tokens, V] logits. "
          "`reference`: materialised fp32 logits + `mars.reference.policy_loss`; `liger`: "
          "LigerFusedLinearGRPOLoss (torch.compile'd chunks on a GPU, eager on a CPU); "
          "`cce`: Cut Cross-Entropy's per-token -log p (its Triton kernel on a GPU; on a CPU "
          "its torch_compile impl, which materialises the logits: a stand-in, not CCE's "
          "algorithm) + `mars.loss.policy_loss`; `verl`: verl's FusedLinearForPPO (chunked "
          "torch; it also computes the entropy) + compute_policy_loss_vanilla. Peak memory: "
          "the torch allocator's peak above the level before the call (inputs excluded, "
          "gradients included)."),
    [
        Impl("reference", "reference", _fused_reference(False)),
        Impl("compile-reference", "reference", _fused_reference(True), quick=False),
        Impl("mars", "mars", _fused_mars("auto")),
        Impl("mars-torch-epilogue", "mars", _fused_mars("cuda"), devices=("cuda",)),
        Impl("liger", "peer", _fused_liger),
        Impl("cce", "peer", _fused_cce, quick=False),
        Impl("verl", "peer", _fused_verl),
    ],
    grad=True, passes=3,
)


def _tlp_mars(backend: str):
    def build(inp, size, device):
        _need_backend(backend)
        f = _mars().loss.token_logprobs
        return Call(lambda: (f(inp["hidden"], inp["weight"], inp["ids"], mask=inp["mask"],
                               backend=backend),))
    return build


def _tlp_reference(compiled: bool):
    def build(inp, size, device):
        _too_big(size, device, 2, "the reference")
        f = _mars().reference.token_logprobs
        f = _compiled(f) if compiled else f

        def fn():
            with torch.no_grad():
                return (f(inp["hidden"], inp["weight"], inp["ids"], mask=inp["mask"]),)
        return Call(fn)
    return build


def _tlp_verl(fused: bool):
    def build(inp, size, device):
        h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
        if fused:
            head = peers.verl_functional().FusedLinearForPPO(chunk_size=512)
            run = lambda: head(h, w, ids)[0]  # noqa: E731
        else:
            _too_big(size, device, 2, "verl's logprobs_from_logits")
            tf = peers.load("verl.utils.torch_functional", "verl")
            run = lambda: tf.logprobs_from_logits(torch.nn.functional.linear(h, w), ids)  # noqa: E731

        def fn():
            with torch.no_grad():
                return (run().float(),)
        return Call(fn)
    return build


def _tlp_liger(inp, size, device):
    if device != "cuda":
        raise Skip("Liger's fused linear cross-entropy is a Triton kernel: needs a GPU")
    lt = peers.liger_transformers()
    crit = lt.LigerFusedLinearCrossEntropyLoss(reduction="none")
    h, w, ids = inp["hidden"], inp["weight"], inp["ids"]
    B, T, H = h.shape

    def fn():
        with torch.no_grad():
            return (-crit(w, h.reshape(B * T, H), ids.reshape(-1)).reshape(B, T).float(),)
    return Call(fn)


def _tlp_cce(inp, size, device):
    if device == "cpu":
        _too_big(size, device, 2, "CCE's torch_compile impl")
    logp = _cce_logp(inp, device)

    def fn():
        with torch.no_grad():
            return (logp(),)
    return Call(fn)


TOKEN_LOGPROBS = _head_op(
    "token_logprobs",
    "Token log-probs through the lm head (no gradient)",
    ("`mars.loss.token_logprobs`: log p of the chosen ids from hidden [tokens, H] and the "
          "lm-head weight [V, H], chunked, no gradient (old / reference log-probs). "
          "`reference`: materialised fp32 logits; `verl`: F.linear + verl's "
          "logprobs_from_logits (materialised); `verl-fused`: verl's FusedLinearForPPO "
          "(chunked; it also computes the entropy); `liger`: LigerFusedLinearCrossEntropyLoss "
          "(reduction='none', a Triton kernel); `cce`: Cut Cross-Entropy's "
          "linear_cross_entropy (reduction='none')."),
    [
        Impl("reference", "reference", _tlp_reference(False)),
        Impl("compile-reference", "reference", _tlp_reference(True), quick=False),
        Impl("mars", "mars", _tlp_mars("auto")),
        Impl("mars-torch-epilogue", "mars", _tlp_mars("cuda"), devices=("cuda",)),
        Impl("verl", "peer", _tlp_verl(False)),
        Impl("verl-fused", "peer", _tlp_verl(True)),
        Impl("liger", "peer", _tlp_liger),
        Impl("cce", "peer", _tlp_cce, quick=False),
    ],
    grad=False, passes=1,
)

OPS: dict[str, Op] = {op.name: op for op in (ADVANTAGE, POLICY_LOSS, FUSED_LM_HEAD, TOKEN_LOGPROBS)}


def get_op(name: str) -> Op:
    if name not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {name!r}")
    return OPS[name]


def get_size(op: Op, name: str, device: str) -> Size:
    for quick in (False, True):
        for s in op.sizes(device, quick):
            if s.name == name:
                return s
    raise ValueError(f"size must be one of {[s.name for s in op.sizes(device, False)]} "
                     f"for {op.name} on {device}, got {name!r}")


def get_impl(op: Op, name: str) -> Impl:
    for i in op.impls:
        if i.name == name:
            return i
    raise ValueError(f"impl must be one of {[i.name for i in op.impls]} for {op.name}, "
                     f"got {name!r}")


def build(op_name: str, size_name: str, impl_name: str, device: str):
    """One case, ready to time: (Call, Size, inputs). Raises Skip where it cannot run
    (bench/test_bench_*.py turn that into pytest.skip)."""
    op = get_op(op_name)
    size = get_size(op, size_name, device)
    impl = get_impl(op, impl_name)
    if device not in impl.devices:
        raise Skip(f"{impl_name} runs on {', '.join(impl.devices)} only")
    inputs = op.inputs(size, device)
    return impl.build(inputs, size, device), size, inputs
