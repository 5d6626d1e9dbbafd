"""mars.evaluate / mars eval: scores, mono scores and information gain with a scripted
engine (known answers), files written, errors; and end to end with a tiny local model."""

import json
import os
import sys

import pytest

from mars.data import DataFormatError, load_eval_json
from mars.evaluation import cli_main, evaluate, summarise
from mars.rollout import RolloutEngine

DATA = os.path.join(os.path.dirname(__file__), "data")


def path(name):
    return os.path.join(DATA, name)


def box_answer(boxes):
    return "<think>people</think><answer>```json\n" + json.dumps([{"bbox_2d": b} for b in boxes]) + "\n```</answer>"


class Scripted(RolloutEngine):
    """Answers from ``script[(id, source)]`` (source None = multi-source input)."""

    def __init__(self, script, batch_size=2):
        self.script, self.batch_size, self.calls = script, batch_size, []

    def generate(self, samples, config):
        self.calls.append([(s.id, s.variant, s.source_index, s.num_images) for s in samples])
        return [[self.script[(s.id, s.source_index)]] for s in samples]


def spatial_script():
    # multi: all right; source 0: 2/3 right; source 1: 0/3 (one without answer tag)
    a = lambda x: f"<think>depth says so</think><answer>{x}</answer>"  # noqa: E731
    return {
        ("spatial0", None): a("Yes"), ("spatial0", 0): a("Yes"), ("spatial0", 1): a("No"),
        ("spatial1", None): a("No."), ("spatial1", 0): a("no"), ("spatial1", 1): "I think no",
        ("spatial2", None): a("no"), ("spatial2", 0): a("Yes"), ("spatial2", 1): a("Yes"),
    }


def test_vqa_mono_scores_and_gain(tmp_path):
    engine = Scripted(spatial_script())
    res = evaluate(engine, path("spatialqa_eval.json"), mono=True, output_dir=tmp_path, progress=False)
    t = res.summary["tasks"]["vqa"]
    assert t["n"] == 3 and t["multi"]["accuracy"] == pytest.approx(1.0)
    assert t["mono"]["0"]["accuracy"] == pytest.approx(2 / 3) and t["mono"]["1"]["accuracy"] == 0.0
    assert t["mono"]["1"]["unparsable"] == 1
    assert t["gain"] == pytest.approx(1 - (2 / 3 + 0) / 2)
    assert t["gain_vs_best"] == pytest.approx(1 / 3)
    # mono inputs are the duplicate variants: same number of image slots
    assert {c[3] for call in engine.calls for c in call} == {2}
    assert max(len(c) for c in engine.calls) == 2  # batches of engine.batch_size
    lines = [json.loads(x) for x in open(tmp_path / "predictions.jsonl")]
    assert len(lines) == 9 and {x["variant"] for x in lines} == {"multi", "mono-duplicate"}
    first = lines[0]
    assert first["id"] == "spatial0" and first["correct"] == 1.0 and first["reward"] == pytest.approx(1.5)
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["tasks"]["vqa"]["gain"] == pytest.approx(t["gain"])
    table = open(tmp_path / "summary.md").read()
    assert "source 1" in table and "information gain: +66.67 pts vs mean single source" in table
    assert res.table in table


def test_mono_single_mode():
    engine = Scripted(spatial_script())
    evaluate(engine, path("spatialqa_eval.json"), mono=True, mono_mode="single", progress=False)
    kinds = {(c[1], c[3]) for call in engine.calls for c in call}
    assert kinds == {("multi", 2), ("mono-single", 1)}


def test_grounding_metric_counts_unparsable(tmp_path):
    gts = {s.id: s.ground_truth for s in load_eval_json(path("llvip_eval.json"))}
    script = {
        ("llvip0", None): box_answer(gts["llvip0"]),  # mIoU 1
        ("llvip1", None): "<think>two people</think>",  # unparsable: counts 0
        ("llvip2", None): box_answer(gts["llvip2"][:1]),  # mIoU 1/3
    }
    res = evaluate(Scripted(script), path("llvip_eval.json"), progress=False)
    m = res.summary["tasks"]["grounding"]["multi"]
    assert m["n"] == 3 and m["accuracy"] == pytest.approx(1 / 3)  # not 1/2
    assert m["miou"] == pytest.approx((1 + 0 + 1 / 3) / 3) and m["unparsable"] == 1
    assert [r["parse_status"] for r in res.records] == ["ok", "missing_answer", "ok"]
    assert res.output_dir is None


