"""Which verl this integration was written against, and the error when verl is missing."""

from __future__ import annotations

import warnings

TESTED_VERL = "0.9.1"
_warned = False


def require_verl():
    """Import verl (the package object) or raise an ImportError naming the extra.

    Safe while verl is still initialising (the plug-in is imported from inside
    ``verl/__init__.py``, after ``verl.__version__`` and ``verl.DataProto`` are set)."""
    try:
        import verl
    except ImportError as e:  # pragma: no cover - the dev venv has verl
        raise ImportError(
            "mars.integrations.verl needs verl: pip install 'mars[verl]' "
            f"(tested with verl {TESTED_VERL}); importing it failed: {e}") from e
    return verl


def check_verl_version() -> str:
    """verl's version string; warns once (UserWarning) when it is not the 0.9 series the
    integration was tested against (call sites and private names: docs/verl.md)."""
    global _warned
    version = getattr(require_verl(), "__version__", "unknown")
    if not _warned and not str(version).startswith("0.9."):
        _warned = True
        warnings.warn(
            f"mars.integrations.verl was tested with verl {TESTED_VERL}; this is verl {version}. "
            "The plug-in uses verl's registries and call signatures, the recipe its legacy "
            "RayPPOTrainer (docs/verl.md lists every verl API it relies on).",
            UserWarning, stacklevel=2)
    return str(version)
