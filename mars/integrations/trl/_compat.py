"""The TRL versions this integration is pinned to, and the check the trainer runs.

`MarsGRPOTrainer` overrides and calls private methods of `trl.GRPOTrainer` (listed in
docs/trl.md, "TRL APIs used"); TRL does not treat them as API (trl#3983), so each release
must be checked before it is allowed here.
"""

from __future__ import annotations

import warnings

from packaging.version import Version

__all__ = ["TESTED_TRL", "SUPPORTED_TRL", "trl_version_supported", "check_trl_version"]

TESTED_TRL = "1.16.0"
SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high)


def trl_version_supported(version: str) -> bool:
    """Whether ``version`` lies in the pinned range [1.16.0, 1.17.0)."""
    v = Version(version)
    return SUPPORTED_TRL[0] <= v < SUPPORTED_TRL[1]


def check_trl_version(allow_untested: bool = False) -> str:
    """The installed TRL version; raises RuntimeError outside the pinned range (a
    UserWarning instead with ``allow_untested=True``); ImportError without TRL."""
    try:
        import trl
    except ImportError as e:  # pragma: no cover - the dev venv has trl
        raise ImportError(f"mars.integrations.trl needs trl: pip install 'mars[trl]' (tested with trl "
                          f"{TESTED_TRL}); importing it failed: {e}") from e
    version = str(getattr(trl, "__version__", "0"))
    if not trl_version_supported(version):
        msg = (f"MarsGRPOTrainer overrides private methods of trl.GRPOTrainer and is pinned to trl "
               f">={SUPPORTED_TRL[0]},<{SUPPORTED_TRL[1]} (tested with {TESTED_TRL}); this is trl {version}. "
               "docs/trl.md lists the TRL APIs it relies on; pass allow_untested_trl=True to try anyway.")
        if not allow_untested:
            raise RuntimeError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)
    return version
