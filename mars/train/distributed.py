"""Data parallel ``mars train``: the building blocks (docs/distributed.md).

    torchrun --nproc_per_node N -m mars train ...      # DDP (default); dist.strategy=fsdp2

Only collectives, model wrapping and per-rank RNG live here; the trainer's phases use them
(nothing here imports the trainer). Each rank owns a disjoint slice of the step's prompts
(:func:`shard_prompts`) with all of their rollouts and anchors, so the advantage (a
per-prompt statistic) needs no gather. The loss of every micro-batch is normalised by the
*global* token / sequence counts (:func:`global_counts`) and multiplied by the world size
(:func:`loss_multiplier`), because DDP and FSDP2 average the ranks' gradients: the averaged
gradient is then exactly the gradient of one big batch (``update.accumulate_gradients``).
Metrics are reduced across ranks before rank 0 logs them (``metrics.reduce_metrics``); each
rank checkpoints its own RNG state (:func:`save_rng_state`: ``rng_state_rank{r}.pt``).

Without torchrun's environment (``WORLD_SIZE`` unset) everything here is the identity:
one process, no process group, the same numbers as the single-process trainer.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "current", "shutdown", "device_kind", "shard_prompts", "global_counts",
           "all_reduce_numbers", "ResponseModel", "wrap_model", "unwrap", "is_wrapped", "response_forward",
           "no_sync", "loss_multiplier",
           "broadcast_object", "all_gather_objects", "rank_seed", "rng_file", "save_rng_state", "load_rng_state",
           "replica_max_diff", "full_state_dict", "sync_generation_copy", "gather_rng_files", "union_sets",
           "any_rank", "agree_signal", "padding_row", "load_sharded_weights", "FullOptimizerState", "STRATEGIES"]

STRATEGIES = ("ddp", "fsdp2")
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# =============================================================================== process group
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands. ``device``: the torch.device this rank computes on (the
    tensors of the collectives live there: NCCL needs CUDA tensors). ``backend``: "gloo",
    "nccl", or None for a single process without a process group."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group with more than one rank exists."""
        return self.world_size > 1


_OWN_GROUP = False  # init_distributed created the current process group (shutdown destroys only that one)


def _env_int(name: str, env) -> int:
    raw = env.get(name)
    if raw is None:
        raise ValueError(f"{name} is not set, but WORLD_SIZE={env.get('WORLD_SIZE')!r} is: run under torchrun "
                         f"(python -m torch.distributed.run), which sets {', '.join(_TORCHRUN_ENV)}")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def init_distributed(backend: str | None = None, device_kind: str = "auto", *, timeout_s: float = 1800.0,
                     env=None) -> DistInfo:
    """Join torchrun's process group (``env://``: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) and return this rank's :class:`DistInfo`.

    device_kind: "cpu", "cuda" (rank r on cuda:LOCAL_RANK, ``torch.cuda.set_device``) or
    "auto" (cuda when available). backend: None picks "nccl" on CUDA and "gloo" on CPU.
    timeout_s: how long a collective may wait for a slow rank before it raises.
    With ``WORLD_SIZE`` unset (or 1 without a group) nothing is initialised: rank 0 of 1.
    Calling it again returns the existing group's info. Raises ValueError naming a missing
    or malformed variable, a rank outside [0, WORLD_SIZE), an unknown device_kind, or
    "cuda" without a GPU."""
    env = os.environ if env is None else env
    if device_kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device_kind must be 'auto', 'cpu' or 'cuda', got {device_kind!r}")
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device_kind='cuda' but torch.cuda.is_available() is False")
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if dist.is_available() and dist.is_initialized():
        return current()
    if env.get("WORLD_SIZE") is None:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    world, rank, local = _env_int("WORLD_SIZE", env), _env_int("RANK", env), _env_int("LOCAL_RANK", env)
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world})")
    if world == 1:
        device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        return DistInfo(0, 1, local, device, None)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise ValueError(f"{name} is not set (torchrun sets it; WORLD_SIZE={world})")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
        device = torch.device(f"cuda:{local}")
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    kw = {"device_id": device} if backend == "nccl" else {}
    global _OWN_GROUP
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
                            **kw)
    _OWN_GROUP = True
    return DistInfo(rank, world, local, device, backend)


