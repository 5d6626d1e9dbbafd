"""Checkpoints of ``mars train``: everything a run needs to go on exactly where it was.

``OUTPUT_DIR/checkpoints/step_NNNNNN/`` holds

* the model (``save_pretrained``: config.json + safetensors) and the processor, or the
  tokenizer + image processor, files: what ``mars eval --model DIR`` and
  ``AutoModelForImageTextToText.from_pretrained`` load;
* ``optimizer.pt`` (AdamW ``state_dict``; under FSDP2 the unsharded state keyed by
  parameter names), ``scheduler.pt`` (LambdaLR ``state_dict``);
* ``rng_state.pt``: torch CPU (and CUDA) generator, Python ``random``, numpy, and the
  trainer's own ``torch.Generator`` objects (the mini-batch shuffle);
* under torchrun, ``rng_state_rank{r}.pt`` of every rank r (its own sampling streams;
  ``mars.train.distributed``), written with the other files;
* ``trainer_state.json``, written last: step, seed, data cursor, elapsed time, the config
  as run, ``resumable: true`` and the size of every file above. It is the completion
  marker: a directory without it is never loaded.

``OUTPUT_DIR/checkpoints/reference/`` (only with ``loss.kl_coef > 0``) holds the frozen
reference model once: the post-warm-start weights, shared by every checkpoint.

Writes are atomic: a checkpoint is written into ``checkpoints/.tmp-step_NNNNNN``, every
file and the directory are fsynced, the directory is renamed to ``step_NNNNNN`` (one
``rename``: it exists complete or not at all), then ``checkpoints/latest`` is replaced
(temporary file + ``os.replace``) and all but the newest ``keep_last`` checkpoints are
deleted. A run killed at any moment leaves at worst a ``.tmp-*`` directory, which is
ignored and removed by the next save. :func:`find_resumable` does not trust ``latest``: it
takes the newest ``step_*`` directory with its marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from . import faults

__all__ = ["CheckpointError", "save_checkpoint", "save_reference", "find_resumable", "read_trainer_state",
           "clear_checkpoints", "earlier_checkpoints", "unusable_checkpoints", "config_differences",
           "restore_checkpoint", "load_weights", "latest_checkpoint", "rng_state", "set_rng_state",
           "MARKER", "REFERENCE_DIR"]

MARKER = "trainer_state.json"
REFERENCE_DIR = "reference"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


# ----------------------------------------------------------------------------- RNG
def rng_state(generators: dict | None = None) -> dict:
    """Every random state a step draws from: torch CPU (+ every CUDA device when CUDA is
    available), Python ``random``, numpy's global generator, and ``generators``
    ({name: torch.Generator}). Only tensors and plain Python values (``torch.load``
    with ``weights_only=True`` reads it)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict | None = None) -> None:
    """Restore what :func:`rng_state` returned (``generators`` by name)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k not in state["generators"]:
            raise KeyError(f"generator {k!r} not saved (saved: {sorted(state['generators'])})")
        g.set_state(state["generators"][k])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- writing
def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # a file system without directory fsync
        pass


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for f in files:
            _fsync_file(os.path.join(root, f))
        _fsync_dir(root)


def _files(path: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return dict(sorted(out.items()))


def _commit(tmp: str, final: str) -> None:
    """fsync ``tmp`` and rename it to ``final`` (an existing ``final`` is replaced)."""
    _fsync_tree(tmp)
    parent = os.path.dirname(final)
    old = None
    if os.path.exists(final):
        old = os.path.join(parent, ".old-" + os.path.basename(final))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    """Atomically: a temporary file, fsync, ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def _quiet():
    """No transformers progress bars ("Writing model shards", "Loading weights") inside."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _save_model(path: str, model, tokenizer=None, processor=None, image_processor=None) -> None:
    with _quiet():
        model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    elif tokenizer is not None:
        tokenizer.save_pretrained(path)
        if image_processor is not None:
            image_processor.save_pretrained(path)


def _step_dirs(ckpt_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_DIR.fullmatch(name)
        if m and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((int(m.group(1)), os.path.join(ckpt_dir, name)))
    return sorted(out)


def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, processor=None, image_processor=None,
                    optimizer=None, scheduler=None, generators: dict | None = None, config: dict,
                    data_cursor: int, seed: int, elapsed: float = 0.0, keep_last: int = 0,
                    extra_files: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically and return its directory. With ``optimizer``
    and ``scheduler`` the checkpoint is resumable (``trainer_state.json``: ``resumable:
    true``); ``optimizer`` is a torch optimizer or its state dict already gathered (FSDP2:
    ``distributed.FullOptimizerState``, a collective the caller runs on every rank).
    ``generators``: {name: torch.Generator} saved in rng_state.pt. keep_last > 0:
    delete all but the newest keep_last ``step_*`` checkpoints afterwards. extra_files:
    {file name: object} written with ``torch.save`` into the same temporary directory
    before the marker, so the rename and the marker's file sizes cover them (a
    data-parallel run's ``rng_state_rank{r}.pt``, ``distributed.gather_rng_files``)."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    name = f"step_{step:06d}"
    for stale in os.listdir(ckpt_dir):  # left by a run killed while saving
        if stale.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(ckpt_dir, stale), ignore_errors=True)
    tmp, final = os.path.join(ckpt_dir, ".tmp-" + name), os.path.join(ckpt_dir, name)
    os.makedirs(tmp)
    _save_model(tmp, model, tokenizer, processor, image_processor)
    resumable = optimizer is not None and scheduler is not None
    if resumable:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(),
                   os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(generators), os.path.join(tmp, "rng_state.pt"))
    for fname, obj in (extra_files or {}).items():
        if os.path.basename(fname) != fname or fname in (MARKER, "rng_state.pt", "optimizer.pt", "scheduler.pt"):
            raise ValueError(f"extra_files: {fname!r} must be a plain file name of its own")
        torch.save(obj, os.path.join(tmp, fname))
    faults.kill_point("checkpoint", step)  # tests: killed with the checkpoint half written
    state = {"step": step, "seed": seed, "data_cursor": data_cursor, "elapsed": elapsed, "resumable": resumable,
             "files": _files(tmp), "config": config}
    if config.get("loss", {}).get("kl_coef", 0) > 0:
        state["reference"] = REFERENCE_DIR
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    _commit(tmp, final)
    _write_text(os.path.join(ckpt_dir, "latest"), name + "\n")
    if keep_last > 0:
        for _, old in _step_dirs(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_reference(output_dir: str, model) -> str:
    """Write the frozen reference model once (atomically) to checkpoints/reference/."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp, final = os.path.join(ckpt_dir, ".tmp-" + REFERENCE_DIR), os.path.join(ckpt_dir, REFERENCE_DIR)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with _quiet():
        model.save_pretrained(tmp)
    files = _files(tmp)
    with open(os.path.join(tmp, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f)
    _commit(tmp, final)
    return final


def earlier_checkpoints(output_dir: str) -> list[str]:
    """Names under OUTPUT_DIR/checkpoints that an earlier run left (``step_*``, ``.tmp-*``,
    ``reference``), sorted; [] for none."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(n for n in os.listdir(ckpt_dir)
                  if _STEP_DIR.fullmatch(n) or n.startswith((".tmp-", ".old-")) or n == REFERENCE_DIR)


def unusable_checkpoints(output_dir: str) -> list[str]:
    """One line per checkpoint directory of OUTPUT_DIR that cannot be resumed, saying why
    (``.tmp-*``: a save cut short; ``step_*`` without or with a bad trainer_state.json)."""
    out = []
    for name in earlier_checkpoints(output_dir):
        path = os.path.join(output_dir, "checkpoints", name)
        if name.startswith((".tmp-", ".old-")):
            out.append(f"{path}: a save that was cut short (no {MARKER})")
        elif _STEP_DIR.fullmatch(name):
            try:
                read_trainer_state(path)
            except CheckpointError as exc:
                out.append(str(exc))
    return out


def clear_checkpoints(output_dir: str) -> int:
    """Remove the checkpoints of an earlier run in OUTPUT_DIR (``step_*``, ``.tmp-*``,
    ``reference``, ``latest``), so that a new run's ``--resume`` can never pick one of
    them; returns how many ``step_*`` directories were removed."""
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return 0
    n = len(_step_dirs(ckpt_dir))
    for name in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, name)
        if _STEP_DIR.fullmatch(name) or name.startswith((".tmp-", ".old-")) or name == REFERENCE_DIR:
            shutil.rmtree(p, ignore_errors=True)
        elif name in ("latest", "latest.tmp"):
            os.remove(p)
    return n


def config_differences(saved: dict, current: dict, allowed=(), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, except keys matching
    ``allowed`` (a key, or a section prefix ending in '.')."""
    out = []
    for k in sorted(set(saved) | set(current)):
        key = prefix + k
        if any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed):
            continue
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not key.startswith("task.mix"):
            out += config_differences(a, b, allowed, key + ".")
        elif a != b:
            out.append(key)
    return out


