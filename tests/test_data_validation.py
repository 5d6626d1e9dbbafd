"""mars.data load-time validation, case by case (docs/data.md): ground truths per task,
empty box lists, images given as one string, limits, JSONL line numbers, deep nesting,
encodings, top levels, missing files and parquet columns. The generated mixtures are in
tests/test_data_properties.py."""

import json
import os
import re

import numpy as np
import pytest

from mars.data import DataFormatError, ground_truth_problem, infer_task, load_eval_json, load_parquet, load_samples
from mars.data.messages import image_list
from mars.rewards import get_reward
from mars.rewards.metrics import sample_metric

DATA = os.path.join(os.path.dirname(__file__), "data")
IMG = os.path.join(DATA, "images", "spatial0_0.png")
IMG2 = os.path.join(DATA, "images", "spatial0_1.png")


def entry(sid, gt, *, n_images=1, **extra):
    content = [{"type": "image", "image": IMG}] * n_images + [{"type": "text", "text": "Where are they?"}]
    e = {"role": "user", "content": content, "ground_truth": gt, "extra_info": {"sample_id": sid}}
    e.update(extra)
    return e


def write_json(tmp_path, entries, name="samples.json"):
    p = tmp_path / name
    p.write_text(json.dumps(entries))
    return p


def write_parquet(tmp_path, rows, name="rows.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), p)
    return p


def row(sid, gt, source="", images=(IMG,), prompt=None):
    return {"prompt": prompt or [{"role": "user", "content": "<image>" * len(images) + "Q?"}],
            "images": list(images), "data_source": source,
            "reward_model": {"ground_truth": gt}, "extra_info": {"sample_id": sid}}


def problems_by_id(err):
    out = {}
    for sid, msg in err.value.problems:
        out.setdefault(sid, []).append(msg)
    return out


# ---------------------------------------------------------------- empty box lists

@pytest.mark.parametrize("gt", [[], "[]", "<answer>[]</answer>", "<answer>```json\n[]\n```</answer>", ()])
def test_empty_box_list_infers_grounding(gt):
    assert infer_task("mine", gt) == "grounding"
    assert infer_task(None, gt) == "grounding"
    assert ground_truth_problem("grounding", gt) is None
    # and it scores as a grounding sample with nobody there
    assert get_reward("grounding")("<think>x</think><answer>```json\n[]\n```</answer>", gt) == pytest.approx(1.75)
    assert sample_metric("grounding", "<think>x</think><answer>[]</answer>", gt)["correct"] == 1.0


def test_empty_box_list_loads_as_grounding(tmp_path):
    p = write_json(tmp_path, [entry("e0", []), entry("e1", [[1, 2, 30, 40]]), entry("e2", [])])
    assert [s.task for s in load_eval_json(p)] == ["grounding"] * 3
    p = write_parquet(tmp_path, [row("p0", "<answer>[]</answer>"), row("p1", "<answer>[[1, 2, 3, 4]]</answer>")])
    assert [s.task for s in load_parquet(p)] == ["grounding", "grounding"]
    # the keyword of a data source decides first: a vqa source with [] is a bad answer
    p = write_json(tmp_path, [entry("v0", [], data_source="spatialqa")])
    with pytest.raises(DataFormatError, match=r"sample v0: bad ground truth for task 'vqa' \(inferred: data source "
                                              r"'spatialqa' contains 'spatial'\)"):
        load_eval_json(p)


def test_answer_shapes_stay_vqa():
    assert infer_task("mine", ["yes"]) == "vqa"
    assert infer_task("mine", 3) == "vqa"
    assert infer_task("mine", "two or 2") == "vqa"
    assert infer_task("mine", "<answer>C</answer>") == "mcq"
    assert infer_task("mine", {"bbox_2d": [1, 2, 3, 4]}) == "grounding"
    assert infer_task("mine", "[{'bbox_2d': [1, 2, 3, 4]}]") == "grounding"  # python quotes, as the reward reads


# ---------------------------------------------------------------- bad ground truths

@pytest.mark.parametrize("gt,why", [
    ([[1, 2, float("nan"), 4]], r"box 0 x2 is nan \(not finite\)"),
    ([[1, 2, 3, 4], [float("inf"), 2, 3, 4]], r"box 1 x1 is inf \(not finite\)"),
    ([[1, 2, 3, float("-inf")]], r"box 0 y2 is -inf"),
    ("<answer>[[1, 2, NaN, 4]]</answer>", r"box 0 x2 is nan"),
    ([[1, 2, 3]], r"box 0 has 3 coordinate\(s\), expected 4"),
    ([[1, 2, 3, 4, 5]], r"box 0 has 5 coordinate\(s\)"),
    ([[]], r"box 0 has 0 coordinate\(s\)"),
    ([["1", 2, 3, 4]], r"box 0 x1 is not a number \('1'\)"),
    ([[1, None, 3, 4]], r"box 0 y1 is not a number \(None\)"),
    ([[True, 2, 3, 4]], r"box 0 x1 is not a number \(True\)"),
    ([[10, 10, 0, 0]], r"box 0 is inverted or empty \(x2 <= x1\)"),
    ([[0, 10, 10, 5]], r"box 0 is inverted or empty \(y2 <= y1\)"),
    ([[5, 5, 5, 9]], r"box 0 is inverted or empty \(x2 <= x1\)"),
    ([[1, 2, 10 ** 400, 4]], r"box 0 x2 is too large for a float"),
    ([{"label": "person"}], r"box 0 is a dict without a 'bbox_2d'"),
    ([{"bbox_2d": [4, 4, 1, 1]}], r"box 0 is inverted"),
    ([[[[1, 2, 3, 4]]]], r"box 0 has 1 coordinate\(s\)"),
    ([7, 8], r"box 0 is a int \(7\)"),
    ("<answer>person on the left</answer>", r"not a JSON list of boxes"),
    ("<answer>5</answer>", r"expected a list of \[x1, y1, x2, y2\] boxes, got int"),
])
def test_bad_grounding_ground_truth_named(tmp_path, gt, why):
    p = write_json(tmp_path, [entry("good", [[1, 2, 3, 4]]), entry("bad", gt)], name="llvip_x.json")
    with pytest.raises(DataFormatError, match=r"1 malformed sample\(s\)") as err:
        load_eval_json(p)
    msgs = problems_by_id(err)
    assert list(msgs) == ["bad"]
    assert any(re.search(r"bad ground truth for task 'grounding' .*" + why, m) for m in msgs["bad"]), msgs
    assert f"sample bad: bad ground truth for task 'grounding'" in str(err.value)
    # what the loader refuses, the reward refuses too
    with pytest.raises((ValueError, OverflowError)):
        get_reward("grounding")("<think>x</think><answer>[]</answer>", gt)


@pytest.mark.parametrize("gt,task,why", [
    ({"answer": "yes"}, "vqa", r"expected an answer string, got dict"),
    ({"foo": 1}, None, r"task 'vqa' .*got dict"),
    (True, "vqa", r"got bool"),
    (["yes", "no"], "vqa", r"expected one answer \(a string\), got a list of 2"),
    ([["yes"]], "vqa", r"got list"),
    ([[[["deep"]]]], "vqa", r"got list"),
    ("", "vqa", r"has no ground truth"),
    ("   ", None, r"has no ground truth"),
    (None, "mcq", r"has no ground truth"),
    ("<answer></answer>", "vqa", r"the answer is empty"),
    ("<answer>  </answer>", None, r"the answer is empty"),
    ("...", "vqa", r"the answer is empty"),
    ([""], "mcq", r"the answer is empty"),
    (float("nan"), "vqa", r"the answer is nan \(not finite\)"),
    ("yes", "grounding", r"not a JSON list of boxes"),
])
def test_bad_answer_ground_truth_named(tmp_path, gt, task, why):
    good = [[1, 2, 3, 4]] if task == "grounding" else "yes"
    p = write_json(tmp_path, [entry("good", good), entry("bad", gt)])
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p, task=task)
    msgs = problems_by_id(err)
    assert list(msgs) == ["bad"], msgs
    assert re.search(why, msgs["bad"][0]), msgs


