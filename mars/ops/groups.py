"""Group labels -> dense indices, and the input checks every advantage backend shares.

Labels may be an int tensor, or a list / tuple / numpy array of str or int. They are
factorised once (on CPU by C++: mars::dense_labels for ints, mars::string_labels for
strings, a hash table confirmed on the strings; else bincount or `torch.unique`), never
by a Python loop over rows, and always exactly: labels are compared as
the values they are, never after a cast that could wrap (uint8, int32, uint64) or strip
(numpy drops trailing "\\0" from strings). Labels that no fast dtype holds exactly (ints
beyond int64, strings ending in "\\0") take an exact, slower path over Python objects.
Anchors are matched to their group by label, never by position. The rules are written
down in docs/advantage.md.

Under `torch.compile` the checks run too: inside the graph, as the custom op
`mars::advantage_input_check`, so a compiled call refuses what an eager call refuses.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np
import torch

from . import _ext

_INT64_MAX = (1 << 63) - 1


class Groups(NamedTuple):
    """Dense layout of a batch's groups.

    index:        [B] int64, group of each rollout row, in [0, num_groups)
    anchor_index: [K] int64, group of each anchor
    num_groups:   number of distinct labels in group_ids
    labels:       the distinct labels, in the order of their dense index (tensor or ndarray)
    """
    index: torch.Tensor
    anchor_index: torch.Tensor
    num_groups: int
    labels: object


class _Labels(NamedTuple):
    """One label container, normalised. kind: "int", "str" or "none" (no labels).
    data: an int64 tensor (ints), a numpy unicode array or a _StrSeq (str), or a numpy
    object array of the exact Python values (ints beyond int64, strings ending in NUL)."""
    kind: str
    data: object


class _StrSeq(NamedTuple):
    """str labels none of which holds a NUL, as the C++ factoriser reads them
    (mars::string_labels): their UTF-8 bytes joined by NULs ("surrogatepass": injective,
    and its byte order is the code points' order) and the NULs' positions."""
    values: object          # the labels as given (list, tuple or object array)
    data: torch.Tensor      # uint8 [bytes]
    seps: torch.Tensor      # int64 [n - 1]

    def __len__(self):
        return len(self.values)

    def unicode(self) -> np.ndarray:
        """The numpy unicode array of the labels (exact: no label ends in NUL)."""
        return np.asarray(self.values, dtype=str)

    def take(self, rows: torch.Tensor) -> np.ndarray:
        """The labels of the given rows, as a numpy unicode array."""
        if isinstance(self.values, np.ndarray):
            return np.asarray(self.values[rows.numpy()], dtype=str)
        rows = rows.tolist()
        return np.asarray([self.values[i] for i in rows] if len(rows) < 2 else
                          operator.itemgetter(*rows)(self.values), dtype=str)


def _str_seq(values):
    """A _StrSeq of values if every one is a str without NUL, else None. One join checks
    both: it refuses a non-str, and n strings joined by NUL hold n - 1 NULs only if none
    holds one. UTF-8 has a 0 byte only for NUL."""
    if not len(values):
        return _StrSeq(values, torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    if not (_STRING_OP and isinstance(values[0], str)):
        return None
    try:
        joined = "\0".join(values.tolist() if isinstance(values, np.ndarray) else values)
    except TypeError:
        return None
    data = np.frombuffer(bytearray(joined.encode("utf-8", "surrogatepass")), np.uint8)
    seps = np.flatnonzero(data == 0)
    if len(seps) != len(values) - 1:
        return None
    return _StrSeq(values, torch.from_numpy(data), torch.from_numpy(seps))


def _object_array(values) -> np.ndarray:
    values = list(values)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def _is_int_type(t) -> bool:
    return (issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_)))


def _from_sequence(values, name: str) -> _Labels:
    """A list / tuple / object array of Python or numpy scalars."""
    if len(values) == 0:
        return _Labels("none", np.zeros(0, np.int64))
    if _STRING_OP and not torch.compiler.is_compiling():
        seq = _str_seq(values)
        if seq is not None:
            return _Labels("str", seq)
    kinds = set(map(type, values))
    if all(issubclass(k, str) for k in kinds):
        u = np.asarray(values, dtype=str)
        # numpy's fixed-width strings drop trailing NULs ("a\0" -> "a"): keep such labels exact
        lens = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        if (np.char.str_len(u) != lens).any():
            return _Labels("str", _object_array(map(str, values)))
        return _Labels("str", u)
    if all(_is_int_type(k) for k in kinds):
        try:  # fromiter raises, rather than wraps, for a value beyond int64
            return _Labels("int", torch.from_numpy(np.fromiter(values, np.int64, len(values))))
        except OverflowError:
            return _Labels("int", _object_array(map(int, values)))
    names = sorted({k.__name__ for k in kinds})
    if any(issubclass(k, (bytes, bytearray, np.bytes_)) for k in kinds):
        raise ValueError(f"{name} holds bytes labels ({names}); decode them to str first")
    if len(kinds) > 1 and any(issubclass(k, str) for k in kinds):
        raise ValueError(f"{name} mixes label types {names}; use all str or all int "
                         "(\"1\" and 1 are different labels)")
    raise ValueError(f"{name} must hold integer or string labels, got {names}")


def _as_labels(labels, name: str) -> _Labels:
    """Normalises one label container; raises ValueError naming `name`."""
    if isinstance(labels, torch.Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer or string labels, got a {labels.dtype} tensor")
        if labels.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
        if labels.dtype == torch.uint64:  # values >= 2**63 have no int64: compare them exactly
            if torch.compiler.is_compiling():
                raise ValueError(f"{name}: uint64 labels are not supported under torch.compile; "
                                 "pass int64 labels")
            if labels.numel() and bool((labels.view(torch.int64) < 0).any()):
                return _Labels("int", labels.cpu().numpy().astype(object))
            return _Labels("int", labels.view(torch.int64))
        return _Labels("int", labels if labels.dtype == torch.int64 else labels.long())
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of labels, got a single {type(labels).__name__}")
    arr = labels if isinstance(labels, np.ndarray) else None
    if arr is None:
        if not isinstance(labels, (list, tuple)):
            labels = np.asarray(labels)
            arr = labels if labels.dtype != object else None
        if arr is None:
            if any(isinstance(v, (list, tuple, np.ndarray, torch.Tensor)) for v in labels[:1]):
                raise ValueError(f"{name} must be 1-D, got nested sequences")
            return _from_sequence(labels, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return _Labels("none", np.zeros(0, np.int64))
    k = arr.dtype.kind
    if k == "O":
        return _from_sequence(arr, name)
    if k == "U":
        return _Labels("str", arr)
    if k == "S":
        raise ValueError(f"{name} holds bytes labels (numpy dtype {arr.dtype}); decode them to str first")
    if k == "i":
        return _Labels("int", torch.from_numpy(arr.astype(np.int64)))
    if k == "u":
        if arr.dtype.itemsize == 8 and int(arr.max()) > _INT64_MAX:
            return _Labels("int", arr.astype(object))
        return _Labels("int", torch.from_numpy(arr.astype(np.int64)))
    raise ValueError(f"{name} must hold integer or string labels, got numpy dtype {arr.dtype}")


def _missing_anchor_error(missing: list):
    return ValueError(f"anchor_group_ids: labels {missing[:10]} do not occur in group_ids "
                      "(every anchor needs its group's rollouts)")


def _factorize_tensor(ids: torch.Tensor, aids: torch.Tensor, dense_labels=None) -> Groups:
    """Int64 tensor labels on one device. When their range is at most a few times the batch
    (the usual case: prompt indices), a bincount replaces torch.unique's sort (~10x faster
    on CPU); both give dense indices in ascending label order. `dense_labels`, if given, is
    an op doing the same in one call: (labels, anchor_labels) -> (index, anchor_index with
    -1 for an absent label, distinct labels). Under torch.compile an absent anchor gets
    index -1 and `mars::advantage_input_check` raises."""
    compiling = torch.compiler.is_compiling()
    if dense_labels is not None and not compiling:
        index, aindex, uniq = dense_labels(ids, aids)
        if aids.numel() and bool((aindex < 0).any()):
            raise _missing_anchor_error(aids[aindex < 0].unique().tolist())
        return Groups(index, aindex, uniq.numel(), uniq)
    if not compiling and ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if hi - lo <= 4 * ids.numel() + 1024:
            present = torch.bincount(ids - lo, minlength=hi - lo + 1) > 0
            dense = torch.cumsum(present, 0) - 1
            if aids.numel():
                inside = (aids >= lo) & (aids <= hi)  # compared before subtracting: no overflow
                off = torch.where(inside, aids - lo, 0)
                ok = inside & present[off]
                if not bool(ok.all()):
                    raise _missing_anchor_error(aids[~ok].unique().tolist())
            else:
                off = aids
            uniq = present.nonzero().flatten() + lo
            return Groups(dense[ids - lo], dense[off], int(uniq.numel()), uniq)
    uniq, index = torch.unique(ids, sorted=True, return_inverse=True)
    if compiling:
        pos = torch.searchsorted(uniq, aids).clamp_(max=max(uniq.numel() - 1, 0))
        aindex = torch.where(uniq[pos] == aids, pos, -1) if aids.numel() else pos
        return Groups(index.long(), aindex.long(), uniq.numel(), uniq)
    aindex = torch.searchsorted(uniq, aids)
    found = aindex < uniq.numel()
    found[found.clone()] = uniq[aindex[found]] == aids[found]
    if not bool(found.all()):
        raise _missing_anchor_error(aids[~found].unique().tolist())
    return Groups(index.long(), aindex.long(), uniq.numel(), uniq)


def _factorize_objects(ids: np.ndarray, aids: np.ndarray, device) -> Groups:
    """Exact path over Python objects (ints beyond int64, strings ending in NUL): numpy's
    unique and searchsorted compare the objects themselves."""
    uniq, index = np.unique(ids, return_inverse=True)
    aindex = np.searchsorted(uniq, aids) if len(aids) else np.zeros(0, np.int64)
    ok = aindex < len(uniq)
    ok[ok] = np.asarray(uniq[aindex[ok]] == aids[ok], dtype=bool)
    if not ok.all():
        raise _missing_anchor_error(list(dict.fromkeys(aids[~ok].tolist())))
    to = dict(device=device, dtype=torch.long)
    return Groups(torch.as_tensor(index.reshape(-1), **to), torch.as_tensor(aindex, **to),
                  len(uniq), uniq)


def _to_objects(x: _Labels) -> np.ndarray:
    if isinstance(x.data, torch.Tensor):
        return x.data.cpu().numpy().astype(object)
    if isinstance(x.data, _StrSeq):
        return x.data.unicode().astype(object)
    return x.data.astype(object)


def factorize(group_ids, anchor_group_ids, num_rows: int, num_anchors: int, device,
              dense_labels=None) -> Groups:
    """Dense group indices for rows and anchors; raises ValueError naming the bad argument.
    dense_labels: optional faster factoriser of int64 labels (see _factorize_tensor)."""
    ids = _as_labels(group_ids, "group_ids")
    if len(ids.data) != num_rows:
        raise ValueError(f"group_ids has {len(ids.data)} labels for {num_rows} rewards")
    aids = _as_labels(anchor_group_ids if anchor_group_ids is not None else [], "anchor_group_ids")
    if len(aids.data) != num_anchors:
        raise ValueError(f"anchor_group_ids has {len(aids.data)} labels for {num_anchors} anchor_rewards")
    if "none" not in (ids.kind, aids.kind) and ids.kind != aids.kind:
        raise ValueError(f"anchor_group_ids holds {aids.kind} labels but group_ids holds "
                         f"{ids.kind} labels; use the same kind (\"1\" and 1 are different labels)")
    kind = ids.kind if ids.kind != "none" else aids.kind
    exact_objects = any(isinstance(x.data, np.ndarray) and x.data.dtype == object for x in (ids, aids))
    if exact_objects:
        return _factorize_objects(_to_objects(ids), _to_objects(aids), device)
    if kind == "str":
        u = ids.data if ids.kind == "str" else np.zeros(0, dtype=str)
        a = aids.data if aids.kind == "str" else np.zeros(0, dtype=str)
        return _factorize_strings(u, a, device)
    as_long = lambda x: torch.as_tensor(x.data).to(device=device, dtype=torch.long)  # noqa: E731
    return _factorize_tensor(as_long(ids), as_long(aids), dense_labels)


def _string_codes(u: np.ndarray) -> torch.Tensor:
    """[n] int64 polynomial hash of fixed-width unicode labels: Horner's rule over the
    characters, each step vectorised over all rows (uint64 arithmetic wraps)."""
    width = u.dtype.itemsize // 4
    chars = np.ascontiguousarray(u).view(np.uint32).reshape(len(u), width)
    h, base = np.zeros(len(u), np.uint64), np.uint64(1000003)
    for j in range(width):
        h = h * base + chars[:, j]
    return torch.from_numpy(h.view(np.int64))


# --- string labels -------------------------------------------------------------------------

def has_cpu_op(name: str) -> bool:
    """Whether the loaded extension has a CPU kernel of op `name` (False where it is not
    built, or built from sources without that op)."""
    if not _ext.HAS_C:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    except RuntimeError:  # no such op
        return False


_STRING_OP = has_cpu_op("mars::string_labels")
_STRING_HASH_MASK = -1  # the C++ factoriser's hash bits (tests: 0, every label collides)


def _unicode_rows(u: np.ndarray):
    """(int32 tensor [n * width] of the code points, width) of a numpy unicode array in
    native byte order, else None."""
    width = u.dtype.itemsize // 4
    if not width or u.dtype.byteorder == (">" if np.little_endian else "<"):
        return None
    return torch.from_numpy(np.ascontiguousarray(u).view(np.int32)), width


def _factorize_strings_fast(ids, aids, device):
    """String labels by the C++ factoriser (mars::string_labels: a hash table whose every
    match is confirmed on the strings). ids and aids: numpy unicode arrays or _StrSeq;
    numpy rows are read as code points, _StrSeq as UTF-8 (converted to the rows' form where
    the two differ). None where it does not apply (no rows, byte-swapped arrays, an anchor
    holding NUL) or some anchor label is absent: the general path then decides and names it."""
    if not _STRING_OP or not len(ids) or torch.compiler.is_compiling():
        return None
    none = torch.zeros(0, dtype=torch.long)
    if isinstance(ids, np.ndarray):
        rows = _unicode_rows(ids)
        arows = _unicode_rows(aids.unicode() if isinstance(aids, _StrSeq) else aids)
        if rows is None or arows is None:
            return None
        (data, width), (adata, awidth) = rows, arows
        seps = aseps = none
    else:
        if isinstance(aids, np.ndarray):
            aids = _str_seq(aids)
            if aids is None:
                return None
        data, seps, width, adata, aseps, awidth = ids.data, ids.seps, 0, aids.data, aids.seps, 0
    index, aindex, first = torch.ops.mars.string_labels(
        data, seps, width, adata, aseps, awidth, len(ids), len(aids), _STRING_HASH_MASK)
    if len(aids) and bool((aindex < 0).any()):
        return None
    uniq = ids[first.numpy()] if isinstance(ids, np.ndarray) else ids.take(first)
    if device.type != "cpu":
        index, aindex = index.to(device), aindex.to(device)
    return Groups(index, aindex, len(uniq), uniq)


def _factorize_strings(ids, aids, device) -> Groups:
    """String labels (numpy unicode arrays or _StrSeq): the C++ factoriser where it applies
    (_factorize_strings_fast), else torch.unique of their hashes (int sort: ~1.7x faster
    than np.unique of strings), checked against the strings themselves, np.unique if two
    labels collide; groups then renumbered in sorted label order. Anchors by
    np.searchsorted."""
    fast = _factorize_strings_fast(ids, aids, device)
    if fast is not None:
        return fast
    ids, aids = (x.unicode() if isinstance(x, _StrSeq) else x for x in (ids, aids))
    u, aids = ids.astype(str, copy=False), aids.astype(str, copy=False)
    index = np.zeros(0, np.int64)
    if len(u):
        _, inv = torch.unique(_string_codes(u), return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), len(u), dtype=torch.long).scatter_reduce_(
            0, inv, torch.arange(len(u)), "amin").numpy()
        index = inv.numpy()
        if (u[first][index] == u).all():  # no hash collision
            reps = u[first]
            order = np.argsort(reps, kind="stable")
            rank = np.empty(len(reps), np.int64)
            rank[order] = np.arange(len(reps))
            uniq, index = reps[order], rank[index]
        else:
            uniq, index = np.unique(u, return_inverse=True)
    else:
        uniq = u
    aindex = np.searchsorted(uniq, aids)
    ok = aindex < len(uniq)
    ok[ok] = uniq[aindex[ok]] == aids[ok]
    if not ok.all():
        raise _missing_anchor_error(list(dict.fromkeys(aids[~ok].tolist())))
    to = dict(device=device, dtype=torch.long)
    return Groups(torch.as_tensor(index.reshape(-1), **to), torch.as_tensor(aindex, **to),
                  len(uniq), uniq)


_MAX_REWARD = 1e150  # |value| above it: squared deviations would overflow float64


def _check_values(x: torch.Tensor, name: str) -> None:
    """Finite values whose squared spread float64 holds. One reduction (aminmax; NaN and
    inf propagate into it) and one host sync decide; only then look at every value."""
    if not x.numel():
        return
    lo, hi = torch.aminmax(x)
    lo, hi = torch.stack([lo, hi]).double().tolist()
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= _MAX_REWARD:
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name} has non-finite values at rows {rows[:10]}"
                         f"{' ...' if len(rows) > 10 else ''} (values {x[rows[:3]].tolist()})")
    rows = (x.abs() > _MAX_REWARD).nonzero().flatten().tolist()
    raise ValueError(f"{name} has values beyond +-{_MAX_REWARD:g} at rows {rows[:10]} (values "
                     f"{x[rows[:3]].tolist()}); their spread overflows float64, rescale them")


def _values_flag(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on x's device, True when `_check_values` would raise (non-finite
    values or |value| > _MAX_REWARD): the same aminmax reduction, without reading it."""
    if not x.numel():
        return torch.zeros((), dtype=torch.bool, device=x.device)
    lo, hi = torch.aminmax(x)
    return ~(torch.isfinite(lo) & torch.isfinite(hi) & (torch.maximum(-lo, hi) <= _MAX_REWARD))


