"""`mars bench`: the --quick smoke run (files written and parseable; no timing asserts), the
argument errors, and the logic that turns timings into ratios and goals (docs/bench.md)."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mars.bench import main
from mars.bench import cases as C
from mars.bench import goals as G
from mars.bench.run import rel_error, run_size
from mars.bench.timer import QUICK, Plan, measure, quantile, summarize

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--output", str(out), "--quiet"])
    return rc, out


def test_quick_run_succeeds_and_writes_every_file(quick_run):
    rc, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    errors = {(op, g["size"]): g.get("errors") for op, e in doc["ops"].items()
              for g in e["groups"] if g.get("errors")}
    assert rc == 0, errors
    assert doc["schema"] == "mars-bench/1" and doc["mode"] == "quick" and "filters" not in doc
    assert doc["device"]["type"] == "cpu"
    assert set(doc["ops"]) == set(C.OPS)
    for key in ("python", "torch", "triton", "mars", "verl", "liger-kernel", "cut-cross-entropy"):
        assert key in doc["versions"]
    assert doc["versions"]["torch"] == torch.__version__
    md = (out / "results.md").read_text()
    assert md.startswith("# mars bench:")
    assert torch.__version__ in md and "| impl | median |" in md
    assert set(doc["plots"]) == set(C.OPS)
    for rel in doc["plots"].values():
        assert (out / rel).read_bytes()[:8] == PNG
        assert f"]({rel})" in md


def test_quick_run_times_every_mars_impl_against_the_reference(quick_run):
    rc, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    for name, entry in doc["ops"].items():
        op = C.get_op(name)
        (group,) = entry["groups"]                     # --quick: the smallest shape only
        assert group["size"] == op.sizes("cpu", True)[0].name
        res = group["results"]
        assert "reference" in res
        for impl in op.impls_for("cpu", quick=True):
            if impl.kind == "mars":
                r = res[impl.name]
                assert r["median_s"] > 0 and r["min_s"] <= r["median_s"]
                assert r["rounds"] >= QUICK.min_rounds and r["iqr_s"] >= 0
                assert r["err"] is not None and r["err"] <= op.tolerance(C.get_size(op, group["size"], "cpu"))
                if op.memory:
                    assert r["peak_bytes"] > 0
        base = res[entry["baseline"]]
        assert base["time_vs_mars"] == 1.0
        for impl, r in res.items():
            if "median_s" in r:
                assert math.isclose(r["time_vs_mars"], r["median_s"] / base["median_s"],
                                    rel_tol=1e-2)
        # the quick run leaves out what compiles, and says so
        assert "compile-reference" in group["skipped"]


def test_quick_markdown_lists_skips_with_their_reason(quick_run):
    _, out = quick_run
    md = (out / "results.md").read_text()
    assert "skipped `compile-reference`: not in --quick runs" in md
    assert "skipped `liger`: Liger's fused linear cross-entropy is a Triton kernel" in md


def test_filters_and_no_plots(tmp_path):
    rc = main(["--quick", "--op", "advantage", "--impl", "mars-int", "--impl", "reference",
               "--no-plots", "--output", str(tmp_path), "--quiet"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert list(doc["ops"]) == ["advantage"]
    assert set(doc["ops"]["advantage"]["groups"][0]["results"]) == {"mars-int", "reference"}
    assert doc["plots"] == {} and doc["plots_note"] == "--no-plots"
    assert doc["filters"] == {"op": ["advantage"], "impl": ["mars-int", "reference"]}
    assert "- only: op advantage; impl mars-int, reference" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "plots").exists()


def test_a_size_filter_of_one_op_plots_that_op_only(tmp_path):
    """--size of the advantage without --op: the other ops run no shape; they get an empty
    entry and no plot (plotting them crashed in plt.subplots(1, 0))."""
    assert main(["--quick", "--size", "64x(8+2)", "--impl", "mars-int", "--impl", "reference",
                 "--output", str(tmp_path), "--quiet"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [k for k, o in doc["ops"].items() if o["groups"]] == ["advantage"]
    assert doc["plots"] == {"advantage": "plots/advantage_cpu.png"}


def test_results_are_rewritten_after_every_shape(tmp_path, monkeypatch):
    """The files on disk during a run: after shape k of N, results.json holds k shapes and
    says "k of N shapes measured" (so a killed run keeps them); the finished run's files
    have no such mark."""
    from mars.bench import run as R
    seen = []
    real = R.run_size

    def spy(*a, **k):
        path = tmp_path / "results.json"
        if path.exists():
            d = json.loads(path.read_text())
            seen.append((d.get("incomplete"), sum(len(o["groups"]) for o in d["ops"].values())))
        return real(*a, **k)

    monkeypatch.setattr(R, "run_size", spy)
    assert main(["--quick", "--op", "policy_loss", "--op", "advantage", "--impl", "reference",
                 "--no-plots", "--output", str(tmp_path), "--quiet"]) == 0
    assert seen == [("0 of 2 shapes measured", 0), ("1 of 2 shapes measured", 1)]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "incomplete" not in doc and "interrupted" not in doc
    assert [len(o["groups"]) for o in doc["ops"].values()] == [1, 1]
    assert "incomplete" not in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_with_what_was_measured_written(signum, tmp_path, monkeypatch, capsys):
    """SIGTERM (what `timeout` sends) or SIGINT during the second shape: exit 128 + signal,
    results.json / results.md / plots of the first shape, marked interrupted; the goals of
    the shape not reached are "not measured"."""
    import os
    import signal

    from mars.bench import run as R
    sig = getattr(signal, signum)
    real, calls = R.run_size, []

    def second_is_killed(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # delivered to this (main) thread: the handler raises
        return real(*a, **k)

    monkeypatch.setattr(R, "run_size", second_is_killed)
    before = signal.getsignal(signal.SIGTERM)
    rc = main(["--quick", "--op", "advantage", "--op", "policy_loss", "--impl", "reference",
               "--impl", "mars-int", "--impl", "mars-cpu", "--output", str(tmp_path), "--quiet"])
    assert rc == 128 + sig
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["interrupted"] == f"{signum}, 1 of 2 shapes measured"
    assert [len(o["groups"]) for o in doc["ops"].values()] == [1, 0]
    assert "mars-int" in doc["ops"]["advantage"]["groups"][0]["results"]
    assert (tmp_path / "plots" / "advantage_cpu.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "plots" / "policy_loss_cpu.png").exists()
    assert f"**interrupted** ({signum}, 1 of 2 shapes measured)" in (tmp_path / "results.md").read_text()
    assert f"stopped by {signum} (1 of 2 shapes measured)" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--op", "nope"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--op", "advantage", "--impl", "nope"], "--impl 'nope' is not an implementation"),
    (["--quick", "--op", "advantage", "--size", "9x(9+9)"], "--size '9x(9+9)' is not a quick shape"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments_return_2_and_say_why(argv, needle, tmp_path, capsys):
    assert main(argv + ["--output", str(tmp_path)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_returns_2(tmp_path, capsys):
    assert main(["--device", "cuda", "--output", str(tmp_path)]) == 2
    assert "no GPU is visible" in capsys.readouterr().err


def _toy_op(wrong: bool, kind: str = "mars"):
    """An op whose 'mars' impl returns the reference's numbers, or wrong ones."""
    def inputs(size, device):
        return {"x": torch.arange(8.0)}
    ref = C.Impl("reference", "reference", lambda inp, s, d: C.Call(lambda: (inp["x"] * 2,)))
    fast = C.Impl("mars", kind, lambda inp, s, d: C.Call(
        lambda: (inp["x"] * 2 + (0.1 if wrong else 0.0),)))
    return C.Op(name="toy", title="toy", what="", sizes=lambda d, q: [C.Size("8", "small", {}, 8)],
                inputs=inputs, impls=[ref, fast], baseline=lambda d: "mars")