def device_kind(name: str) -> str:
    """``init_distributed``'s device_kind for a ``model.device`` value: "cpu", "cuda" (any
    "cuda" / "cuda:N": under torchrun rank r uses cuda:LOCAL_RANK) or "auto"."""
    return "auto" if name == "auto" else "cuda" if name.startswith("cuda") else "cpu"


def current() -> DistInfo:
    """This process's :class:`DistInfo` from the initialised process group (rank 0 of 1
    when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    backend = dist.get_backend()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device, backend)


def shutdown(barrier: bool = False) -> None:
    """Leave the process group ``init_distributed`` created (a no-op without one; a group
    someone else created, e.g. an in-process vLLM's, is left to its owner: destroying it
    here made vLLM's own teardown fail with "Invalid process group specified").
    Garbage-collects first: a DDP module left in a reference cycle holds the group's C++ object, and freed only at interpreter
    exit its gloo threads can abort the process ("terminate called without an active
    exception", seen once at the end of a finished 2-process run). barrier: wait for every
    rank first (the end of a successful run; not after an error, where a rank may be gone)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False


# =============================================================================== data
def shard_prompts(prompts: Sequence, info: DistInfo | None = None) -> list:
    """This rank's contiguous slice of the step's prompts: ``prompts[r*k:(r+1)*k]``,
    k = len / world_size (TRL's ``process_slice``). Every rank draws the same global list
    (so the data cursor agrees everywhere) and generates, scores and trains only its
    slice; a prompt's rollouts and anchors all stay on the rank that owns the prompt.
    Raises ValueError when len(prompts) is not a multiple of the world size (no padding:
    a duplicated prompt would count twice in the gradient)."""
    info = info or current()
    n, w = len(prompts), info.world_size
    if n % w:
        raise ValueError(f"{n} prompts cannot be split evenly over {w} ranks: optim.prompts_per_step must be a "
                         f"multiple of the number of processes (e.g. {max(w, n - n % w)} or {n + w - n % w})")
    k = n // w
    return list(prompts[info.rank * k:(info.rank + 1) * k])


# =============================================================================== collectives
def all_reduce_numbers(values: Sequence[float], op: str = "sum", info: DistInfo | None = None) -> list[float]:
    """Element-wise all-reduce of a few numbers ("sum", "max", "min") in float64 on the
    rank's device; one collective for the whole list. The identity for one process."""
    info = info or current()
    values = [float(v) for v in values]
    if not info.distributed:
        return values
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {', '.join(ops)}, got {op!r}")
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, ops[op])
    return t.tolist()


def global_counts(num_tokens: int, num_seqs: int, info: DistInfo | None = None) -> tuple[int, int]:
    """(sum over ranks of num_tokens, sum over ranks of num_seqs): the normalisers of the
    whole data-parallel mini-batch (valid response tokens; rows with at least one). Exact
    integers (float64 holds them exactly up to 2**53)."""
    t, s = all_reduce_numbers([num_tokens, num_seqs], "sum", info)
    return int(round(t)), int(round(s))


def broadcast_object(obj: Any, info: DistInfo | None = None, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; e.g. the resume step or a data
    cursor read from a checkpoint by rank 0)."""
    info = info or current()
    if not info.distributed:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=info.device if info.backend == "nccl" else None)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo | None = None) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    info = info or current()
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def union_sets(items: set, info: DistInfo | None = None) -> set:
    """The union over ranks of ``items`` (e.g. every rank's informative groups, so that
    dynamic sampling keeps the same groups, in the same draw order, on every rank)."""
    out = set()
    for part in all_gather_objects(set(items), info):
        out |= part
    return out


def padding_row(rows: Sequence, info: DistInfo | None = None):
    """The ``dummy`` of ``update.accumulate_gradients`` (a row a padding micro-batch puts
    through the model with advantage 0 and loss times 0): this rank's first trained row,
    else (a rank whose groups dynamic sampling dropped, or whose prompts were all too
    long) the first trained row of the lowest rank that has one, broadcast as a Rollout
    of its prompt and completion only; None when no rank has a row (then no rank trains).
    ``rows``: this rank's trained rollouts. Collective (an all-gather of one flag, plus a
    broadcast when some rank has none); for one process: ``rows[0]`` or None."""
    info = info or current()
    mine = next(iter(rows), None)
    if not info.distributed:
        return mine
    have = all_gather_objects(mine is not None, info)
    if all(have):
        return mine
    if not any(have):
        return None
    src = have.index(True)
    box = None
    if info.rank == src:
        box = type(mine)(mine.group, mine.uid, None, mine.prompt, mine.completion)  # a Rollout
    got = broadcast_object(box, info, src=src)
    return mine if mine is not None else got


def any_rank(flag: bool, info: DistInfo | None = None) -> bool:
    """True on every rank when ``flag`` is true on one (a rank without rows must still take
    part in the update when another has some)."""
    return bool(all_reduce_numbers([1.0 if flag else 0.0], "max", info)[0])


def agree_signal(signum: int | None, info: DistInfo | None = None) -> int | None:
    """The stop signal as every rank sees it: the largest signal number any rank received
    (None: none). torchrun forwards SIGINT / SIGTERM to every worker, but not at the same
    instant; without agreeing, one rank would checkpoint and stop while another enters the
    next step's collectives and waits for it until the timeout."""
    v = int(all_reduce_numbers([float(signum or 0)], "max", info)[0])
    return v or None