def check_rewards(x, name: str, device=None, read_values=True) -> torch.Tensor:
    """1-D float tensor of finite rewards (lists and numpy arrays are converted). Under
    torch.compile the finiteness check is left to `mars::advantage_input_check`;
    read_values=False leaves it to the caller (the one-read path: `_values_flag`)."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64) if not np.isscalar(x) else x,
                                device=device)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numbers, got {type(x).__name__} ({exc})") from None
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one reward per rollout), got shape {tuple(x.shape)}")
    if x.dtype.is_complex:
        raise ValueError(f"{name} must be real, got {x.dtype}")
    if not x.dtype.is_floating_point:
        x = x.double() if x.dtype == torch.int64 else x.float()  # int64 exactly, as float64 holds it
    if read_values and not torch.compiler.is_compiling():
        _check_values(x, name)
    return x


@torch.library.custom_op("mars::advantage_input_check", mutates_args=())
def advantage_input_check(rewards: torch.Tensor, anchor_rewards: torch.Tensor,
                          anchor_labels: torch.Tensor, anchor_index: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks of an eager call, run inside a compiled graph: finite rewards and anchor
    rewards, every anchor label found (anchor_index >= 0). Returns copies of rewards,
    anchor_rewards and anchor_index, which the kernel then reads: the check can be neither
    dropped from the graph nor ordered after a use of its inputs."""
    for x, name in ((rewards, "rewards"), (anchor_rewards, "anchor_rewards")):
        _check_values(x, name)
    if anchor_index.numel() and bool((anchor_index < 0).any()):
        raise _missing_anchor_error(anchor_labels[anchor_index < 0].unique().tolist())
    return rewards.clone(), anchor_rewards.clone(), anchor_index.clone()


