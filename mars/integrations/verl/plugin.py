"""verl plug-in: registers the advantage estimator ``mars`` and the policy loss ``mars``.

Loaded by verl itself: mars declares the entry point
``[project.entry-points."verl.plugins"] mars = "mars.integrations.verl.plugin"`` and
``import verl`` loads every ``verl.plugins`` entry point (verl/__init__.py L55-76; also in
each Ray worker, since they import verl). Then::

    algorithm.adv_estimator=mars
    actor_rollout_ref.actor.policy_loss.loss_mode=mars

Without the entry point (``VERL_USE_EXTERNAL_PLUGINS=none``), ``VERL_USE_EXTERNAL_MODULES=
mars.integrations.verl.plugin`` or an explicit ``import mars.integrations.verl.plugin``
does the same.

verl catches any exception of a plug-in and logs it at DEBUG level only, so a broken
plug-in would disappear silently and the run would fail later with "Unknown advantage
estimator simply: mars". This module therefore reports its own failure loudly before
re-raising: ``logging.error`` with the traceback on the ``mars.integrations.verl`` logger
and a ``RuntimeWarning``. Importing it again is a no-op (same functions); a *different*
function already registered under ``mars`` is an error, not silently replaced.
"""

from __future__ import annotations

import logging
import traceback
import warnings

logger = logging.getLogger("mars.integrations.verl")

ESTIMATOR_NAME = "mars"
POLICY_LOSS_NAME = "mars"

__all__ = ["register", "ESTIMATOR_NAME", "POLICY_LOSS_NAME"]


def _same(a, b) -> bool:
    """Same function, or the same function re-created by a module reload."""
    return a is b or (getattr(a, "__module__", None) == getattr(b, "__module__", 1)
                      and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", 1))


def register() -> None:
    """Register both names with verl's registries (idempotent).

    Raises:
        ValueError: another function is registered under ``mars`` in either registry.
        ImportError: verl is not installed (``pip install 'mars[verl]'``).
    """
    from mars.integrations.verl._compat import check_verl_version

    check_verl_version()
    from verl.trainer.ppo import core_algos

    from mars.integrations.verl.estimator import compute_mars_advantage
    from mars.integrations.verl.loss import compute_policy_loss_mars

    for registry, name, fn, decorator in (
            (core_algos.ADV_ESTIMATOR_REGISTRY, ESTIMATOR_NAME, compute_mars_advantage,
             core_algos.register_adv_est),
            (core_algos.POLICY_LOSS_REGISTRY, POLICY_LOSS_NAME, compute_policy_loss_mars,
             core_algos.register_policy_loss)):
        have = registry.get(name)
        if have is None:
            decorator(name)(fn)
        elif have is fn:
            continue
        elif _same(have, fn):  # importlib.reload of our module: take the new function
            registry[name] = fn
        else:
            raise ValueError(
                f"verl already has a different {name!r} registered "
                f"({getattr(have, '__module__', '?')}.{getattr(have, '__qualname__', have)}); "
                f"mars will not replace it")


def _register_loudly() -> None:
    try:
        register()
    except Exception as e:
        msg = (f"mars verl plug-in failed: {type(e).__name__}: {e}. "
               "algorithm.adv_estimator=mars and policy_loss.loss_mode=mars are NOT available "
               "(verl only logs plug-in failures at DEBUG level).")
        logger.error("%s\n%s", msg, traceback.format_exc())
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        raise


_register_loudly()