def test_mcq_answer_only_and_limit():
    a = "<think>a cookbook, a novel</think><answer>{}</answer>"
    script = {("ocr0", None): a.format("A"), ("ocr1", None): a.format("D")}
    res = evaluate(Scripted(script), path("OCR-VQA_eval.json"), limit=2, progress=False)
    assert res.summary["n_samples"] == 2
    assert res.summary["tasks"]["mcq"]["multi"]["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("limit", [-1, -2, 1.5, True, "2"])
def test_bad_limit_refused_for_paths_and_sample_lists(limit):
    """limit=-1 on a list must not silently drop the last sample (list(data)[:-1])."""
    samples = load_eval_json(path("spatialqa_eval.json"))
    for data in (samples, path("spatialqa_eval.json")):
        with pytest.raises(ValueError, match="limit must be"):
            evaluate(Scripted({}), data, limit=limit, progress=False)


def test_samples_list_and_task_override():
    samples = load_eval_json(path("spatialqa_eval.json"))
    script = {(s.id, None): "<think>x</think><answer>Yes</answer>" for s in samples}
    res = evaluate(Scripted(script), samples, task="vqa", progress=False)
    assert res.summary["tasks"]["vqa"]["multi"]["accuracy"] == pytest.approx(1 / 3)


def test_bad_ground_truth_reported_before_generation(tmp_path):
    entries = json.load(open(path("llvip_eval.json")))
    for e in entries:
        for part in e["content"]:
            if part["type"] == "image":
                part["image"] = os.path.join(DATA, part["image"])
    entries[1]["ground_truth"] = [[10, 10, 0, 0]]
    p = tmp_path / "llvip_bad.json"
    p.write_text(json.dumps(entries))
    engine = Scripted({})
    with pytest.raises(DataFormatError, match="sample llvip1: bad ground truth for task 'grounding'"):
        evaluate(engine, p, progress=False)
    assert engine.calls == []


def test_options_checked():
    with pytest.raises(ValueError, match="mono_mode"):
        evaluate(Scripted({}), path("spatialqa_eval.json"), mono=True, mono_mode="blank")
    with pytest.raises(ValueError, match="no samples"):
        evaluate(Scripted({}), [])


def test_summarise_variable_sources():
    recs = [
        {"id": "a", "task": "vqa", "variant": "multi", "source": None, "correct": 1.0, "parse_status": "ok"},
        {"id": "a", "task": "vqa", "variant": "mono-duplicate", "source": 0, "correct": 0.0, "parse_status": "ok"},
        {"id": "a", "task": "vqa", "variant": "mono-duplicate", "source": 1, "correct": 1.0, "parse_status": "ok"},
        {"id": "b", "task": "vqa", "variant": "multi", "source": None, "correct": 0.0, "parse_status": "ok"},
        {"id": "b", "task": "vqa", "variant": "mono-duplicate", "source": 0, "correct": 0.0, "parse_status": "ok"},
    ]
    s = summarise(recs)["vqa"]
    assert s["mono"]["0"]["n"] == 2 and s["mono"]["1"]["n"] == 1
    assert s["gain"] == pytest.approx(((1 - 0.5) + (0 - 0)) / 2)


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["--help"]) == 0
    assert cli_main(["--data", "x.json"]) == 2  # --model missing
    rc = cli_main(["--model", "m", "--data", str(tmp_path / "missing.json"), "--output", str(tmp_path / "o")])
    assert rc == 1 and "mars eval: error:" in capsys.readouterr().err
    rc = cli_main(["--model", "m", "--data", path("bad_train.parquet"), "--output", str(tmp_path / "o")])
    assert rc == 1 and "sample 1: 2 image placeholder(s)" in capsys.readouterr().err


def test_cli_end_to_end_tiny_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    sys.path.insert(0, DATA)
    from tiny_vlm import save_tiny_vlm

    model_dir = save_tiny_vlm(tmp_path / "tiny")
    out = tmp_path / "out"
    rc = cli_main(["--model", str(model_dir), "--data", path("spatialqa_eval.json"), "--mono", "--backend", "hf",
                   "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "2", "--output", str(out),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "information gain" in printed and "source 0" in printed
    lines = [json.loads(x) for x in open(out / "predictions.jsonl")]
    assert len(lines) == 3 * 3 and all(isinstance(x["output"], str) for x in lines)
    summary = json.load(open(out / "summary.json"))
    t = summary["tasks"]["vqa"]
    assert t["n"] == 3 and 0 <= t["multi"]["accuracy"] <= 1 and set(t["mono"]) == {"0", "1"}
    assert summary["model"] == str(model_dir)


def test_evaluate_tiny_model_grounding_progress_bar(tmp_path, capsys):
    pytest.importorskip("transformers")
    sys.path.insert(0, DATA)
    from tiny_vlm import build_tiny_vlm
    from mars.rollout import HFEngine

    model, tok, improc = build_tiny_vlm()
    res = evaluate(HFEngine(model, tokenizer=tok, image_processor=improc), path("llvip_eval.json"),
                   max_new_tokens=3, progress=True)
    assert "mars eval" in capsys.readouterr().err  # tqdm bar
    m = res.summary["tasks"]["grounding"]["multi"]
    assert m["n"] == 3 and m["accuracy"] == 0.0 and m["unparsable"] == 3  # gibberish counts 0
