"""Loading the paper's data files into :class:`Sample` objects with mono variants.

    from mars.data import load_samples
    samples = load_samples("llvip_eval.json", image_root="data/")   # or a .parquet
    s = samples[0]
    s.images, s.question, s.ground_truth, s.task
    s.mono_variants("duplicate")   # source k in every slot (the paper's way)
    s.mono_variants("single")      # one image, the other placeholders removed

Formats, fields, validation and errors: docs/data.md.
"""

from .ground_truth import ground_truth_problem
from .images import load_image
from .loaders import check_limit, load_eval_json, load_parquet, load_samples
from .messages import normalise_messages
from .sample import IMAGE_PLACEHOLDER, MONO_MODES, DataFormatError, Sample
from .tasks import TASKS, infer_task

__all__ = [
    "Sample",
    "DataFormatError",
    "MONO_MODES",
    "IMAGE_PLACEHOLDER",
    "TASKS",
    "infer_task",
    "ground_truth_problem",
    "load_eval_json",
    "load_parquet",
    "load_samples",
    "check_limit",
    "load_image",
    "normalise_messages",
]