# =============================================================================== model
class ResponseModel(torch.nn.Module):
    """The trainer's forward as a module, so DDP / FSDP2 see it: ``forward(inputs, T)`` ->
    ``mars.hf_model.LMHeadInputs`` of the last T positions (hidden [B, T, H], lm-head
    weight [V, H] and bias, response ids [B, T], mask). The trainer never calls the HF
    model's own forward (it runs the base model and reads the head's weight, so the fused
    loss never builds logits); the head weight and bias are returned as views, so they are
    part of the forward's autograd graph (DDP's unused-parameter search and FSDP2's root
    all-gather both need that). ``policy``: the wrapped HF model."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, inputs: dict, response_length: int):
        from mars.hf_model import LMHeadInputs

        from .batch import response_inputs

        x = response_inputs(self.policy, inputs, response_length)
        return LMHeadInputs(x.hidden, x.weight.view_as(x.weight),
                            None if x.bias is None else x.bias.view_as(x.bias), x.ids, x.mask)


def wrap_model(model: torch.nn.Module, info: DistInfo | None = None, strategy: str = "ddp", *,
               find_unused_parameters: bool = True, shard_classes: Sequence[str] | None = None) -> torch.nn.Module:
    """The HF policy ready for data-parallel training; ``model`` itself for one process.

    strategy "ddp": ``DistributedDataParallel(ResponseModel(model))`` (replicas; rank 0's
    weights and buffers broadcast at construction; no buffer broadcast in forward
    (``forward_sync_buffers=False``, before torch 2.14 ``broadcast_buffers=False``): the rotary buffers are
    constants and a per-forward broadcast would make every forward a collective).
    ``find_unused_parameters=True`` (default) is needed whenever a micro-batch may leave
    parameters without a gradient: a VLM's vision tower on text-only prompts. Without it
    DDP silently skips the all-reduce of the step where that happens and fails at the next
    (tested). With images in every micro-batch it may be set False (one graph traversal
    per forward saved).

    strategy "fsdp2": ``torch.distributed.fsdp.fully_shard`` on every module whose class
    is in ``shard_classes`` (default: the model's ``_no_split_modules``, the decoder layers
    and vision blocks), then on the ``ResponseModel`` root (embeddings, lm head, norms).
    Parameters become sharded DTensors: the HF model can no longer run a plain forward
    (generation and old log-probs go through :func:`response_forward` with every rank
    taking part, or a gathered copy: :func:`full_state_dict`).

    Call it after the model is on ``info.device`` and before building the optimizer (for
    FSDP2 the optimizer must see the sharded parameters). Raises ValueError for an unknown
    strategy."""
    info = info or current()
    if strategy not in STRATEGIES:
        raise ValueError(f"dist.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not info.distributed:
        return model
    root = ResponseModel(model)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else {"broadcast_buffers": False}  # torch 2.14 renamed it (buffers still synced at init)
        return DDP(root, device_ids=ids, find_unused_parameters=find_unused_parameters, **kw)
    from torch.distributed.fsdp import fully_shard

    names = set(shard_classes if shard_classes is not None else (getattr(model, "_no_split_modules", None) or ()))
    for m in list(model.modules()):
        if type(m).__name__ in names:
            fully_shard(m)
    fully_shard(root)
    return root


def is_wrapped(model) -> bool:
    """True for what :func:`wrap_model` returns in a process group (DDP or an FSDP2 root)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return isinstance(model, DDP) or isinstance(model, ResponseModel)


