"""Benchmarks run on whatever device is here; Triton on CPU only through the interpreter,
which is far too slow to time, so Triton benchmarks need a GPU."""
import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
