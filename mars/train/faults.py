"""Faults of a ``mars train`` run: stop signals, out-of-memory, and the test kill points.

* :class:`StopSignals` (a context manager around the run): the first SIGINT / SIGTERM
  lets the current step finish; the loop then writes a checkpoint and raises
  :class:`Interrupted`. A second signal abandons the step at once (:class:`Interrupted`
  from the handler; the newest checkpoint stays the resume point). ``mars train`` prints
  the message, which says ``mars train --resume OUTPUT_DIR``, and exits with 128 + the
  signal number (130 for SIGINT, 143 for SIGTERM).
* :func:`oom_hint` (a context manager around a phase): a ``torch.OutOfMemoryError``
  (CUDA's included) gets a note naming the config keys that lower that phase's memory,
  and is re-raised, never swallowed.
* :func:`kill_point`: with ``MARS_TRAIN_KILL_AT=STEP:POINT[:SIGNAL]`` in the environment
  the process sends itself SIGKILL (or SIGTERM / SIGINT) when step STEP reaches POINT
  (``rollout``: after the step's rollouts, before its update; ``checkpoint``: inside the
  step's checkpoint save, before its marker is written). For the resume tests only;
  without the variable it does nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading

import torch

__all__ = ["Diverged", "Interrupted", "StopSignals", "oom_hint", "oom_message", "kill_point", "KILL_ENV"]

KILL_ENV = "MARS_TRAIN_KILL_AT"


def resume_command(output_dir: str) -> str:
    import shlex

    return f"mars train --resume {shlex.quote(str(output_dir))}"


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm at RL step ``step`` (optim.on_nonfinite=stop): the
    optimizer step was not taken, no checkpoint of the state is written."""

    def __init__(self, step: int, metric: str, value: float, cfg):
        self.step, self.metric, self.value = step, metric, value
        super().__init__(
            f"the update diverged at RL step {step}: {metric} = {value}; that optimizer step was not taken and no "
            f"checkpoint was written after it (the newest checkpoint is the last good state). Lower optim.lr (now {cfg.optim.lr}) or optim.max_grad_norm "
            f"(now {cfg.optim.max_grad_norm}), or set loss.log_ratio_clamp (now {cfg.loss.log_ratio_clamp}); "
            "optim.on_nonfinite=skip skips such steps instead")

    @classmethod
    def in_outputs(cls, step: int, what: str, cfg) -> "Diverged":
        """The policy's outputs became non-finite at RL step ``step`` (the updates before it
        left weights so large that its logits overflow)."""
        exc = cls(step, what, math.nan, cfg)
        exc.args = (str(exc).replace("that optimizer step was not taken and no checkpoint was written after it "
                                     "(the newest checkpoint is the last good state)",
                                     f"the updates before step {step} made the policy's outputs non-finite (resume "
                                     "from a checkpoint older than that)")
                         .replace("; optim.on_nonfinite=skip skips such steps instead", ""),)
        return exc

    def __reduce__(self):  # crosses process boundaries (mars train --compare workers) whole
        return _rebuild_diverged, (str(self), self.step, self.metric, self.value)


def _rebuild_diverged(message: str, step: int, metric: str, value: float) -> Diverged:
    exc = Diverged.__new__(Diverged)
    RuntimeError.__init__(exc, message)
    exc.step, exc.metric, exc.value = step, metric, value
    return exc


class Interrupted(Exception):
    """The run stopped on SIGINT / SIGTERM. signum: the signal; step: the last finished
    step (None: abandoned during a step); checkpoint: the checkpoint written on the way
    out (None: none written now); exit_code: 128 + signum."""

    def __init__(self, signum: int, output_dir: str, *, step: int | None = None, checkpoint: str | None = None,
                 newest: str | None = None):
        self.signum, self.output_dir, self.step, self.checkpoint = signum, output_dir, step, checkpoint
        self.newest = newest
        self.exit_code = 128 + signum
        super().__init__(self._message())

    def _message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is not None:
            what = f"stopped by {name} after step {self.step}; checkpoint {self.checkpoint}"
        else:
            newest = self.newest
            where = "during the warm start" if self.step == 0 else "in the middle of a step"
            what = (f"stopped by {name} {where}; " + (f"the newest checkpoint is {newest}" if newest else
                    "no checkpoint was written yet (resuming starts the run over)"))
        return f"{what}; resume with: {resume_command(self.output_dir)}"