def unwrap(model):
    """The HF model inside a wrapped model (``save_pretrained``, ``generate``,
    ``engine.update_weights``); ``model`` itself when it is not wrapped. Under FSDP2 its
    parameters are shards: gather them with :func:`full_state_dict` first."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        model = model.module
    return model.policy if isinstance(model, ResponseModel) else model


def response_forward(model, inputs: dict, response_length: int):
    """``LMHeadInputs`` of the response positions: through the wrapper (DDP hooks, FSDP2
    all-gathers) when ``model`` is wrapped, else ``mars.train.batch.response_inputs``.
    What ``update.micro_batch_loss`` calls (docs/distributed.md)."""
    if is_wrapped(model):
        return model(inputs, response_length)
    from .batch import response_inputs

    return response_inputs(model, inputs, response_length)


@contextlib.contextmanager
def no_sync(model, enabled: bool = True):
    """Accumulate gradients locally without communicating (all but the last micro-batch
    of a mini-batch): DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync(False)``; a no-op
    for a plain model or enabled=False."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not enabled:
        yield
    elif isinstance(model, DDP):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def loss_multiplier(model, info: DistInfo | None = None) -> float:
    """The factor on every micro-batch loss before backward: world_size for a wrapped
    model (DDP divides each bucket by world_size before its SUM all-reduce, FSDP2
    reduce-scatters with AVG), so that with the global normalisers the reduced gradient is
    sum over ranks of d(local loss) = d(whole-batch loss); 1 otherwise. A power of two
    (2, 4, 8 ranks) scales every float exactly."""
    info = info or current()
    return float(info.world_size) if is_wrapped(model) else 1.0


# =============================================================================== RNG, resume
def rank_seed(seed: int, info: DistInfo | None = None) -> int:
    """The seed of rank r's sampling RNG: ``seed`` on rank 0 (a one-process run draws what
    it drew before), ``seed + 1_000_003 * r`` elsewhere, so ranks sample different
    responses. Weights must *not* use it (every rank builds the same model)."""
    info = info or current()
    return int(seed) + 1_000_003 * info.rank


def rng_file(directory: str, info: DistInfo | None = None) -> str:
    """``directory/rng_state_rank{r}.pt``."""
    info = info or current()
    return os.path.join(directory, f"rng_state_rank{info.rank}.pt")


def _rng_payload(info: DistInfo, generators: dict | None) -> dict:
    from .checkpoint import rng_state

    return {"world_size": info.world_size, "rank": info.rank, "state": rng_state(generators)}


def gather_rng_files(info: DistInfo | None = None, generators: dict | None = None) -> dict | None:
    """On rank 0: {``rng_state_rank{r}.pt``: rank r's RNG payload} of every rank, to be
    written into a checkpoint with its other files (what :func:`load_rng_state` reads);
    None on the other ranks. Collective: every rank calls it (CPU tensors travel)."""
    info = info or current()
    parts = all_gather_objects(_rng_payload(info, generators), info)
    if not info.is_main:
        return None
    return {f"rng_state_rank{p['rank']}.pt": p for p in parts}