def test_forced_task_names_every_mismatch():
    with pytest.raises(DataFormatError) as err:
        load_eval_json(os.path.join(DATA, "llvip_eval.json"), task="vqa")
    assert set(problems_by_id(err)) == {"llvip0", "llvip1", "llvip2"}
    assert "(given as task=)" in str(err.value)


def test_task_argument_and_extra_info_task(tmp_path):
    with pytest.raises(ValueError, match="task must be None, one of"):
        load_eval_json(os.path.join(DATA, "llvip_eval.json"), task="detection")
    p = write_json(tmp_path, [entry("a", "B", extra_info={"sample_id": "a", "task": "vqa"}),
                              entry("b", "yes", extra_info={"sample_id": "b", "task": "mcq"})])
    assert [s.task for s in load_eval_json(p)] == ["vqa", "mcq"]
    p = write_json(tmp_path, [entry("a", "B", extra_info={"sample_id": "a", "task": "boxes"})])
    with pytest.raises(DataFormatError, match=r"sample a: extra_info\['task'\] must be None, one of"):
        load_eval_json(p)


def test_all_problems_listed_together(tmp_path):
    entries = [entry(f"bad{i}", [[i, 0, i - 1, 5]]) for i in range(60)] + [entry("ok", [[0, 0, 1, 1]])]
    entries.append(entry("bad0", [[0, 0, 1, 1]]))  # a duplicate id, in the same error
    entries.append(entry("noimg", "yes", n_images=0))
    p = write_json(tmp_path, entries, name="boxes.json")
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p)
    msg = str(err.value)
    assert "61 malformed sample(s)" in msg
    for i in range(60):
        assert f"sample bad{i}: bad ground truth for task 'grounding'" in msg
    assert "sample bad0: duplicate sample id (first at entry 0)" in msg
    assert "sample noimg: has no images" in msg and "sample ok:" not in msg
    assert err.value.path == os.fspath(p) and len(err.value.problems) == 62


