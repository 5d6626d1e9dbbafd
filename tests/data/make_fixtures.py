"""Regenerates the fixture files of this folder (run: python tests/data/make_fixtures.py).

Tiny images (48x40 PNG, one flat colour per source so tests can tell sources apart) and
a few samples per task in the two published formats:

* ``<task>_eval.json``: evaluation chat messages with M image entries (docs/data.md);
* ``train.parquet``: training rows with ``<image>`` placeholders, embedded image bytes,
  ``data_source``, ``reward_model.ground_truth`` (``<answer>``-wrapped), ``extra_info``;
* ``bad_eval.json`` / ``bad_train.parquet``: malformed files for the error messages.
"""

import io
import json
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
COLOURS = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40), (200, 40, 200), (40, 200, 200)]
W, H = 48, 40


def image(name, colour):
    os.makedirs(os.path.join(HERE, "images"), exist_ok=True)
    Image.new("RGB", (W, H), colour).save(os.path.join(HERE, "images", name), optimize=True)
    return f"images/{name}"


def png_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (W, H), colour).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def entry(prefix, i, m, question, gt):
    content = [{"type": "image", "image": image(f"{prefix}{i}_{k}.png", COLOURS[k])} for k in range(m)]
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content, "ground_truth": gt, "extra_info": {"sample_id": f"{prefix}{i}"}}


GROUND_Q = ("Here are a visible image and an infrared image of the same scene. Locate every person. "
            'Output the boxes as ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "person"}] ```.')
SPATIAL_Q = "Here are an RGB image and its depth map. Is the cup within reach of the robot? The end of your output must be Yes or No."
NUSC_Q = "Here are six camera views around the car. How many pedestrians are there?"
OCR_Q = ("Here are two book covers. Are these two books in the same field? "
         "A. Yes, both are cookbooks B. No, one is a novel C. Yes, both are travel guides D. No, one is a textbook")


def main():
    files = {
        "llvip_eval.json": [
            entry("llvip", 0, 2, GROUND_Q, [[4, 6, 20, 38]]),
            entry("llvip", 1, 2, GROUND_Q, [[2, 2, 12, 30], [24, 4, 40, 36]]),
            entry("llvip", 2, 2, GROUND_Q, [[1, 1, 9, 20], [12, 3, 22, 30], [30, 5, 46, 38]]),
        ],
        "spatialqa_eval.json": [
            entry("spatial", 0, 2, SPATIAL_Q, "Yes"),
            entry("spatial", 1, 2, SPATIAL_Q, "No"),
            entry("spatial", 2, 2, SPATIAL_Q, "No"),
        ],
        "nuscenes_eval.json": [
            entry("nusc", 0, 6, NUSC_Q, "two or 2"),
            entry("nusc", 1, 6, "Here are six camera views around the car. Is there a bus?", "yes"),
        ],
        "OCR-VQA_eval.json": [
            entry("ocr", 0, 2, OCR_Q, "A"),
            entry("ocr", 1, 2, OCR_Q, "B"),
            entry("ocr", 2, 2, OCR_Q, "D"),
        ],
    }
    for name, entries in files.items():
        with open(os.path.join(HERE, name), "w") as f:
            json.dump(entries, f, indent=1)

    ok = entry("bad", 0, 2, SPATIAL_Q, "Yes")
    missing_file = {"role": "user", "content": [{"type": "image", "image": "images/does_not_exist.png"},
                                                {"type": "text", "text": SPATIAL_Q}],
                    "ground_truth": "No", "extra_info": {"sample_id": "bad_missing_image"}}
    no_gt = dict(entry("bad", 0, 2, SPATIAL_Q, None), extra_info={"sample_id": "bad_no_ground_truth"})
    no_gt.pop("ground_truth")
    no_images = {"role": "user", "content": [{"type": "text", "text": SPATIAL_Q}], "ground_truth": "Yes",
                 "extra_info": {"sample_id": "bad_no_images"}}
    with open(os.path.join(HERE, "bad_eval.json"), "w") as f:
        json.dump([ok, missing_file, no_gt, no_images], f, indent=1)

    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(i, source, question, gt, m):
        return {
            "data_source": source,
            "prompt": [{"role": "user", "content": "<image>" * m + question}],
            "images": [{"bytes": png_bytes(COLOURS[k]), "path": f"{source}_{i}_{k}.png"} for k in range(m)],
            "ability": "multi-source",
            "reward_model": {"style": "rule", "ground_truth": f"<answer>{gt}</answer>"},
            "extra_info": {"index": i, "split": "train"},
        }

    rows = [
        row(0, "llvip", GROUND_Q, "[[4, 6, 20, 38], [24, 4, 40, 36]]", 2),
        row(1, "spatialqa", SPATIAL_Q, "Yes", 2),
        row(2, "nuscenes", NUSC_Q, "two or 2", 6),
        row(3, "ocrvqa", OCR_Q, "C", 2),
    ]
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(HERE, "train.parquet"))
    bad = [row(0, "spatialqa", SPATIAL_Q, "Yes", 2), row(1, "spatialqa", SPATIAL_Q, "No", 2)]
    bad[1]["images"] = bad[1]["images"][:1]  # 2 placeholders, 1 image
    pq.write_table(pa.Table.from_pylist(bad), os.path.join(HERE, "bad_train.parquet"))


if __name__ == "__main__":
    main()
