"""The warm start's answers (the cold start RL begins from): which prompts it shows and how
their answers are chosen (warmup.categories, warmup.unsure, warmup.label_noise,
warmup.night_share)."""

import random

import pytest

pytest.importorskip("transformers")

from mars.cli import main as mars_main  # noqa: E402
from mars.train import task as embedded  # noqa: E402
from mars.train.config import TrainConfig  # noqa: E402

FAST = ["task.eval_per_category=1", "rollout.n=2", "optim.prompts_per_step=2", "rollout.max_new_tokens=8",
        "log.progress=false", "log.plot_every=0", "data.eval=null", "max_steps=0", "warmup.batch_size=8"]


def _warm_start_calls(tmp_path, monkeypatch, *overrides):
    """(category, shows one source, label noise) of every warm-start answer of a run but the
    night questions (warmup.night_share, tested below)."""
    import mars.train.warm_start as warm

    real, calls = warm.warmup_target, []

    def target(sample, rng, label_noise=0.0):
        if sample.extra_info.get("question") != "night":
            calls.append((sample.extra_info["category"], "source" in sample.extra_info, label_noise))
        return real(sample, rng, label_noise)

    monkeypatch.setattr(warm, "warmup_target", target)
    assert mars_main(["train", f"output_dir={tmp_path / 'w'}", *FAST, *overrides]) == 0
    return calls


def test_unsure_categories_are_shown_with_both_sources_and_a_coin_flip_answer(tmp_path, monkeypatch):
    calls = _warm_start_calls(tmp_path, monkeypatch, "warmup.steps=6", "warmup.label_noise=0.1",
                              "warmup.unsure=[day_heater]", "warmup.categories=[day_empty]")
    two = [(c, noise) for c, single, noise in calls if not single]
    assert {c for c, _ in two} == {"day_heater", "day_empty"}  # categories + unsure, nothing else
    assert all(noise == 0.5 for c, noise in two if c == "day_heater")
    assert all(noise == 0.1 for c, noise in two if c == "day_empty")
    # one-source prompts keep the label noise whatever their scene (they answer what that source shows)
    assert {noise for c, single, noise in calls if single} == {0.1}


def test_by_default_no_scene_where_the_sources_disagree_is_shown_with_both(tmp_path, monkeypatch):
    calls = _warm_start_calls(tmp_path, monkeypatch, "warmup.steps=4", "warmup.night_share=0")
    assert len(calls) == 4 * 8
    assert {c for c, single, _ in calls if not single} <= {"day_person", "day_empty", "night_empty"}
    assert {noise for *_, noise in calls} == {TrainConfig().warmup.label_noise}


def test_night_share_asks_is_it_night_of_the_rgb_image_alone_answered_with_the_truth(tmp_path, monkeypatch):
    import mars.train.warm_start as warm

    real, seen = warm.warmup_target, []

    def target(sample, rng, label_noise=0.0):
        out = real(sample, rng, label_noise)
        seen.append((sample, label_noise, out))
        return out

    monkeypatch.setattr(warm, "warmup_target", target)
    assert mars_main(["train", f"output_dir={tmp_path / 'w'}", *FAST, "warmup.steps=6",
                      "warmup.night_share=0.5", "warmup.label_noise=0.3"]) == 0
    night = [(s, noise, out) for s, noise, out in seen if s.extra_info.get("question") == "night"]
    assert 12 <= len(night) <= 36  # binomial(48, 0.5): mean 24, sd 3.5
    for s, noise, out in night:
        assert s.question == embedded.NIGHT_QUESTION and len(s.image_refs) == 1
        truth = "yes" if embedded.CATEGORIES[s.extra_info["category"]][0] == "night" else "no"
        assert noise == 0.0 and out == embedded.response_text(truth)
        # the RGB image: a night scene is dark, a day scene is not
        mean = sum(s.image_refs[0].convert("L").getdata()) / (56 * 56 * 255)
        assert (mean < 0.2) == (truth == "yes")
    assert {round(noise, 6) for s, noise, _ in seen if s.extra_info.get("question") != "night"} == {0.3}
    assert {s.extra_info["category"] for s, *_ in night} >= {"night_empty", "day_empty"}


def test_label_noise_one_half_is_a_fair_coin():
    task = embedded.EmbeddedTask({"day_heater": 1.0})
    rng = random.Random(0)
    from mars.train.warm_start import warmup_target

    answers = [warmup_target(task.sample(i), rng, 0.5) for i in range(2000)]
    share_no = sum(a == embedded.response_text("no") for a in answers) / len(answers)
    assert set(answers) == {embedded.response_text("yes"), embedded.response_text("no")}
    assert abs(share_no - 0.5) < 0.05  # binomial sd 0.011


def test_night_both_shows_the_night_question_with_both_sources_rgb_first(tmp_path, monkeypatch):
    import mars.train.warm_start as warm

    real, seen = warm.warmup_target, []

    def target(sample, rng, label_noise=0.0):
        seen.append((sample, label_noise))
        return real(sample, rng, label_noise)

    monkeypatch.setattr(warm, "warmup_target", target)
    assert mars_main(["train", f"output_dir={tmp_path / 'w'}", *FAST, "warmup.steps=4",
                      "warmup.night_share=1", "warmup.night_both=0.5"]) == 0
    assert len(seen) == 32 and all(s.extra_info["question"] == "night" and noise == 0.0 for s, noise in seen)
    both = [s for s, _ in seen if len(s.image_refs) == 2]
    assert 6 <= len(both) <= 26  # binomial(32, 0.5): mean 16, sd 2.8
    for s in both:
        assert s.question == embedded.NIGHT_QUESTION_BOTH and "source" not in s.extra_info
        night = embedded.CATEGORIES[s.extra_info["category"]][0] == "night"
        rgb_mean = sum(s.image_refs[0].convert("L").getdata()) / (56 * 56 * 255)
        assert (rgb_mean < 0.2) == night == (s.ground_truth == "yes")  # image 1 is the RGB one
    assert all(s.question == embedded.NIGHT_QUESTION for s, _ in seen if len(s.image_refs) == 1)