def test_several_problems_of_one_sample(tmp_path):
    e = entry("x", [[3, 3, 1, 1]])
    e["content"][0]["image"] = "missing.png"
    e["content"].append({"type": "image", "image": "https://example.com/a.png"})
    with pytest.raises(DataFormatError) as err:
        load_eval_json(write_json(tmp_path, [e], name="boxes.json"))
    msgs = problems_by_id(err)["x"]
    assert len(msgs) == 3
    assert msgs[0].startswith("image 0: image file not found") and msgs[1].startswith("image 1: remote image URLs")
    assert "box 0 is inverted" in msgs[2]


@pytest.mark.parametrize("bad_id,why", [
    (["a"], r"extra_info\['sample_id'\] must be a non-empty string or an int, got \['a'\]"),
    ("", r"extra_info\['sample_id'\] must be a non-empty string"),
    (True, r"must be a non-empty string or an int, got True"),
    (1.5, r"must be a non-empty string or an int, got 1.5"),
])
def test_bad_sample_ids(tmp_path, bad_id, why):
    p = write_json(tmp_path, [entry("ok", "yes"), entry(bad_id, "yes")])
    with pytest.raises(DataFormatError, match=r"sample 1: .*" + why):
        load_eval_json(p)


def test_extra_info_must_be_a_dict(tmp_path):
    p = write_json(tmp_path, [entry("ok", "yes", extra_info="notes")])
    with pytest.raises(DataFormatError, match="sample 0: extra_info must be a dict, got str"):
        load_eval_json(p)


# ---------------------------------------------------------------- images as one string

def test_image_list_never_iterates_a_string():
    assert image_list("images/a.png") == ["images/a.png"]
    assert image_list(b"\x89PNG") == [b"\x89PNG"]
    assert image_list({"bytes": None, "path": "p.png"}) == [{"bytes": None, "path": "p.png"}]
    assert image_list(None) == [] and image_list(("a", "b")) == ["a", "b"]
    with pytest.raises(ValueError, match="'images' must be a list of image references"):
        image_list(3)


def test_images_string_is_one_image(tmp_path):
    e = {"role": "user", "content": "<image> Is it?", "images": IMG, "ground_truth": "yes", "extra_info": {"id": "s"}}
    s = load_eval_json(write_json(tmp_path, [e]))[0]
    assert s.image_refs == [IMG] and s.num_images == 1 and s.images[0].size == (48, 40)
    e2 = dict(e, content="<image><image> Is it?", extra_info={"id": "t"})
    with pytest.raises(DataFormatError, match=r"sample t: 2 image placeholder\(s\) in the prompt but 1 image\(s\)"):
        load_eval_json(write_json(tmp_path, [e2]))
    e3 = dict(e, images=5, extra_info={"id": "u"})
    with pytest.raises(DataFormatError, match="sample u: 'images' must be a list of image references"):
        load_eval_json(write_json(tmp_path, [e3]))
    r = row("p", "<answer>Yes</answer>", "spatialqa")
    r["images"] = IMG
    s = load_parquet(write_parquet(tmp_path, [r]))[0]
    assert s.image_refs == [IMG]


# ---------------------------------------------------------------- limits

@pytest.mark.parametrize("limit", [-1, -5, 1.5, True, False, "2", [1]])
@pytest.mark.parametrize("name", ["spatialqa_eval.json", "train.parquet"])
def test_bad_limit_is_a_value_error(name, limit):
    with pytest.raises(ValueError, match=r"limit must be None \(all samples\) or an int >= 0, got"):
        load_samples(os.path.join(DATA, name), limit=limit)


