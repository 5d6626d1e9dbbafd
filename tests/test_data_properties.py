"""mars.data on generated files (hypothesis): random mixtures of valid and malformed
samples in the three file forms (JSON, JSON lines with blank lines, parquet). Every
malformed sample's id is in the one DataFormatError (JSONL: with its real line number),
no valid sample is; a file of valid samples loads with the right count, ids and tasks.
And: whatever ground truth the loader accepts for a task, that task's reward and metric
score without raising."""

import json
import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mars.data import DataFormatError, ground_truth_problem, infer_task, load_eval_json, load_parquet
from mars.rewards import get_reward
from mars.rewards.metrics import sample_metric

DATA = os.path.join(os.path.dirname(__file__), "data")
IMGS = [os.path.join(DATA, "images", f"spatial0_{k}.png") for k in range(2)]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- generated samples

coord = st.integers(0, 200)


@st.composite
def good_box(draw):
    x1, y1 = draw(coord), draw(coord)
    return [x1, y1, x1 + draw(st.integers(1, 50)), y1 + draw(st.integers(1, 50))]


@st.composite
def bad_box(draw):
    b = draw(good_box())
    kind = draw(st.sampled_from(["nan", "inf", "str", "none", "arity", "inverted", "flat", "bool"]))
    j = draw(st.integers(0, 3))
    if kind == "nan":
        b[j] = float("nan")
    elif kind == "inf":
        b[j] = draw(st.sampled_from([float("inf"), float("-inf")]))
    elif kind == "str":
        b[j] = str(b[j])
    elif kind == "none":
        b[j] = None
    elif kind == "bool":
        b[j] = True
    elif kind == "arity":
        b = b[: draw(st.sampled_from([0, 1, 2, 3]))] if draw(st.booleans()) else b + [1]
    elif kind == "inverted":
        b = [b[2], b[1], b[0], b[3]] if j % 2 == 0 else [b[0], b[3], b[2], b[1]]
    else:
        b = [b[0], b[1], b[0], b[3]] if j % 2 == 0 else [b[0], b[1], b[2], b[1]]
    return b


ANSWERS = ["yes", "No", "two or 2", "red car", "3", "the left one"]
LETTERS = ["A", "B", "(C)", "D."]


def wrap(draw, boxes):
    """Boxes as a list, or as the parquet's ``<answer>``-wrapped JSON string."""
    if draw(st.booleans()):
        return boxes
    return f"<answer>{json.dumps(boxes)}</answer>"


@st.composite
def good_gt(draw):
    """(ground truth, expected task) with no data-source hint."""
    task = draw(st.sampled_from(["grounding", "vqa", "mcq"]))
    if task == "grounding":
        boxes = draw(st.lists(good_box(), max_size=3))  # [] included: nobody there
        if boxes and draw(st.booleans()):
            boxes = [{"bbox_2d": b, "label": "person"} for b in boxes]
        return wrap(draw, boxes), task
    pool = ANSWERS if task == "vqa" else LETTERS
    a = draw(st.sampled_from(pool))
    return (f"<answer>{a}</answer>" if draw(st.booleans()) else a), task


@st.composite
def bad_gt(draw, for_parquet=False):
    """A ground truth no task accepts as inferred (parquet: strings or null only)."""
    kind = draw(st.sampled_from(["box", "none", "empty", "blank_answer"] + ([] if for_parquet else ["dict", "bool"])))
    if kind == "box":
        boxes = draw(st.lists(good_box(), max_size=2))
        boxes.insert(draw(st.integers(0, len(boxes))), draw(bad_box()))
        return wrap(draw, boxes) if for_parquet or draw(st.booleans()) else boxes
    if kind == "none":
        return None
    if kind == "empty":
        return draw(st.sampled_from(["", "   ", "<answer></answer>", "<answer> \n</answer>", "..."]))
    if kind == "blank_answer":
        return draw(st.sampled_from(["<answer>?</answer>", "!!", "<answer> - </answer>"]))
    if kind == "dict":
        return draw(st.sampled_from([{"answer": "yes"}, {}, {"label": "person"}]))
    return draw(st.booleans())