@pytest.mark.parametrize("wrong", [False, True])
def test_a_mars_impl_that_differs_from_the_reference_is_an_error(wrong):
    op = _toy_op(wrong)
    g = run_size(op, op.sizes("cpu", True)[0], "cpu", QUICK, True, None, {}, lambda m: None)
    assert "median_s" in g["results"]["mars"]              # timed, and flagged
    if wrong:
        assert "differs from the reference" in g["errors"]["mars"]
        assert g["results"]["mars"]["err"] == pytest.approx(0.1 / 14, rel=1e-2)
    else:
        assert "errors" not in g and g["results"]["mars"]["err"] == 0


def test_a_peer_that_differs_is_reported_not_an_error():
    op = _toy_op(True, kind="peer")
    g = run_size(op, op.sizes("cpu", True)[0], "cpu", QUICK, True, None, {}, lambda m: None)
    assert "errors" not in g and g["results"]["mars"]["err"] > 0


def test_rel_error():
    a = torch.tensor([1.0, 2.0])
    assert rel_error((a,), (a,)) == 0
    assert rel_error((a + torch.tensor([0.0, 0.2]),), (a,)) == pytest.approx(0.1)
    assert rel_error((torch.tensor([float("nan"), 2.0]),), (a,)) == math.inf
    with pytest.raises(ValueError, match="shape"):
        rel_error((a[:1],), (a,))
    with pytest.raises(ValueError, match="None"):
        rel_error((None,), (a,))


