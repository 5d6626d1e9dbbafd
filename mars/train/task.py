"""The embedded synthetic task of ``mars train``: two sources per prompt, fusion matters.

Each prompt shows a scene as two images, an "RGB" camera image and an "infrared" (thermal)
image, and asks ``is there a person ?``; the answer is ``yes`` or ``no``
(``mars.rewards`` "vqa" reward: 0.25 + 0.25 format, +1 for the right answer). A scene is
one of these categories (``task.mix`` gives their shares):

| category     | RGB image                | infrared image       | answer | needs            |
|--------------|--------------------------|----------------------|--------|------------------|
| day_person   | red figure on grey       | white blob           | yes    | either source    |
| day_empty    | grey                     | dark                 | no     | either source    |
| night_empty  | black                    | dark                 | no     | either source    |
| day_heater   | blue object on grey      | white blob           | no     | RGB (IR misleads)|
| night_person | black (nothing visible)  | white blob           | yes    | IR (RGB misleads)|

So RGB alone cannot tell a night scene with a person from an empty one, infrared alone
cannot tell a person from a heater, and the two together always can (answer yes iff the
infrared shows a blob and the RGB shows no heater). Images are drawn on the fly from a
seeded generator (sample i of a stream is the same whatever else was drawn); the held-out
set is another stream.

The warm start (``warmup.*``) fine-tunes on responses of the answer format,
``<think> look at rgb and infrared </think> <answer> yes </answer>``, for one-image
prompts of either source (answered with what that source shows: :func:`source_answer`)
and two-image prompts of the scenes where the sources agree; what to do when they
disagree is left to RL (docs/train.md, "The embedded task").
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Mapping

import numpy as np

from mars.data import Sample

__all__ = ["CATEGORIES", "SOURCES", "QUESTION", "THINK", "VOCAB", "EmbeddedTask", "response_text",
           "source_answer", "write_eval_file"]

SOURCES = ("rgb", "infrared")
CATEGORIES = {  # name: (time of day, object, answer)
    "day_person": ("day", "person", "yes"),
    "day_empty": ("day", None, "no"),
    "night_empty": ("night", None, "no"),
    "day_heater": ("day", "heater", "no"),
    "night_person": ("night", "person", "yes"),
}
QUESTION = "image 1 is rgb . image 2 is infrared . is there a person ?"
NIGHT_QUESTION = "image 1 is rgb . is it night ?"
NIGHT_QUESTION_BOTH = "image 1 is rgb . image 2 is infrared . is it night ?"
THINK = "look at rgb and infrared"
ANSWERS = ("yes", "no")
# every word the prompts and the responses use (the tiny tokenizer's vocabulary)
VOCAB = sorted(set(QUESTION.split()) | set(NIGHT_QUESTION.split()) | set(THINK.split()) | set(ANSWERS) | set(SOURCES)
               | {"system", "user", "assistant", "You", "are", "a", "helpful", "."})


def response_text(answer: str) -> str:
    """The answer format the warm start teaches."""
    return f"<think> {THINK} </think> <answer> {answer} </answer>"


def source_answer(category: str, k: int) -> str:
    """What source k alone shows: RGB (k = 0) a person only as a red figure by day,
    infrared (k = 1) a person for every hot blob (heaters included)."""
    time, obj, _ = CATEGORIES[category]
    if k == 0:
        return "yes" if (time == "day" and obj == "person") else "no"
    return "yes" if obj is not None else "no"


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


class EmbeddedTask:
    """Scene generator. mix: category -> share (normalised); image_size: side in pixels
    (a multiple of 28: one vision token per 28 x 28 block); noise: pixel noise std."""

    def __init__(self, mix: Mapping[str, float], image_size: int = 56, noise: float = 0.05, seed: int = 0):
        unknown = sorted(set(mix) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"task.mix: unknown categories {unknown}; known: {sorted(CATEGORIES)}")
        w = np.array([float(mix.get(c, 0.0)) for c in CATEGORIES])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"task.mix: shares must be >= 0 with a positive sum, got {dict(mix)}")
        if image_size < 28 or image_size % 28:
            raise ValueError(f"task.image_size must be a positive multiple of 28, got {image_size}")
        self.names = list(CATEGORIES)
        self.weights = w / w.sum()
        self.image_size = int(image_size)
        self.noise = float(noise)
        self.seed = int(seed)

    # ------------------------------------------------------------------ images
    def _images(self, rng, time: str, obj: str | None):
        from PIL import Image

        S = self.image_size
        day = time == "day"
        rgb = np.empty((S, S, 3))
        rgb[:] = (0.45, 0.5, 0.42) if day else (0.04, 0.04, 0.06)
        ir = np.full((S, S, 3), 0.15)
        if obj is not None:
            size = int(rng.integers(S // 3, S // 2 + 1))
            y, x = (int(v) for v in rng.integers(0, S - size + 1, size=2))
            if day:
                rgb[y:y + size, x:x + size] = (0.85, 0.25, 0.2) if obj == "person" else (0.2, 0.3, 0.85)
            ir[y:y + size, x:x + size] = 0.9
        rgb += rng.normal(0, self.noise, rgb.shape)
        ir += rng.normal(0, self.noise, (S, S, 1))  # grey: the same noise in every channel
        to_pil = lambda a: Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8), "RGB")  # noqa: E731
        return [to_pil(rgb), to_pil(ir)]

    def sample(self, index: int, stream: str = "train", category: str | None = None) -> Sample:
        """Sample ``index`` of ``stream`` ("train", "eval", "warmup", ...)."""
        rng = np.random.default_rng(_seed(self.seed, stream, index))
        name = category or self.names[int(rng.choice(len(self.names), p=self.weights))]
        time, obj, answer = CATEGORIES[name]
        images = self._images(rng, time, obj)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": QUESTION}]}]
        return Sample(id=f"{stream}-{index}", messages=messages, image_refs=images, ground_truth=answer,
                      task="vqa", data_source="embedded", extra_info={"category": name})

    def single_source(self, sample: Sample, k: int) -> Sample:
        """Source ``k`` of ``sample`` alone, as a one-image prompt naming that source
        (``image 1 is infrared . is there a person ?``), answered with what that source
        shows (:func:`source_answer`): the warm start's single-image data."""
        name = sample.extra_info["category"]
        answer = source_answer(name, k)
        text = f"image 1 is {SOURCES[k]} . is there a person ?"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return Sample(id=f"{sample.id}/{SOURCES[k]}", messages=messages, image_refs=[sample.image_refs[k]],
                      ground_truth=answer, task="vqa", data_source="embedded",
                      extra_info={"category": name, "source": k})

    def night_question(self, sample: Sample, both: bool = False) -> Sample:
        """The RGB image of ``sample`` alone (both: the RGB and the infrared image, as in the
        task's prompts) with the question ``is it night ?``, answered with the truth:
        warm-start data that teaches the tiny model to tell day from night
        (``warmup.night_share``; with both sources: to read the RGB slot of a two-source
        prompt, ``warmup.night_both``), the perception a pretrained VLM brings to RL."""
        name = sample.extra_info["category"]
        answer = "yes" if CATEGORIES[name][0] == "night" else "no"
        if both:
            content, images, info = ([{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": NIGHT_QUESTION_BOTH}], list(sample.image_refs), {})
        else:
            content, images, info = ([{"type": "image"}, {"type": "text", "text": NIGHT_QUESTION}],
                                     [sample.image_refs[0]], {"source": 0})
        return Sample(id=f"{sample.id}/night", messages=[{"role": "user", "content": content}], image_refs=images,
                      ground_truth=answer, task="vqa", data_source="embedded",
                      extra_info={"category": name, **info, "question": "night"})

    def samples(self, n: int, stream: str = "train", start: int = 0) -> list[Sample]:
        return [self.sample(i, stream) for i in range(start, start + n)]

    def balanced(self, n_per_category: int, stream: str = "eval") -> list[Sample]:
        """``n_per_category`` samples of every category with a positive share."""
        out = []
        for c, w in zip(self.names, self.weights):
            if w > 0:
                out += [self.sample(i, f"{stream}-{c}", category=c) for i in range(n_per_category)]
        for s in out:
            s.id = f"{stream}-{s.extra_info['category']}-{s.id.rsplit('-', 1)[1]}"
        return out


def write_eval_file(samples, directory: str) -> str:
    """Write ``samples`` as a ``mars eval`` JSON file with PNG images under ``directory``;
    returns the JSON path."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    entries = []
    for s in samples:
        content = []
        for k, im in enumerate(s.image_refs):
            rel = os.path.join("images", f"{s.id}_{SOURCES[k]}.png")
            im.save(os.path.join(directory, rel))
            content.append({"type": "image", "image": rel})
        content.append({"type": "text", "text": s.question})
        entries.append({"role": "user", "content": content, "ground_truth": s.ground_truth,
                        "extra_info": {"id": s.id, **s.extra_info}})
    path = os.path.join(directory, "heldout.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
    return path