class StopSignals:
    """Installs SIGINT / SIGTERM handlers while the run lasts (main thread only; elsewhere
    it does nothing). ``requested``: the first signal's number (None: none yet)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, output_dir: str, *, quiet: bool = False, newest=None):
        self.output_dir, self.quiet = output_dir, quiet
        self._newest = newest  # () -> the newest resumable checkpoint or None (named in the message)
        self.requested: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.requested is not None:  # the second one: abandon the step now
            raise Interrupted(signum, self.output_dir, newest=self.newest())
        self.requested = signum
        if not self.quiet:
            print(f"\nmars train: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False

    def check(self, step: int, save) -> None:
        """After step ``step``: if a signal came, ``save()`` (returns the checkpoint
        directory) and raise :class:`Interrupted`."""
        if self.requested is not None:
            checkpoint = save() if step else None
            raise Interrupted(self.requested, self.output_dir, step=step, checkpoint=checkpoint,
                              newest=None if checkpoint else self.newest())

    def newest(self) -> str | None:
        try:
            return self._newest() if self._newest is not None else None
        except Exception:  # noqa: BLE001 - the message must not fail
            return None


# ----------------------------------------------------------------------------- out of memory
@contextlib.contextmanager
def nonfinite_outputs(step: int, what: str, cfg):
    """Turn torch's sampling error on NaN / inf probabilities (``torch.multinomial``) into
    :class:`Diverged` naming the step (a diverged policy, not a bug)."""
    try:
        yield
    except RuntimeError as exc:
        if "probability tensor contains either" in str(exc):
            raise Diverged.in_outputs(step, what, cfg) from None
        raise


def oom_message(phase: str, cfg) -> str:
    """What to lower when ``phase`` ("generation", "evaluation", "old_logp", "update")
    runs out of memory, with the config's current values."""
    r, o, lo = cfg.rollout, cfg.optim, cfg.loss
    if phase in ("generation", "evaluation"):
        knobs = [f"rollout.max_batch_rows (rows per model.generate, now {r.max_batch_rows})"]
        if phase == "generation":
            knobs.append(f"optim.prompts_per_step x rollout.n (now {o.prompts_per_step} x {r.n})")
        if r.engine != "hf":
            key = "rollout.vllm.gpu_memory_utilization" if hasattr(r, "vllm") else \
                "the vLLM engine's gpu_memory_utilization"
            knobs.insert(0, f"{key} (the GPU memory fraction vLLM takes)")
    else:
        knobs = [f"optim.micro_batch_size (rows per forward / backward, now {o.micro_batch_size})"]
        if lo.fused:
            knobs.append(f"loss.chunk_size (tokens per logits block of the fused loss, now {lo.chunk_size})")
        else:
            knobs.append("loss.fused=true (no [tokens x vocab] logits; then loss.chunk_size)")
        if phase == "update" and not cfg.model.gradient_checkpointing:
            knobs.append("model.gradient_checkpointing=true")
    return (f"mars train: out of memory during {phase}; lower " + ", or ".join(knobs)
            + f". Then go on from the newest checkpoint with the smaller setting: {resume_command(cfg.output_dir)} "
            "KEY=VALUE (these memory keys may change on resume).")


@contextlib.contextmanager
def oom_hint(phase: str, cfg):
    """Re-raise an out-of-memory error of ``phase`` with :func:`oom_message` as a note."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        exc.add_note(oom_message(phase, cfg))
        raise


# ----------------------------------------------------------------------------- tests
def kill_point(point: str, step: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise ValueError(f"{KILL_ENV}={spec!r}: expected STEP:POINT[:KILL|TERM|INT]")
    if int(parts[0]) == step and parts[1] == point:
        sig = getattr(signal, "SIG" + (parts[2] if len(parts) == 3 else "KILL"))
        os.kill(os.getpid(), sig)