@advantage_input_check.register_fake
def _advantage_input_check_fake(rewards, anchor_rewards, anchor_labels, anchor_index):
    return torch.empty_like(rewards), torch.empty_like(anchor_rewards), torch.empty_like(anchor_index)


def check_options(singleton: str, eps: float) -> bool:
    """Validates the keyword options; returns singleton == 'raw'."""
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return singleton == "raw"


# --- one host read: GPU int tensor labels ------------------------------------------------
#
# On a GPU every value the host reads is a sync (the general path has about eight: the two
# finiteness checks, the label range, the anchor check, nonzero, bincount). For int tensor
# labels on the rewards' device this path computes everything on the device (a stable sort
# of the labels, dense indices by a cumulative sum over the group starts, anchors found by
# searchsorted) and reads one small tensor: the number of groups (needed for the outputs'
# shapes) and the three error flags. It gives bit for bit the Groups of the general path.
# It runs on CUDA by default; _FORCE_ONE_READ runs it on CPU tensors too (tests).

_FORCE_ONE_READ = False


def _int_label_tensor(t, device) -> bool:
    return (isinstance(t, torch.Tensor) and t.device == device and t.dim() == 1
            and not (t.dtype.is_floating_point or t.dtype.is_complex)
            and t.dtype not in (torch.bool, torch.uint64))


