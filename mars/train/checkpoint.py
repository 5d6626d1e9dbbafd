"""Checkpoints of ``mars train``: OUTPUT_DIR/checkpoints/step_NNNNNN/ holds

* the model (``save_pretrained``: config.json + safetensors) and the processor, or the
  tokenizer + image processor, files: what ``mars eval --model DIR`` and
  ``AutoModelForImageTextToText.from_pretrained`` load;
* ``trainer_state.json``: step, seed, data cursor, the config as run, and which parts of
  the training state are saved (``resumable``: false; the optimizer state is not saved yet);
* ``rng_state.pt``: the torch (CPU and CUDA) and Python RNG states.

``OUTPUT_DIR/checkpoints/latest`` names the newest one.
"""

from __future__ import annotations

import json
import os
import random

import torch

__all__ = ["save_checkpoint", "latest_checkpoint", "rng_state"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(output_dir: str, step: int, *, model, tokenizer, processor=None, image_processor=None,
                    config: dict, data_cursor: int, seed: int) -> str:
    """Write checkpoint ``step`` and return its directory."""
    path = os.path.join(output_dir, "checkpoints", f"step_{step:06d}")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    else:
        tokenizer.save_pretrained(path)
        if image_processor is not None:
            image_processor.save_pretrained(path)
    torch.save(rng_state(), os.path.join(path, "rng_state.pt"))
    state = {"step": step, "seed": seed, "data_cursor": data_cursor, "resumable": False,
             "saved": ["model", "processor" if processor is not None else "tokenizer+image_processor", "rng"],
             "not_saved": ["optimizer", "lr_scheduler", "reference_model"], "config": config}
    with open(os.path.join(path, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(output_dir, "checkpoints", "latest"), "w", encoding="utf-8") as f:
        f.write(os.path.basename(path) + "\n")
    return path


def latest_checkpoint(output_dir: str) -> str | None:
    p = os.path.join(output_dir, "checkpoints", "latest")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return os.path.join(output_dir, "checkpoints", f.read().strip())