def _doc(results: dict, size: str = G.ADV, op: str = "advantage", device: str = "cpu"):
    return {"device": {"type": device},
            "ops": {op: {"groups": [{"size": size, "results": results}]}}}


@settings(max_examples=50, deadline=None)
@given(a=st.floats(1e-7, 10), b=st.floats(1e-7, 10), target=st.floats(0.1, 2000))
def test_speedup_goal_is_met_iff_the_ratio_reaches_the_target(a, b, target):
    goal = G.Goal("advantage", "cpu", G.ADV, "speedup", "mars-int", target, "loop-int")
    r = G.evaluate(goal, _doc({"mars-int": {"median_s": a}, "loop-int": {"median_s": b}}))
    assert r["measured"] == pytest.approx(b / a)
    assert r["status"] == ("met" if b / a >= target else "not met")
    assert r["margin"] == pytest.approx(b / a / target)


@settings(max_examples=50, deadline=None)
@given(pa=st.integers(1, 10**10), pb=st.integers(1, 10**10), target=st.floats(0.05, 2))
def test_memory_goal_is_met_iff_the_ratio_stays_under_the_target(pa, pb, target):
    goal = G.Goal("fused_lm_head", "cpu", G.HEAD_CPU, "memory_ratio", "mars", target, "reference")
    res = {"mars": {"median_s": 1.0, "peak_bytes": pa}, "reference": {"median_s": 1.0,
                                                                      "peak_bytes": pb}}
    r = G.evaluate(goal, _doc(res, G.HEAD_CPU, "fused_lm_head"))
    assert r["measured"] == pytest.approx(pa / pb)
    assert r["status"] == ("met" if pa / pb <= target else "not met")
    assert r["margin"] == pytest.approx(target / (pa / pb))


def test_goal_not_measured_says_why():
    goal = G.Goal("advantage", "cpu", G.ADV, "speedup", "mars-int", 1000, "loop-int")
    r = G.evaluate(goal, _doc({"mars-int": {"median_s": 1e-4}}))
    assert r["status"] == "not measured" and "loop-int not run" in r["note"]
    doc = _doc({"mars-int": {"median_s": 1e-4}})
    doc["ops"]["advantage"]["groups"][0]["skipped"] = {"loop-int": "no time"}
    assert G.evaluate(goal, doc)["note"] == "loop-int: no time"
    assert G.evaluate(goal, _doc({}, size="64x(8+2)"))["note"] == "shape not run"
    syncs = G.Goal("advantage", "cuda", G.ADV, "syncs", "mars-int", 0)
    assert "GPU runs only" in G.evaluate(syncs, _doc({"mars-int": {"median_s": 1.0}}))["note"]
    with pytest.raises(ValueError, match="metric"):
        G.Goal("advantage", "cpu", G.ADV, "fastest", "mars-int", 1)
    with pytest.raises(ValueError, match="needs vs"):
        G.Goal("advantage", "cpu", G.ADV, "speedup", "mars-int", 1)