@pytest.mark.parametrize("name,n", [("spatialqa_eval.json", 3), ("train.parquet", 4)])
def test_good_limits(tmp_path, name, n):
    p = os.path.join(DATA, name)
    assert len(load_samples(p, limit=None)) == n
    assert load_samples(p, limit=0) == []
    assert len(load_samples(p, limit=np.int64(2))) == 2
    assert len(load_samples(p, limit=n + 10)) == n
    assert [s.id for s in load_samples(p, limit=n - 1)] == [s.id for s in load_samples(p)][: n - 1]


def test_other_options_checked():
    p = os.path.join(DATA, "spatialqa_eval.json")
    with pytest.raises(ValueError, match="check_images must be True or False"):
        load_eval_json(p, check_images="no")
    with pytest.raises(ValueError, match="image_root must be None or a path"):
        load_eval_json(p, image_root=3)


# ---------------------------------------------------------------- JSON lines

def test_jsonl_line_numbers(tmp_path):
    lines = [
        json.dumps(entry("a", "yes")),                  # 1
        "",                                              # 2
        "   ",                                           # 3
        "{not json",                                     # 4
        json.dumps(entry("b", [[5, 5, 1, 1]])),          # 5
        json.dumps(entry("c\u2028d", "yes")),            # 6: U+2028 inside a string is not a line break
        "[1, 2]",                                        # 7
        json.dumps(entry("e", None)),                    # 8
        "[" * 50000,                                     # 9
        json.dumps(entry("a", "no")),                    # 10
    ]
    p = tmp_path / "mixed.jsonl"
    p.write_text("\r\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p)
    probs = err.value.problems
    assert (None, "line 4: not valid JSON (Expecting property name enclosed in double quotes at column 2)") in probs
    assert ("b", next(m for s, m in probs if s == "b")) and next(m for s, m in probs if s == "b").startswith(
        "line 5: bad ground truth for task 'grounding'")
    assert ("4", "line 7: entry is a list, expected a dict") in probs  # no id: the 0-based non-blank line index
    assert ("e", "line 8: has no ground truth") in probs
    assert (None, "line 9: JSON nested too deeply to read") in probs
    assert ("a", "line 10: duplicate sample id (first at line 1)") in probs
    assert not any(s == "c\u2028d" for s, _ in probs)
    msg = str(err.value)
    assert "sample b: line 5: bad ground truth" in msg and "line 4: not valid JSON" in msg
    assert msg.index("line 4:") < msg.index("line 5:") < msg.index("line 9:")  # file order
    # limit counts entries (non-blank lines); lines after it are not read
    assert [s.id for s in load_eval_json(p, limit=1)] == ["a"]
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p, limit=2)
    assert [m for _, m in err.value.problems] == ["line 4: not valid JSON (Expecting property name enclosed in "
                                                  "double quotes at column 2)"]


def test_json_lines_in_a_json_file_hint(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps(entry("a", "yes")) + "\n" + json.dumps(entry("b", "no")) + "\n")
    with pytest.raises(DataFormatError, match=r"not valid JSON .*line 2 column 1.*name the file \.jsonl"):
        load_eval_json(p)


# ---------------------------------------------------------------- file level

@pytest.mark.parametrize("text", ["[" * 100000, '{"data": ' * 100000, "[" * 3000 + "]" * 3000])
def test_deeply_nested_json_names_the_file(tmp_path, text):
    p = tmp_path / "deep.json"
    p.write_text(text)
    with pytest.raises(DataFormatError, match=r"deep\.json: JSON nested too deeply to read") as err:
        load_eval_json(p)
    assert err.value.path == os.fspath(p)


def test_deep_ground_truths_are_sample_errors(tmp_path):
    deep_list = json.loads("[" * 400 + "]" * 400)
    deep_text = "<answer>" + "[" * 100000 + "</answer>"
    p = write_json(tmp_path, [entry("ok", [[0, 0, 2, 2]]), entry("l", deep_list), entry("t", deep_text)], "boxes.json")
    with pytest.raises(DataFormatError) as err:
        load_eval_json(p)
    msgs = problems_by_id(err)
    assert set(msgs) == {"l", "t"}
    assert "box 0 has 1 coordinate(s)" in msgs["l"][0] and len(str(err.value)) < 2000
    assert "task 'vqa'" in msgs["t"][0] or "not a JSON list" in msgs["t"][0]
    with pytest.raises(DataFormatError, match="not a JSON list of boxes"):
        load_eval_json(p, task="grounding", limit=3)