def save_rng_state(directory: str, info: DistInfo | None = None, generators: dict | None = None) -> str:
    """Write this rank's RNG state (``checkpoint.rng_state``: torch CPU and CUDA, Python,
    numpy, and ``generators`` {name: torch.Generator}) to :func:`rng_file` plus the world
    size; every rank calls it. Returns the path."""
    info = info or current()
    os.makedirs(directory, exist_ok=True)
    path = rng_file(directory, info)
    tmp = path + ".tmp"
    torch.save(_rng_payload(info, generators), tmp)
    os.replace(tmp, path)
    return path


def load_rng_state(directory: str, info: DistInfo | None = None, generators: dict | None = None) -> None:
    """Restore what :func:`save_rng_state` wrote for this rank. Raises ValueError when the
    file is missing or was written by a run with another world size (resuming an
    N-process run needs N processes: the per-rank streams cannot be re-split)."""
    from .checkpoint import set_rng_state

    info = info or current()
    path = rng_file(directory, info)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the checkpoint was not written by a run with rank {info.rank} "
                         f"(resume with the checkpoint's number of processes)")
    saved = torch.load(path, weights_only=True)
    if saved["world_size"] != info.world_size:
        raise ValueError(f"{path} was written by a {saved['world_size']}-process run; this run has "
                         f"{info.world_size} processes: resume with --nproc_per_node {saved['world_size']}")
    set_rng_state(saved["state"], generators)


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model, info: DistInfo | None = None) -> dict:
    """The HF model's full (unsharded) state dict, on the CPU, on every rank: FSDP2 shards
    gathered (a collective: every rank calls it), DDP / plain weights copied. Keys are the
    HF model's own (``save_pretrained`` / ``load_state_dict`` of an unwrapped copy)."""
    inner = unwrap(model)
    return {k: _plain(v.detach()).cpu().clone() for k, v in inner.state_dict().items()}


def sync_generation_copy(model, target, info: DistInfo | None = None) -> None:
    """FSDP2: load the gathered weights of the sharded ``model`` into ``target``, the
    unsharded HF copy that generates, computes old log-probs, evaluates and is saved
    (collective). DDP and one process: nothing (``target`` is the trained module)."""
    if is_wrapped(model) and unwrap(model) is not target:
        target.load_state_dict(full_state_dict(model, info))


def load_sharded_weights(model, source) -> None:
    """FSDP2 resume: the weights of the unsharded HF model ``source`` (restored from a
    checkpoint) into the sharded training copy ``model`` (every rank holds ``source``;
    each keeps its own shards). DDP and one process: nothing (``model`` trains ``source``
    itself)."""
    if not is_wrapped(model) or unwrap(model) is source:
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = {f"policy.{k}": v for k, v in source.state_dict().items()}  # ResponseModel.policy
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


class FullOptimizerState:
    """An FSDP2 optimizer through its full (unsharded) state dict, keyed by parameter names,
    so a checkpoint holds one ``optimizer.pt`` whatever the sharding.
    ``state_dict()`` gathers every rank's shards (a collective: every rank calls it) and
    returns the whole state on rank 0, ``{}`` elsewhere; ``load_state_dict(full)``, called
    on every rank with the whole state, keeps each rank's shards of it."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


def replica_max_diff(model, info: DistInfo | None = None) -> float:
    """max |w_rank - w_rank0| over every parameter and rank (0.0 for one process): DDP
    replicas must stay identical after every optimizer step. Collective."""
    info = info or current()
    if not info.distributed:
        return 0.0
    worst = 0.0
    for p in unwrap(model).parameters():
        t = _plain(p.detach()).to(info.device).clone()
        ref = t.clone()
        dist.broadcast(ref, src=0)
        worst = max(worst, float((t - ref).abs().max()) if t.numel() else 0.0)
    return all_reduce_numbers([worst], "max", info)[0]
