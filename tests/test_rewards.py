"""mars.rewards: the reference implementation's reward defects as regression tests,
hand-computed grounding values, answer matching, the registry and property tests (any
string -> finite reward within [0, documented max]). The rules: docs/rewards.md; hedges,
degenerate completions and huge numbers: tests/test_rewards_adversarial.py."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from mars.rewards import (
    RewardBreakdown,
    RewardFunctionWarning,
    compute_rewards,
    get_reward,
    list_rewards,
    register_reward,
)
from mars.rewards import registry as _registry
from mars.rewards.answers import answers_match, choice_match, extract_choice, normalize_answer
from mars.rewards.boxes import box_iou, parse_gt_boxes
from mars.rewards.metrics import grounding_metric, sample_metric, vqa_metric

grounding, vqa, mcq = get_reward("grounding"), get_reward("vqa"), get_reward("mcq")
LN2 = 1 + 0.3 * math.log(2)


def g_out(boxes, think="people at left"):
    """A well-formed grounding completion (format part 0.75)."""
    items = ", ".join(f'{{"bbox_2d": {list(b)}, "label": "person"}}' for b in boxes)
    return f"<think>{think}</think><answer>```json\n[{items}]\n```</answer>"


def v_out(answer, think="let me look"):
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------- the reference implementation's defects

@pytest.mark.parametrize("name", ["vqa", "mcq", "grounding"])
@pytest.mark.parametrize("text", ["", "yes", "<think>yes</think>", "<answer>yes", "yes</answer>"])
def test_missing_answer_tag_scores_zero_not_crash(name, text):
    gt = [[0, 0, 10, 10]] if name == "grounding" else "yes"
    b = get_reward(name).breakdown(text, gt)
    assert b.accuracy == 0.0 and b.parse_status == "missing_answer"


@pytest.mark.parametrize("name,gt", [("vqa", "yes"), ("vqa", "two or 2"), ("mcq", "A"), ("grounding", [[0, 0, 9, 9]])])
@pytest.mark.parametrize("answer", ["", "   ", "\n"])
def test_empty_answer_scores_zero(name, gt, answer):
    b = get_reward(name).breakdown(f"<think>hm</think><answer>{answer}</answer>", gt)
    assert b.accuracy == 0.0
    assert b.parse_status == "empty_answer"
    assert b.format == 0.25  # the think tag only: an empty answer earns no format credit


@pytest.mark.parametrize("pred,gt", [("o", "no"), ("o", "two or 2"), ("tw", "two or 2"), ("n", "no"),
                                     ("es", "yes"), ("a", "A cat"), ("no", "not sure")])
def test_substring_answers_do_not_match(pred, gt):
    assert vqa.breakdown(v_out(pred), gt).accuracy == 0.0


def test_letter_a_does_not_match_anything_with_an_a():
    assert mcq.breakdown(v_out("a book about cats"), "A").accuracy == 0.0
    assert mcq.breakdown(v_out("a"), "A").accuracy == 1.0  # a lone letter is a choice


def test_multi_box_sample_does_not_crash_and_scores():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 0, 50, 10]]
    assert grounding(g_out(gt), gt) == pytest.approx(0.75 + 1 + 0.3 * math.log(3))


@pytest.mark.parametrize("box", [[10, 10, 0, 0], [10, 0, 0, 10], [0, 10, 10, 0], [5, 5, 5, 5], [0, 0, 0, 10],
                                 [0, 0, float("nan"), 5], [0, 0, float("inf"), 5], [0, 0, 1e308, 1e308],
                                 [-1e308, -1e308, 1e308, 1e308], ["0", 0, 5, 5], [True, 0, 5, 5], [0, 0, 5], {}])
def test_inverted_degenerate_invalid_boxes_give_iou_zero(box):
    for gt in ([0, 0, 10, 10], [-5, -5, 20, 20]):
        iou = box_iou(box, gt)
        assert iou == 0.0 or (0 < iou <= 1 and math.isfinite(iou))
        assert box_iou(box, gt) == box_iou(gt, box)
    assert box_iou([10, 10, 0, 0], [10, 10, 0, 0]) == 0.0  # the reference gives 1 or NaN here
    assert box_iou([10, 10, 0, 0], [0, 0, 10, 10]) == 0.0  # negative area -> no negative IoU


def test_inverted_boxes_in_reward_are_zero_and_counted():
    gt = [[0, 0, 10, 10]]
    b = grounding.breakdown(g_out([[10, 10, 0, 0]]), gt)
    assert b.accuracy == 0.0 and b.format == 0.75
    # an invalid extra box still counts as a prediction: over-prediction penalty applies
    b = grounding.breakdown(g_out([[0, 0, 10, 10], [10, 10, 0, 0]]), gt)
    assert b.accuracy == pytest.approx(1 - 0.5)


def test_unparsable_grounding_output_counts_zero_in_metric():
    gt = [[0, 0, 10, 10]]
    outputs = [g_out(gt), "<think>x</think> no answer tag", "<answer>```json\n[{bad json\n```</answer>"]
    metrics = [grounding_metric(o, gt) for o in outputs]
    assert [m["correct"] for m in metrics] == [1.0, 0.0, 0.0]
    assert [m["parse_status"] for m in metrics] == ["ok", "missing_answer", "bad_json"]
    from mars.evaluation import summarise
    recs = [{"id": str(i), "task": "grounding", "variant": "multi", "source": None, **m} for i, m in enumerate(metrics)]
    s = summarise(recs)["grounding"]["multi"]
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(1 / 3) and s["unparsable"] == 2
    assert s["miou"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("think,answer,gt,expected", [
    ("There is no cup here... no wait", "Yes", "No", 0.0),
    ("a cookbook and a novel, so answer A", "B", "A", 0.0),
    ("two or 2 people", "three", "two or 2", 0.0),
    ("no", "No.", "No", 1.0),
])
def test_vqa_scores_answer_not_reasoning(think, answer, gt, expected):
    out = v_out(answer, think)
    task = "mcq" if gt in ("A", "B") else "vqa"
    assert get_reward(task).breakdown(out, gt).accuracy == expected
    assert sample_metric(task, out, gt)["correct"] == expected


# ---------------------------------------------------------------- grounding, hand-computed

def test_grounding_single_box_values():
    gt = [[0, 0, 10, 10]]
    assert grounding(g_out([[0, 0, 10, 10]]), gt) == pytest.approx(1.75)
    assert grounding(g_out([[0, 0, 10, 5]]), gt) == pytest.approx(0.75 + 0.5)  # IoU 0.5
    assert grounding(g_out([[0, 0, 10, 4]]), gt) == pytest.approx(0.75 + 0.4)
    assert grounding(g_out([[0, 0, 10, 3]]), gt) == pytest.approx(0.75)  # IoU 0.3 is not > 0.3
    assert grounding(g_out([[0, 0, 10, 2]]), gt) == pytest.approx(0.75)  # IoU 0.2 below threshold
    assert grounding(g_out([]), gt) == pytest.approx(0.75)


def test_grounding_several_boxes_values():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert grounding(g_out(gt), gt) == pytest.approx(0.75 + LN2)
    # order does not matter (Hungarian matching)
    assert grounding(g_out(gt[::-1]), gt) == pytest.approx(0.75 + LN2)
    # one exact, one IoU 0.5
    assert grounding(g_out([[0, 0, 10, 10], [20, 20, 30, 25]]), gt) == pytest.approx(0.75 + 1.5 / 2 * LN2)
    # under-prediction: one of two found
    assert grounding(g_out([[20, 20, 30, 30]]), gt) == pytest.approx(0.75 + 0.5 * LN2)
    # over-prediction: 3 boxes for 2, penalty min(0.5 * 1/2, 1) = 0.25
    assert grounding(g_out(gt + [[50, 50, 60, 60]]), gt) == pytest.approx(0.75 + LN2 - 0.25)
    # 6 boxes for 2: penalty capped at 1
    many = gt + [[50 + i, 50, 60 + i, 60] for i in range(4)]
    assert grounding(g_out(many), gt) == pytest.approx(0.75 + LN2 - 1)
    # floored at zero: 10 wrong boxes
    assert grounding.breakdown(g_out([[100 + i, 100, 110 + i, 110] for i in range(10)]), gt).accuracy == 0.0


def test_grounding_single_gt_over_prediction():
    gt = [[0, 0, 10, 10]]
    # 2 predictions for 1 gt: penalty min(0.5 * 1, 1) = 0.5
    assert grounding(g_out([[0, 0, 10, 10], [50, 50, 60, 60]]), gt) == pytest.approx(0.75 + 0.5)
    assert grounding(g_out([[0, 0, 10, 10]] * 3), gt) == pytest.approx(0.75)  # penalty 1


def test_grounding_format_part():
    gt = [[0, 0, 10, 10]]
    body = '```json\n[{"bbox_2d": [0, 0, 10, 10]}]\n```'
    assert grounding.breakdown(f"<think>x</think><answer>{body}</answer>", gt).format == 0.75
    assert grounding.breakdown(f"<think> </think><answer>{body}</answer>", gt).format == 0.5
    assert grounding.breakdown(f"<answer>{body}</answer>", gt).format == 0.5
    assert grounding.breakdown(f"<think>x</think><answer>{body}{body}</answer>", gt).format == 0.5
    assert grounding.breakdown(f"<think>x</think><think>y</think><answer>{body}</answer>", gt).format == 0.5
    # no fence: no json-block credit, but the boxes are still read from the answer
    b = grounding.breakdown('<think>x</think><answer>[{"bbox_2d": [0, 0, 10, 10]}]</answer>', gt)
    assert b.format == 0.5 and b.accuracy == 1.0
    # boxes outside the answer are not read
    b = grounding.breakdown(f"<think>{body}</think><answer>none</answer>", gt)
    assert b.accuracy == 0.0 and b.parse_status == "bad_json"


def test_grounding_prediction_and_ground_truth_forms():
    gt = [[0, 0, 10, 10]]
    single_quotes = "<think>x</think><answer>```json\n[{'bbox_2d': [0, 0, 10, 10], 'label': 'person'}]\n```</answer>"
    assert grounding(single_quotes, gt) == pytest.approx(1.75)
    bare = "<think>x</think><answer>```json\n[[0, 0, 10, 10]]\n```</answer>"
    assert grounding(bare, gt) == pytest.approx(1.75)
    one_dict = '<think>x</think><answer>```json\n{"bbox_2d": [0, 0, 10, 10]}\n```</answer>'
    assert grounding(one_dict, gt) == pytest.approx(1.75)
    out = g_out(gt)
    for form in ("<answer>[[0, 0, 10, 10]]</answer>", "[[0,0,10,10]]", [{"bbox_2d": [0, 0, 10, 10]}], [0, 0, 10, 10]):
        assert grounding(out, form) == pytest.approx(1.75)
    assert grounding(g_out([]), []) == pytest.approx(1.75)  # nothing to find, nothing predicted
    assert grounding(g_out(gt), []) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", ["<answer>not json</answer>", [[10, 10, 0, 0]], [[0, 0, 1]], 5, "[[0, 0, \"a\", 3]]"])
def test_bad_grounding_ground_truth_raises(bad):
    with pytest.raises(ValueError, match="ground truth"):
        grounding(g_out([[0, 0, 10, 10]]), bad)
    with pytest.raises(ValueError, match="ground truth"):
        parse_gt_boxes(bad)


def test_grounding_metric_miou():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    m = grounding_metric(g_out([[0, 0, 10, 10], [20, 20, 30, 25]]), gt)
    assert m["miou"] == pytest.approx(0.75) and m["correct"] == 1.0
    m = grounding_metric(g_out([[0, 0, 10, 10]]), gt)  # mIoU exactly 0.5 is not > 0.5
    assert m["miou"] == pytest.approx(0.5) and m["correct"] == 0.0
    m = grounding_metric(g_out(gt + [[40, 40, 50, 50]] * 5), gt)  # extra boxes not penalised
    assert m["miou"] == pytest.approx(1.0)


# ---------------------------------------------------------------- VQA / MCQ matching

@pytest.mark.parametrize("pred,gt,ok", [
    ("Yes", "Yes", True), ("yes.", "Yes", True), ("Yes, it is within reach", "Yes", True),
    ("It is reachable, so yes", "yes", True), ("No", "Yes", False), ("no", "No", True),
    ("2", "two or 2", True), ("two", "two or 2", True), ("Two.", "two or 2", True), ("two or 2", "two or 2", True),
    ("3", "two or 2", False), ("White", "white", True), ("the white car", "white car", True),
    ("3.5 m", "3.5 m", True), ("35 m", "3.5 m", False), ("left-front", "left front", True),
    # hedges name more than one option: never a match (docs/rewards.md, "Hedged answers")
    ("yes or no", "yes", False), ("Yes/No", "no", False), ("yes, no", "yes", False), ("2 or 3", "two or 2", False),
    ("2 or two", "two or 2", True), ("No, there is not.", "no", True),
])
def test_vqa_matching(pred, gt, ok):
    assert answers_match(pred, gt) is ok
    assert vqa.breakdown(v_out(pred), gt).accuracy == float(ok)


@pytest.mark.parametrize("text,letter", [
    ("A", "A"), ("(b)", "B"), ("C.", "C"), ("[D]", "D"), ("B. No, one is a novel", "B"), ("(C) travel", "C"),
    ("The answer is D", "D"), ("Answer: B", "B"), ("option (A)", "A"), ("a book", None), ("Both are novels", None),
    ("", None),
])
def test_choice_extraction(text, letter):
    assert extract_choice(text) == letter


def test_mcq_reward():
    assert mcq(v_out("B. No, one is a novel"), "B") == pytest.approx(1.5)
    for hedge in ("A or B", "(A)(B)", "A, B", "Answer: B or C", "B. red or C. blue"):
        assert mcq(v_out(hedge), "B") == pytest.approx(0.5), hedge  # format only
    assert mcq(v_out("(b)"), "<answer>B</answer>") == pytest.approx(1.5)
    assert mcq(v_out("C"), "B") == pytest.approx(0.5)
    assert choice_match("yes, both", "yes, both") is True  # no letter in the ground truth: text match


def test_vqa_format_part():
    assert vqa.breakdown("<think>a</think><answer>yes</answer>", "yes").format == 0.5
    assert vqa.breakdown("<think></think><answer>yes</answer>", "yes").format == 0.25
    assert vqa.breakdown("<answer>yes</answer><answer>yes</answer>", "yes").format == 0.0
    assert vqa("<think>a</think><answer>yes</answer>", "<answer>Yes</answer>") == pytest.approx(1.5)


def test_normalize_answer():
    assert normalize_answer("  The  Two Cars. ") == "2 cars"
    assert normalize_answer("a") == "a"
    assert normalize_answer("1,000") == "1,000"


@pytest.mark.parametrize("bad", ["", "   ", "<answer></answer>", None, {"x": 1}])
def test_bad_vqa_ground_truth_raises(bad):
    with pytest.raises(ValueError, match="ground truth"):
        vqa(v_out("yes"), bad)


def test_vqa_metric():
    m = vqa_metric(v_out("B"), "B", multiple_choice=True)
    assert m == {"correct": 1.0, "parse_status": "ok", "answer": "B"}
    with pytest.raises(ValueError, match="no evaluation metric"):
        sample_metric("captioning", "x", "y")


# ---------------------------------------------------------------- registry

@pytest.fixture
def clean_registry():
    before = dict(_registry._REGISTRY)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(before)


def test_builtins_registered():
    assert {"grounding", "vqa", "mcq"} <= set(list_rewards())
    assert vqa.max_reward() == 1.5 and mcq.max_reward("A") == 1.5
    assert grounding.max_reward([[0, 0, 1, 1]] * 3) == pytest.approx(1.75 + 0.3 * math.log(3))
    with pytest.raises(ValueError, match="unknown reward 'nope'.*grounding"):
        get_reward("nope")


def test_user_reward_one_decorator(clean_registry):
    @register_reward("length_test")
    def length_reward(completion, ground_truth):
        """Shorter is better."""
        return 1.0 / (1 + len(completion))

    assert get_reward("length_test") is length_reward
    assert length_reward("abc", None) == pytest.approx(0.25)
    assert get_reward("length_test").batch(["", "abc"], [None, None]) == pytest.approx([1.0, 0.25])
    assert compute_rewards("length_test", ["a"], [0]) == pytest.approx([0.5])
    assert compute_rewards(lambda c, g: 2.0, ["a"], [0]) == [2.0]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_test")(lambda c, g: 0.0)
    register_reward("length_test", overwrite=True)(lambda c, g: 0.0)
    assert get_reward("length_test")("abc", None) == 0.0


def test_user_reward_returning_breakdown(clean_registry):
    @register_reward("bd_test")
    def bd(completion, ground_truth):
        return RewardBreakdown(0.5, 1.0, "ok", {"x": 1})

    assert bd("x", None) == 1.5
    assert bd.batch(["x"], [None], return_breakdowns=True)[0].details == {"x": 1}


def test_raising_reward_reported_with_sample_id(clean_registry):
    @register_reward("flaky_test")
    def flaky(completion, ground_truth):
        if ground_truth == "boom":
            raise KeyError("missing field")
        if ground_truth == "nan":
            return float("nan")
        return 1.0

    with pytest.raises(KeyError):  # the single call never hides the error
        flaky("x", "boom")
    with pytest.raises(ValueError, match="non-finite"):
        flaky("x", "nan")
    with pytest.warns(RewardFunctionWarning) as caught:
        out = flaky.batch(["a", "b", "c"], ["ok", "boom", "nan"], sample_ids=["s1", "s2", "s3"],
                          return_breakdowns=True)
    assert [b.total for b in out] == [1.0, 0.0, 0.0]
    assert out[1].parse_status.startswith("error: KeyError")
    msgs = [str(w.message) for w in caught]
    assert any("'s2'" in m and "KeyError" in m and "counted as reward 0" in m for m in msgs)
    assert any("'s3'" in m and "non-finite" in m for m in msgs)


def test_batch_checks_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        vqa.batch(["a", "b"], ["yes"])
    with pytest.raises(ValueError, match="sample_ids"):
        vqa.batch(["a"], ["yes"], sample_ids=[1, 2])


def test_builtin_batch_with_bad_ground_truth_warns_not_crashes():
    with pytest.warns(RewardFunctionWarning, match="'bad-gt'"):
        out = grounding.batch([g_out([[0, 0, 1, 1]])] * 2, [[[0, 0, 1, 1]], [[5, 5, 0, 0]]], ["good", "bad-gt"])
    assert out == pytest.approx([1.75, 0.0])


# ---------------------------------------------------------------- properties

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "```json", "```", "\n", " ", "[", "]", "{", "}",
             '"bbox_2d"', "'bbox_2d'", ":", ",", "0", "10", "-3", "1e308", "NaN", "Infinity", "5.5", "yes", "no",
             "A", "(B)", "two", "2", "or", "person", '"label"', "null", "true", "x"]
texty = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40).map("".join),
)
coord = st.integers(0, 200)
gt_boxes = st.lists(st.tuples(coord, coord, st.integers(1, 100), st.integers(1, 100))
                    .map(lambda t: [t[0], t[1], t[0] + t[2], t[1] + t[3]]), min_size=1, max_size=6)
pred_boxes = st.lists(st.lists(st.one_of(st.integers(-50, 300), st.floats(allow_nan=True, allow_infinity=True)),
                               min_size=4, max_size=4), max_size=12)


@settings(max_examples=150, deadline=None)
@given(text=texty, gt=st.sampled_from(["yes", "No", "two or 2", "white", "A", "C", "3.5 m"]))
def test_vqa_mcq_reward_bounded(text, gt):
    for rf in (vqa, mcq):
        r = rf(text, gt)
        assert math.isfinite(r) and 0.0 <= r <= 1.5


@settings(max_examples=150, deadline=None)
@given(text=texty, gt=gt_boxes)
def test_grounding_reward_bounded_any_text(text, gt):
    r = grounding(text, gt)
    assert math.isfinite(r) and 0.0 <= r <= 0.75 + 1 + 0.3 * math.log(len(gt)) + 1e-12


@settings(max_examples=150, deadline=None)
@given(preds=pred_boxes, gt=gt_boxes, think=st.text(max_size=20))
def test_grounding_reward_bounded_any_boxes(preds, gt, think):
    import json
    text = f"<think>{think}</think><answer>```json\n{json.dumps([{'bbox_2d': p} for p in preds])}\n```</answer>"
    r = grounding(text, gt)
    assert math.isfinite(r) and 0.0 <= r <= grounding.max_reward(gt) + 1e-12
    m = grounding_metric(text, gt)
    assert 0.0 <= m["miou"] <= 1.0 + 1e-12


def test_verl_compute_score_dispatch():
    from mars.rewards import compute_score
    out = "<think>x</think><answer>B</answer>"
    assert compute_score("OCR-VQA", out, "<answer>B</answer>") == 1.5
    assert compute_score("spatialqa", v_out("yes"), "<answer>Yes</answer>", {"index": 0}) == 1.5
    assert compute_score("llvip", g_out([[0, 0, 10, 10]]), "<answer>[[0, 0, 10, 10]]</answer>") == pytest.approx(1.75)
    assert compute_score("anything", out, "B", {"task": "vqa"}) == 1.5
    with pytest.raises(ValueError, match="unknown reward"):
        compute_score("x", out, "B", {"reward": "nope"})