@st.composite
def mixture(draw, for_parquet=False):
    """[(kind, sample fields)] with unique ids; kind "good" carries the expected task."""
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        sid = f"s{i}"
        m = draw(st.integers(1, 2))
        images = IMGS[:m]
        if draw(st.booleans()):
            gt, task = draw(good_gt())
            out.append(("good", task, dict(sid=sid, gt=gt, images=images, placeholders=m)))
            continue
        how = draw(st.sampled_from(["gt", "gt", "missing_image", "placeholders", "no_images"]))
        gt = draw(bad_gt(for_parquet)) if how == "gt" else draw(good_gt())[0]
        fields = dict(sid=sid, gt=gt, images=images, placeholders=m)
        if how == "missing_image":
            fields["images"] = images[:-1] + ["does_not_exist.png"]
        elif how == "placeholders":
            fields["placeholders"] = m + draw(st.sampled_from([-1, 1]))
        elif how == "no_images":
            fields["images"], fields["placeholders"] = [], 0
        out.append(("bad", how, fields))
    return out


def eval_entry(f):
    content = [{"type": "image", "image": im} for im in f["images"]]
    extra = f["placeholders"] - len(f["images"])
    text = "<image>" * max(extra, 0) + "Question?"
    if extra < 0:  # one placeholder fewer: give the images as a list, one too many
        content = []
        text = "<image>" * f["placeholders"] + "Question?"
    content.append({"type": "text", "text": text})
    e = {"role": "user", "content": content, "ground_truth": f["gt"], "extra_info": {"sample_id": f["sid"]}}
    if extra < 0:
        e["images"] = f["images"]
    return e


def parquet_row(f):
    return {"prompt": [{"role": "user", "content": "<image>" * f["placeholders"] + "Question?"}],
            "images": f["images"], "data_source": None,
            "reward_model": {"ground_truth": f["gt"]}, "extra_info": {"sample_id": f["sid"]}}


def check(load, path, mix, lines=None):
    bad = {f["sid"] for kind, _, f in mix if kind == "bad"}
    good = [(f["sid"], task) for kind, task, f in mix if kind == "good"]
    if not bad:
        samples = load(path)
        assert [(s.id, s.task) for s in samples] == good
        for s in samples:  # the accepted ground truths score
            get_reward(s.task)("<think>x</think><answer>yes</answer>", s.ground_truth)
        return
    with pytest.raises(DataFormatError) as err:
        load(path)
    ids = {sid for sid, _ in err.value.problems}
    assert ids == bad
    msg = str(err.value)
    assert f"{len(bad)} malformed sample(s)" in msg
    for sid in bad:
        assert f"sample {sid}: " in msg
    if lines is not None:  # JSON lines: each problem says the sample's real line
        for sid, text in err.value.problems:
            assert text.startswith(f"line {lines[sid]}: "), (sid, text)


@settings(max_examples=150, **SETTINGS)
@given(mix=mixture(), blanks=st.lists(st.sampled_from(["", "  ", "\t"]), max_size=13), crlf=st.booleans())
def test_generated_json_and_jsonl(mix, blanks, crlf):
    entries = [eval_entry(f) for _, _, f in mix]
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "samples.json")
        with open(p, "w") as fh:
            json.dump(entries, fh)
        check(load_eval_json, p, mix)
        # the same entries as JSON lines, blank lines sprinkled in
        text_lines, lines = [], {}
        for k, (e, (_, _, f)) in enumerate(zip(entries, mix)):
            if k < len(blanks):
                text_lines.append(blanks[k])
            text_lines.append(json.dumps(e))
            lines[f["sid"]] = len(text_lines)
        p = os.path.join(d, "samples.jsonl")
        with open(p, "w", newline="") as fh:
            fh.write(("\r\n" if crlf else "\n").join(text_lines))
        check(load_eval_json, p, mix, lines)