def _one_read_eligible(rewards, group_ids, anchor_rewards, anchor_group_ids) -> bool:
    if torch.compiler.is_compiling() or not isinstance(rewards, torch.Tensor):
        return False
    device = rewards.device
    if device.type == "cpu" and not _FORCE_ONE_READ:
        return False  # CPU: the C++ factoriser (mars::dense_labels) is faster; no syncs there
    if not _int_label_tensor(group_ids, device):
        return False
    if anchor_rewards is None and anchor_group_ids is None:
        return True
    return (isinstance(anchor_rewards, torch.Tensor) and anchor_rewards.device == device
            and _int_label_tensor(anchor_group_ids, device))


def _read_host(t: torch.Tensor) -> list:
    """The one host read of the one-read path (a function, so tests can count it)."""
    return t.tolist()


def _factorize_on_device(ids: torch.Tensor, aids: torch.Tensor):
    """int64 labels -> (index [B], anchor_index [K], sorted labels [B], dense index of the
    sorted labels [B], G (0-dim), missing (0-dim bool: some anchor label is absent),
    found [K]), all on the labels' device, with no host read. Dense indices in ascending
    label order, as torch.unique(sorted=True, return_inverse=True) numbers them."""
    B, device = ids.numel(), ids.device
    sorted_ids, order = torch.sort(ids, stable=True)
    start = torch.ones(B, dtype=torch.bool, device=device)
    start[1:] = sorted_ids[1:] != sorted_ids[:-1]
    dense_sorted = torch.cumsum(start, 0) - 1
    index = torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)
    G = dense_sorted[-1] + 1
    # leftmost position of each anchor label among the sorted labels; found if equal there
    pos = torch.searchsorted(sorted_ids, aids).clamp_(max=B - 1)
    found = sorted_ids.index_select(0, pos) == aids
    aindex = dense_sorted.index_select(0, pos)
    return index, aindex, sorted_ids, dense_sorted, G, ~found.all(), found