def test_every_goal_names_a_shape_and_impls_of_its_op():
    for goal in G.GOALS:
        op = C.get_op(goal.op)
        assert goal.size in {s.name for s in op.sizes(goal.device, False)}, goal
        for name in (goal.impl, goal.vs):
            if name:
                assert goal.device in C.get_impl(op, name).devices, goal


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=40))
def test_summary_statistics_match_numpy(times):
    import numpy as np
    s = summarize(times)
    assert s.min == min(times) and s.rounds == len(times)
    for q, v in ((0.25, s.q1), (0.5, s.median), (0.75, s.q3)):
        assert v == pytest.approx(float(np.quantile(times, q)), rel=1e-12, abs=1e-12)
    assert s.iqr >= 0


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [-1.0], [float("inf")]])
def test_summary_rejects_what_is_not_a_timing(bad):
    with pytest.raises(ValueError, match="times"):
        summarize(bad)
    with pytest.raises(ValueError, match="q must"):
        quantile([1.0], 1.5)


def test_plan_validation_and_measure_interleaves():
    with pytest.raises(ValueError, match="min_rounds"):
        Plan(min_rounds=5, max_rounds=2)
    with pytest.raises(ValueError, match="warmup"):
        Plan(warmup=0)
    calls = []
    stats = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                    torch.device("cpu"), Plan(max_rounds=3, min_rounds=3, budget_s=0,
                                              block_s=0, max_inner=1, warmup=1))
    assert stats["a"].rounds == stats["b"].rounds == 3 and stats["a"].inner == 1
    timed = calls[4:]                      # after 1 warm-up + 1 calibration call each
    assert timed == ["a", "b", "b", "a", "a", "b"]   # the start rotates every round


def test_roofline_share_is_bytes_over_bandwidth_over_time():
    from mars.bench.run import roofline
    op = C.get_op("policy_loss")
    size = C.get_size(op, "1024x8192 bf16", "cuda")
    moved = 1024 * 8192 * (4 * 2 + 1) + 1024 * 2            # logp, old, ref, grad bf16 + mask
    r = roofline(op, size, median_s=1e-4, roofs={"copy_Bps": 4e12})
    assert r["bytes_moved"] == moved
    assert r["roofline_share"] == pytest.approx(moved / 4e12 / 1e-4, rel=5e-3)   # 3 digits
    head = C.get_op("fused_lm_head")
    hs = C.get_size(head, G.HEAD_GPU, "cuda")
    r = roofline(head, hs, median_s=0.1, roofs={"matmul_flops": 1e15})
    assert r["tflops"] == pytest.approx(6 * 16384 * 2048 * 151936 / 0.1 / 1e12, rel=5e-3)
    assert r["matmul_share"] == pytest.approx(r["tflops"] / 1000, rel=5e-3)
    assert roofline(op, size, 1e-4, {}) == {}                # CPU runs: no roofs measured


def test_markdown_reports_goals_with_margins():
    from mars.bench.report import markdown
    doc = {"device": {"type": "cpu", "name": "x"}, "versions": {"torch": "1"}, "mode": "full",
           "date": "d", "plan": {"block_s": 0.005, "min_rounds": 5, "max_rounds": 30,
                                 "warmup": 2}, "ops": {}}
    goals = [{"goal": "g1", "measured": 2000.0, "status": "met", "margin": 2.0, "why": "",
              "note": ""},
             {"goal": "g2", "measured": 1.5, "status": "not met", "margin": 0.5, "why": "w",
              "note": ""},
             {"goal": "g3", "measured": None, "status": "not measured", "margin": None,
              "why": "", "note": "loop-int not run"}]
    md = markdown(doc, goals)
    assert "| g1 | 2e+03 | met by 2.00x |" in md
    assert "| g2 | 1.5 | **not met**: 0.50 of the target | w |" in md
    assert "| g3 | - | not measured | loop-int not run |" in md


def test_help_returns_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--output" in out and "--device" in out
