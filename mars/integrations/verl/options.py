"""The recipe's ``mars`` config section (config/mars_trainer.yaml)."""

from __future__ import annotations

__all__ = ["mars_options", "MARS_DEFAULTS"]

MARS_DEFAULTS = {"anchors": True, "mono_mode": "duplicate", "min_sources": 1}
_OTHER_KEYS = ("use_mars_rewards",)  # read by main.apply_mars_defaults


def mars_options(config) -> dict:
    """The ``mars`` section of a verl config with its defaults: anchors (bool: generate the
    mono anchors), mono_mode ("duplicate" | "single"), min_sources (int >= 1).

    Raises ValueError naming an unknown key or a bad value."""
    section = config.get("mars", None) if hasattr(config, "get") else None
    opts = dict(MARS_DEFAULTS)
    for k in (section or {}):
        if k not in MARS_DEFAULTS and k not in _OTHER_KEYS:
            raise ValueError(f"unknown mars option {k!r}; known: {sorted(MARS_DEFAULTS) + list(_OTHER_KEYS)}")
        if k in MARS_DEFAULTS:
            opts[k] = section[k]
    if not isinstance(opts["anchors"], bool):
        raise ValueError(f"mars.anchors must be true or false, got {opts['anchors']!r}")
    if opts["mono_mode"] not in ("duplicate", "single"):
        raise ValueError(f"mars.mono_mode must be 'duplicate' or 'single', got {opts['mono_mode']!r}")
    ms = opts["min_sources"]
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 1:
        raise ValueError(f"mars.min_sources must be an int >= 1, got {ms!r}")
    return opts