def _prepare_one_read(rewards, group_ids, anchor_rewards, anchor_group_ids):
    """`prepare` for int tensor labels on the rewards' device with one host read; the same
    checks in the same order, the same errors, the same results."""
    rewards = check_rewards(rewards, "rewards", read_values=False)
    device = rewards.device
    if anchor_rewards is None:
        anchor_rewards = rewards.new_zeros(0)
        aids = torch.zeros(0, dtype=torch.long, device=device)
    else:
        anchor_rewards = check_rewards(anchor_rewards, "anchor_rewards", read_values=False)
        if anchor_group_ids is None and anchor_rewards.numel():
            raise ValueError("anchor_rewards given without anchor_group_ids")
        aids = anchor_group_ids.long()
    ids = group_ids.long()
    B, K, n = rewards.numel(), anchor_rewards.numel(), ids.numel()
    flags = [_values_flag(rewards), _values_flag(anchor_rewards)]
    if n:
        index, aindex, sorted_ids, dense_sorted, G, missing, found = _factorize_on_device(ids,
                                                                                        aids)
        num_groups, bad_r, bad_a, missing = _read_host(  # the one host read
            torch.stack([G] + [f.long() for f in flags + [missing]]))
    else:
        bad_r, bad_a = _read_host(torch.stack([f.long() for f in flags]))
        num_groups, missing, index, aindex = 0, aids.numel() > 0, ids, aids
    # the general path's order: reward values, anchor values, lengths, absent anchors
    if bad_r:
        _check_values(rewards, "rewards")  # raises, naming the rows and values
    if bad_a:
        _check_values(anchor_rewards, "anchor_rewards")
    if n != B:
        raise ValueError(f"group_ids has {n} labels for {B} rewards")
    if aids.numel() != K:
        raise ValueError(f"anchor_group_ids has {aids.numel()} labels for {K} anchor_rewards")
    if missing:
        raise _missing_anchor_error((aids[~found] if n else aids).unique().tolist())
    labels = (torch.empty(num_groups, dtype=torch.long, device=device)
              .scatter_(0, dense_sorted, sorted_ids) if n else ids)
    dtype = torch.promote_types(rewards.dtype, anchor_rewards.dtype)
    return (rewards.to(dtype), anchor_rewards.to(dtype),
            Groups(index, aindex, int(num_groups), labels))