def test_encoding(tmp_path):
    p = tmp_path / "latin.json"
    p.write_bytes(json.dumps([entry("caf\u00e9", "yes")], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin\.json: not UTF-8 text \(byte 0xe9 at offset \d+, line 1\)"):
        load_eval_json(p)
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b"\n\n" + json.dumps(entry("caf\u00e9", "yes"), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"line 3\)"):
        load_eval_json(p)
    p = tmp_path / "bom.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([entry("caf\u00e9", "yes")], ensure_ascii=False).encode("utf-8"))
    assert load_eval_json(p)[0].id == "caf\u00e9"


@pytest.mark.parametrize("text,why", [
    ("3", "expected a JSON list of samples, got int"),
    ("null", "expected a JSON list of samples, got NoneType"),
    ('{"role": "user", "content": []}', r"expected a JSON list of samples \(or \{\"data\": \[...\]\}\), got an object"),
    ('{"data": 3}', "got an object with keys"),
    ("", "not valid JSON"),
    ("[1,]", "not valid JSON"),
])
def test_top_level_not_a_list(tmp_path, text, why):
    p = tmp_path / "top.json"
    p.write_text(text)
    with pytest.raises(DataFormatError, match=why):
        load_eval_json(p)


def test_top_level_data_wrapper_and_empty(tmp_path):
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"data": [entry("a", "yes")]}))
    assert [s.id for s in load_eval_json(p)] == ["a"]
    p.write_text("[]")
    assert load_eval_json(p) == []


def test_missing_files(tmp_path):
    for name in ("nope.json", "nope.jsonl", "nope.parquet"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_samples(tmp_path / name)


def test_parquet_file_problems(tmp_path):
    p = tmp_path / "junk.parquet"
    p.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(DataFormatError, match=r"junk\.parquet: not a readable parquet file"):
        load_parquet(p)
    p = write_parquet(tmp_path, [{"prompt": "x", "images": ["a.png"], "data_source": "a"}], "cols.parquet")
    with pytest.raises(DataFormatError, match=r"cols\.parquet: missing column\(s\) \['reward_model'\]"):
        load_parquet(p)
    p = write_parquet(tmp_path, [dict(row("a", "<answer>Yes</answer>", "spatialqa"), reward_model="Yes")], "s.parquet")
    with pytest.raises(DataFormatError, match="sample a: reward_model must be a struct with 'ground_truth', got str"):
        load_parquet(p)
    rows = [row("a", "<answer>Yes</answer>", "spatialqa", images=(IMG, "gone.png")),
            row("b", "<answer>[[1, 2, 0, 0]]</answer>", "llvip"), row("c", None, "llvip"),
            row("d", "<answer></answer>", "spatialqa"), row("e", "<answer>Yes</answer>", "spatialqa")]
    with pytest.raises(DataFormatError) as err:
        load_parquet(write_parquet(tmp_path, rows, "rm.parquet"))
    msgs = problems_by_id(err)
    assert set(msgs) == {"a", "b", "c", "d"}
    assert msgs["a"] == [f"image 1: image file not found: {os.path.join(str(tmp_path), 'gone.png')}"]
    assert "box 0 is inverted" in msgs["b"][0] and msgs["c"] == ["has no ground truth"]
    assert "the answer is empty" in msgs["d"][0]


def test_parquet_prompt_strings(tmp_path):
    rows = [row("a", "<answer>Yes</answer>", "spatialqa", prompt="<image>Is it 42?"),
            row("c", "<answer>Yes</answer>", "spatialqa",
                prompt=json.dumps([{"role": "user", "content": "<image>Q"}]))]
    samples = load_parquet(write_parquet(tmp_path, rows))
    assert [s.question for s in samples] == ["Is it 42?", "Q"] and [s.num_images for s in samples] == [1, 1]
    # a prompt string that happens to be JSON but not messages is text, not a bad prompt
    rows = [row("b", "<answer>Yes</answer>", "spatialqa", prompt="42")]
    with pytest.raises(DataFormatError, match=r"sample b: 0 image placeholder\(s\) in the prompt but 1 image\(s\)"):
        load_parquet(write_parquet(tmp_path, rows, "b.parquet"))


def test_check_limit():
    from mars.data import check_limit
    assert check_limit(None) is None and check_limit(0) == 0 and check_limit(np.int32(3)) == 3
    for bad in (-1, True, 2.0, "3"):
        with pytest.raises(ValueError, match=r"n_max must be None \(all samples\) or an int >= 0"):
            check_limit(bad, "n_max")


def test_empty_messages(tmp_path):
    p = write_json(tmp_path, [{"messages": [], "ground_truth": "yes", "extra_info": {"id": "m"}}])
    with pytest.raises(DataFormatError, match="sample m: prompt must be a non-empty list of chat messages, got an empty"):
        load_eval_json(p)