# ----------------------------------------------------------------------------- reading
def latest_checkpoint(output_dir: str) -> str | None:
    """The directory ``checkpoints/latest`` names (None without one)."""
    p = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return os.path.join(output_dir, "checkpoints", f.read().strip())


def read_trainer_state(path: str) -> dict:
    """trainer_state.json of checkpoint directory ``path``, checked: readable JSON, every
    file it lists present with its size. CheckpointError naming the file otherwise."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{marker}: missing (not a complete checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{marker}: corrupt ({exc})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{marker}: corrupt (no step)")
    _check_files(path, state.get("files", {}))
    return state


def _check_files(path: str, files: dict) -> None:
    for rel, size in files.items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing from checkpoint {path}")
        if os.path.getsize(p) != size:
            raise CheckpointError(f"{p}: {os.path.getsize(p)} bytes, the checkpoint wrote {size} (corrupt or "
                                  "truncated)")


def find_resumable(output_dir: str) -> str | None:
    """The newest complete checkpoint directory of OUTPUT_DIR (None if there is none).
    ``step_*`` directories without trainer_state.json are skipped with a warning;
    ``.tmp-*`` directories (a save cut short) are never considered. A complete
    checkpoint that was written without optimizer state (``resumable: false``) is an
    error."""
    for step, path in reversed(_step_dirs(os.path.join(output_dir, "checkpoints"))):
        if not os.path.isfile(os.path.join(path, MARKER)):
            warnings.warn(f"skipping {path}: no {MARKER} (an incomplete checkpoint)", stacklevel=2)
            continue
        state = read_trainer_state(path)
        if not state.get("resumable"):
            raise CheckpointError(f"{os.path.join(path, MARKER)}: resumable is false (written without the "
                                  "optimizer state by an older mars train); it can be evaluated, not resumed")
        return path
    return None


def _load(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling / zip error means the same thing
        raise CheckpointError(f"{path}: corrupt, cannot be loaded ({type(exc).__name__}: {exc})") from None


def load_weights(model, path: str) -> None:
    """Copy the weights saved by ``save_pretrained`` in directory ``path`` into ``model``
    (same class; read with ``from_pretrained`` on the CPU, so sharded files and the
    library's key renames are handled), exactly."""
    dtype = next(model.parameters()).dtype
    try:
        with _quiet():
            saved = type(model).from_pretrained(path, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        files = [f for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin", ".json"))]
        raise CheckpointError(f"{path}: the model weights cannot be loaded ({type(exc).__name__}: {exc}; "
                              f"files: {', '.join(files)})") from None
    try:
        model.load_state_dict(saved.state_dict(), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the saved weights do not fit the configured model ({exc})") from None
    del saved


def restore_checkpoint(path: str, *, model, optimizer, scheduler, generators: dict | None = None,
                       reference=None) -> dict:
    """Load checkpoint directory ``path`` into model / optimizer / scheduler / the RNGs
    (and the reference model from checkpoints/reference/ when ``reference`` is given);
    returns its trainer state (step, data_cursor, elapsed, config). CheckpointError
    naming the file on anything missing or corrupt."""
    state = read_trainer_state(path)
    if not state.get("resumable"):
        raise CheckpointError(f"{os.path.join(path, MARKER)}: resumable is false")
    ref = os.path.join(os.path.dirname(path), REFERENCE_DIR)
    if reference is not None:
        if not os.path.isfile(os.path.join(ref, "reference.json")):
            raise CheckpointError(f"{ref}: the reference model (loss.kl_coef > 0) is missing")
        try:
            with open(os.path.join(ref, "reference.json"), encoding="utf-8") as f:
                ref_files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{os.path.join(ref, 'reference.json')}: corrupt ({exc})") from None
        _check_files(ref, ref_files)
    opt, sched, rng = (_load(os.path.join(path, f)) for f in ("optimizer.pt", "scheduler.pt", "rng_state.pt"))
    load_weights(model, path)
    if reference is not None:
        load_weights(reference, ref)
    try:
        optimizer.load_state_dict(opt)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{os.path.join(path, 'optimizer.pt')}: does not fit the model's parameters "
                              f"({exc})") from None
    scheduler.load_state_dict(sched)
    try:
        set_rng_state(rng, generators)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{os.path.join(path, 'rng_state.pt')}: corrupt ({exc})") from None
    return state
