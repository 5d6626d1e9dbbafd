"""mars.data: both published formats load from the fixtures in tests/data, mono variants
are right, and malformed files fail with messages that name the samples."""

import json
import os

import pytest

from mars.data import DataFormatError, Sample, infer_task, load_eval_json, load_parquet, load_samples
from mars.data.images import load_image
from mars.rewards import get_reward

DATA = os.path.join(os.path.dirname(__file__), "data")
COLOURS = [(220, 40, 40), (40, 40, 220), (40, 200, 40), (200, 200, 40), (200, 40, 200), (40, 200, 200)]


def path(name):
    return os.path.join(DATA, name)


def colour(im):
    return im.getpixel((im.width // 2, im.height // 2))


def image_parts(sample):
    return sum(p["type"] == "image" for m in sample.messages for p in m["content"])


@pytest.mark.parametrize("name,task,n,m", [
    ("llvip_eval.json", "grounding", 3, 2), ("spatialqa_eval.json", "vqa", 3, 2),
    ("nuscenes_eval.json", "vqa", 2, 6), ("OCR-VQA_eval.json", "mcq", 3, 2),
])
def test_eval_json_fixtures(name, task, n, m):
    samples = load_eval_json(path(name))
    assert len(samples) == n
    for s in samples:
        assert isinstance(s, Sample) and s.task == task and s.num_images == m and s.variant == "multi"
        assert image_parts(s) == m
        ims = s.images
        assert len(ims) == m and all(im.mode == "RGB" for im in ims)
        assert [colour(im) for im in ims] == COLOURS[:m]
        assert s.question and "<image>" not in s.question
        assert s.ground_truth is not None
    assert load_samples(path(name), limit=1)[0].id == samples[0].id


def test_eval_json_fields():
    s = load_eval_json(path("llvip_eval.json"))[1]
    assert s.id == "llvip1" and s.ground_truth == [[2, 2, 12, 30], [24, 4, 40, 36]]
    assert s.data_source == "llvip_eval" and s.extra_info == {"sample_id": "llvip1"}
    assert s.image_refs == ["images/llvip1_0.png", "images/llvip1_1.png"]
    assert s.question.startswith("Here are a visible image and an infrared image")
    assert s.to_record()["images"] == s.image_refs


def test_parquet_fixture():
    samples = load_parquet(path("train.parquet"))
    assert [s.id for s in samples] == ["0", "1", "2", "3"]
    assert [s.task for s in samples] == ["grounding", "vqa", "vqa", "mcq"]
    assert [s.num_images for s in samples] == [2, 2, 6, 2]
    assert [s.data_source for s in samples] == ["llvip", "spatialqa", "nuscenes", "ocrvqa"]
    s = samples[1]
    assert s.ground_truth == "<answer>Yes</answer>"
    assert s.extra_info == {"index": 1, "split": "train"}
    assert [colour(im) for im in s.images] == COLOURS[:2]
    assert "<image>" not in s.question and s.question.startswith("Here are an RGB image")
    assert s.messages[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    # the wrapped ground truths score with the task rewards
    assert get_reward("vqa")("<think>x</think><answer>yes</answer>", s.ground_truth) == 1.5
    boxes = '```json\n[{"bbox_2d": [4, 6, 20, 38]}, {"bbox_2d": [24, 4, 40, 36]}]\n```'
    assert get_reward("grounding")(f"<think>x</think><answer>{boxes}</answer>", samples[0].ground_truth) > 1.75
    assert get_reward("mcq")("<think>x</think><answer>C</answer>", samples[3].ground_truth) == 1.5


@pytest.mark.parametrize("loader,name", [(load_eval_json, "spatialqa_eval.json"), (load_parquet, "train.parquet")])
def test_mono_duplicate(loader, name):
    for s in loader(path(name)):
        variants = s.mono_variants("duplicate")
        assert len(variants) == s.num_images  # per sample, not a global M
        for k, v in enumerate(variants):
            assert v.variant == "mono-duplicate" and v.source_index == k and v.id == s.id
            assert v.num_images == s.num_images and image_parts(v) == s.num_images  # placeholders kept
            assert v.messages == s.messages and v.question == s.question
            assert [colour(im) for im in v.images] == [COLOURS[k]] * s.num_images
        assert s.image_refs != variants[-1].image_refs  # the original is untouched


@pytest.mark.parametrize("loader,name", [(load_eval_json, "nuscenes_eval.json"), (load_parquet, "train.parquet")])
def test_mono_single(loader, name):
    for s in loader(path(name)):
        for k, v in enumerate(s.mono_variants("single")):
            assert v.variant == "mono-single" and v.source_index == k
            assert v.num_images == 1 and image_parts(v) == 1
            assert colour(v.images[0]) == COLOURS[k]
            assert v.question == s.question


def test_mono_errors():
    s = load_eval_json(path("spatialqa_eval.json"))[0]
    with pytest.raises(ValueError, match="out of range.*2 images"):
        s.mono(2)
    with pytest.raises(ValueError, match="mode must be one of"):
        s.mono(0, "blank")
    with pytest.raises(ValueError, match="already a mono variant"):
        s.mono(0).mono(0)


def test_bad_eval_json_names_each_sample():
    with pytest.raises(DataFormatError) as err:
        load_eval_json(path("bad_eval.json"))
    msg = str(err.value)
    assert "3 malformed sample(s)" in msg
    assert "sample bad_missing_image: image 0: image file not found" in msg and "does_not_exist.png" in msg
    assert "sample bad_no_ground_truth: has no ground truth" in msg
    assert "sample bad_no_images: has no images" in msg
    assert "bad0:" not in msg  # the good sample is not reported


def test_bad_parquet_reports_placeholder_mismatch():
    with pytest.raises(DataFormatError, match=r"sample 1: 2 image placeholder\(s\) in the prompt but 1 image\(s\)"):
        load_parquet(path("bad_train.parquet"))
    assert len(load_parquet(path("bad_train.parquet"), limit=1)) == 1


def write_parquet(tmp_path, rows, name="t.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), p)
    return p


def test_parquet_missing_columns(tmp_path):
    p = write_parquet(tmp_path, [{"prompt": "x", "data_source": "a"}])
    with pytest.raises(DataFormatError, match=r"missing column\(s\) \['images', 'reward_model'\]"):
        load_parquet(p)


def test_parquet_more_images_than_placeholders_and_paths(tmp_path):
    img = os.path.join(DATA, "images", "spatial0_0.png")
    rows = [
        {"prompt": [{"role": "user", "content": "<image> Is it? "}], "images": [img, img],
         "data_source": "spatialqa", "reward_model": {"ground_truth": "<answer>Yes</answer>"}, "extra_info": {"index": 7}},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>x<image>y"}],
         "images": [img, "images/spatial0_1.png"], "data_source": "spatialqa",
         "reward_model": {"ground_truth": "<answer>No</answer>"}, "extra_info": {"index": 8}},
    ]
    p = write_parquet(tmp_path, rows)
    with pytest.raises(DataFormatError, match=r"sample 7: 1 image placeholder\(s\) in the prompt but 2 image\(s\)"):
        load_parquet(p)
    p = write_parquet(tmp_path, rows[1:], "ok.parquet")
    s = load_parquet(p, image_root=DATA)[0]
    assert s.id == "8" and s.num_images == 2 and s.question == "xy"
    assert s.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert [colour(im) for im in s.images] == COLOURS[:2]
    with pytest.raises(DataFormatError, match="image file not found"):
        load_parquet(p)  # relative path resolved against the parquet's folder by default
    assert load_parquet(p, check_images=False)[0].num_images == 2


def test_eval_json_malformed_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_eval_json(p)
    p.write_text('"just a string"')
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_eval_json(p)
    entries = [
        7,
        {"ground_truth": "yes"},
        {"role": "user", "content": [{"type": "video", "video": "v.mp4"}], "ground_truth": "yes"},
        {"role": "user", "content": [{"type": "image", "image": "https://example.com/a.png"},
                                     {"type": "text", "text": "q"}], "ground_truth": "yes"},
        {"role": "user", "content": [{"type": "image", "image": os.path.join(DATA, "images", "ocr0_0.png")},
                                     {"type": "text", "text": "<image> q"}], "ground_truth": "yes"},
    ]
    p.write_text(json.dumps(entries))
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p)
    msg = str(err.value)
    assert "5 malformed sample(s)" in msg
    assert "sample 0: entry is a int" in msg
    assert "sample 1: has neither 'content' nor 'messages'" in msg
    assert "sample 2: message 0: unsupported content part type 'video'" in msg
    assert "sample 3: image 0: remote image URLs are not fetched" in msg
    assert "sample 4: 1 image placeholder(s) in the prompt but 0 image(s)" in msg


def test_eval_json_duplicate_ids_and_jsonl(tmp_path):
    entries = json.load(open(path("spatialqa_eval.json")))
    for e in entries:
        for part in e["content"]:
            if part["type"] == "image":
                part["image"] = os.path.join(DATA, part["image"])
    p = tmp_path / "dup.json"
    p.write_text(json.dumps([entries[0], entries[0]]))
    with pytest.raises(DataFormatError, match="sample spatial0: duplicate sample id"):
        load_eval_json(p)
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    assert [s.id for s in load_samples(p)] == ["spatial0", "spatial1", "spatial2"]
    with pytest.raises(ValueError, match="unknown data file type"):
        load_samples(tmp_path / "x.csv")


def test_task_override_and_inference():
    assert {s.task for s in load_eval_json(path("spatialqa_eval.json"), task="mcq")} == {"mcq"}
    assert infer_task("LLVIP_eval") == "grounding"
    assert infer_task("OCR-VQA_eval") == "mcq"
    assert infer_task("nuscenes") == "vqa"
    assert infer_task("mine", "<answer>[[1, 2, 3, 4]]</answer>") == "grounding"
    assert infer_task("mine", "<answer>B</answer>") == "mcq"
    assert infer_task("mine", "blue") == "vqa"


def test_load_image_forms(tmp_path):
    import base64
    raw = open(os.path.join(DATA, "images", "ocr0_1.png"), "rb").read()
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    for ref in (raw, {"bytes": raw, "path": None}, uri, "file://" + os.path.join(DATA, "images", "ocr0_1.png"),
                {"bytes": None, "path": os.path.join(DATA, "images", "ocr0_1.png")}):
        assert colour(load_image(ref)) == COLOURS[1]
    assert colour(load_image("images/ocr0_1.png", DATA)) == COLOURS[1]
    with pytest.raises(ValueError, match="image file not found"):
        load_image("nope.png", str(tmp_path))
    with pytest.raises(ValueError, match="neither bytes nor path"):
        load_image({"bytes": None, "path": None})
