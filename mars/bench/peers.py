"""The peers `mars bench` compares with, imported on first use: verl, Liger-Kernel and Cut
Cross-Entropy are optional; a missing one skips its cases with a note."""
from __future__ import annotations

import importlib
from importlib import metadata


class Skip(Exception):
    """This case cannot run here; the message says why (it goes into the results)."""


def version(dist: str) -> str | None:
    """Installed version of a distribution, without importing it (None: not installed)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def load(module: str, dist: str):
    """Imports `module` of distribution `dist`, or raises Skip saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if version(dist) is None:
            raise Skip(f"{dist} is not installed (pip install {dist})") from None
        raise Skip(f"{dist} {version(dist)} is installed but {module} does not import: "
                   f"{type(exc).__name__}: {str(exc)[:160]}") from None


def verl_core():
    return load("verl.trainer.ppo.core_algos", "verl")


def verl_functional():
    return load("verl.utils.experimental.torch_functional", "verl")


def liger_chunked():
    return load("liger_kernel.chunked_loss", "liger-kernel")


def liger_transformers():
    return load("liger_kernel.transformers", "liger-kernel")


def cce():
    return load("cut_cross_entropy", "cut-cross-entropy")


class VerlActorConfig(dict):
    """The few fields of verl's ActorConfig that compute_policy_loss_vanilla reads."""
    __getattr__ = dict.__getitem__


def verl_actor_config(clip_low: float, clip_high: float, dual_clip: float) -> VerlActorConfig:
    return VerlActorConfig(clip_ratio=clip_low, clip_ratio_low=clip_low,
                           clip_ratio_high=clip_high, clip_ratio_c=dual_clip,
                           global_batch_info={})