@settings(max_examples=60, **SETTINGS)
@given(mix=mixture(for_parquet=True))
def test_generated_parquet(mix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.string())), ("data_source", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("sample_id", pa.string())])),
    ])
    rows = [parquet_row(f) for _, _, f in mix]
    for r in rows:  # the parquet stores boxes as their JSON text
        if isinstance(r["reward_model"]["ground_truth"], list):
            r["reward_model"]["ground_truth"] = json.dumps(r["reward_model"]["ground_truth"])
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "rows.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), p)
        check(load_parquet, p, mix)


# ---------------------------------------------------------------- accepted ground truths score

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "yes", "B", "two or 2", "[]", "[[1, 2, 3, 4]]", "<answer>[]</answer>",
                     "<answer>[[4, 4, 1, 1]]</answer>", "<answer></answer>", "nan"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.sampled_from(["bbox_2d", "bbox", "label", "answer"]), inner, max_size=3)),
    max_leaves=12,
)


@settings(max_examples=500, **SETTINGS)
@given(gt=st.one_of(json_value, st.lists(good_box(), max_size=3)), source=st.sampled_from([None, "mine", "llvip", "spatialqa", "ocrvqa"]),
       completion=st.sampled_from(["<think>x</think><answer>yes</answer>", "<think>x</think><answer>[]</answer>",
                                   '<think>x</think><answer>```json\n[{"bbox_2d": [1, 2, 30, 40]}]\n```</answer>',
                                   "no tags at all", "<answer>B</answer>"]))
def test_accepted_ground_truths_never_break_scoring(gt, source, completion):
    task = infer_task(source, gt)
    assert task in ("grounding", "vqa", "mcq")
    for t in ("grounding", "vqa", "mcq", task):
        why = ground_truth_problem(t, gt)
        assert why is None or (isinstance(why, str) and why)
        if why is None:
            r = get_reward(t)(completion, gt)
            assert math.isfinite(r) and r >= 0
            m = sample_metric(t, completion, gt)
            assert m["correct"] in (0.0, 1.0)
    if isinstance(gt, list) and all(isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in b) and b[2] > b[0] and b[3] > b[1] for b in gt):
        assert ground_truth_problem("grounding", gt) is None  # every well-formed box list, [] included
        if source in (None, "mine", "llvip"):
            assert task == "grounding"


part = st.one_of(
    json_value,
    st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url", "text", "video", None]),
                           "image": st.one_of(st.sampled_from(IMGS + ["", "x.png", "https://a/b.png"]), json_value),
                           "text": st.one_of(st.sampled_from(["q", "<image> q", ""]), json_value)}),
)
garbage_entry = st.fixed_dictionaries(
    {},
    optional={"role": json_value, "content": st.one_of(json_value, st.lists(part, max_size=4)),
              "messages": st.one_of(json_value, st.lists(st.fixed_dictionaries({"content": st.lists(part, max_size=3)}),
                                                         max_size=2)),
              "images": st.one_of(json_value, st.sampled_from(IMGS)), "ground_truth": json_value,
              "extra_info": st.one_of(json_value, st.fixed_dictionaries({"sample_id": json_value})),
              "data_source": json_value, "id": json_value},
)


@settings(max_examples=200, **SETTINGS)
@given(entries=st.lists(st.one_of(garbage_entry, json_value), max_size=6))
def test_garbage_only_raises_data_format_error(entries):
    """Arbitrary JSON entries: the loader returns samples or raises DataFormatError, never
    another exception; what it returns is usable."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "samples.json")
        with open(p, "w") as fh:
            json.dump(entries, fh)
        try:
            samples = load_eval_json(p)
        except DataFormatError as exc:
            assert exc.problems and str(exc).startswith(p)
            return
    for s in samples:
        assert s.num_images >= 1 and s.task in ("grounding", "vqa", "mcq")
        assert ground_truth_problem(s.task, s.ground_truth) is None
        s.to_record()
        for mode in ("duplicate", "single"):
            assert len(s.mono_variants(mode)) == s.num_images