def prepare(rewards, group_ids, anchor_rewards, anchor_group_ids, dense_labels=None):
    """Checked (rewards, anchor_rewards, Groups) for any backend, on rewards' device.
    dense_labels(device) -> an int-label factoriser op for that device, or None. Int tensor
    labels on a GPU take the one-read path (one host sync in all, `_prepare_one_read`)."""
    if _one_read_eligible(rewards, group_ids, anchor_rewards, anchor_group_ids):
        return _prepare_one_read(rewards, group_ids, anchor_rewards, anchor_group_ids)
    rewards = check_rewards(rewards, "rewards")
    if anchor_rewards is None:
        if anchor_group_ids is not None and len(anchor_group_ids):
            raise ValueError("anchor_group_ids given without anchor_rewards")
        anchor_rewards = rewards.new_zeros(0)
    else:
        if isinstance(anchor_rewards, torch.Tensor) and anchor_rewards.device != rewards.device:
            raise ValueError(f"anchor_rewards is on {anchor_rewards.device} but rewards is on "
                             f"{rewards.device}; put both on one device")
        anchor_rewards = check_rewards(anchor_rewards, "anchor_rewards", device=rewards.device)
        if anchor_group_ids is None and anchor_rewards.numel():
            raise ValueError("anchor_rewards given without anchor_group_ids")
    for labels, name in ((group_ids, "group_ids"), (anchor_group_ids, "anchor_group_ids")):
        if isinstance(labels, torch.Tensor) and labels.device != rewards.device:
            raise ValueError(f"{name} is on {labels.device} but rewards is on {rewards.device}; "
                             "put both on one device")
    dtype = torch.promote_types(rewards.dtype, anchor_rewards.dtype)
    groups = factorize(group_ids, anchor_group_ids, rewards.numel(), anchor_rewards.numel(),
                       rewards.device, dense_labels and dense_labels(rewards.device))
    rewards, anchor_rewards = rewards.to(dtype), anchor_rewards.to(dtype)
    if torch.compiler.is_compiling():
        alabels = torch.as_tensor(anchor_group_ids if anchor_group_ids is not None else [],
                                  device=rewards.device)
        rewards, anchor_rewards, aindex = advantage_input_check(rewards, anchor_rewards, alabels,
                                                                groups.anchor_index)
        groups = groups._replace(anchor_index=aindex)
    return rewards, anchor_rewards, groups
