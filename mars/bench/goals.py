"""The performance goals of the suite (docs/bench.md, "Goals"), evaluated on one run's results.

Each goal compares two implementations measured side by side in the same run (or one
implementation against an absolute bound) at one shape on one device. The Markdown says
met / not met and by how much; a goal whose cases did not run says why.
"""
from __future__ import annotations

from dataclasses import dataclass

# metric: how `measured` is computed from the results, and which way the target points
METRICS = {
    "speedup": ("{vs} time / {impl} time", ">="),
    "time_ratio": ("{impl} time / {vs} time", "<="),
    "memory_ratio": ("{impl} peak memory / {vs} peak memory", "<="),
    "time": ("{impl} median time (s)", "<="),
    "roofline": ("{impl} share of the copy roofline", ">="),
    "syncs": ("host syncs per {impl} call", "<="),
}


@dataclass(frozen=True)
class Goal:
    op: str
    device: str
    size: str
    metric: str
    impl: str
    target: float
    vs: str | None = None
    why: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        if self.metric in ("speedup", "time_ratio", "memory_ratio") and not self.vs:
            raise ValueError(f"metric {self.metric!r} needs vs")

    @property
    def text(self) -> str:
        what, sense = METRICS[self.metric]
        return f"{self.op} {self.size}: {what.format(impl=self.impl, vs=self.vs)} {sense} {self.target:g}"


ADV = "1024x(16+2)"
_PL = [f"{s} {d}" for s in ("256x4096", "1024x8192") for d in ("fp32", "bf16")]
HEAD_GPU = "tokens=16384 H=2048 V=151936 bf16"
HEAD_CPU = "tokens=2048 H=256 V=32000 fp32"

GOALS = [
    Goal("advantage", "cpu", ADV, "speedup", "mars-int", 1000, "loop-int"),
    Goal("advantage", "cpu", ADV, "speedup", "mars-str", 100, "loop-str"),
    Goal("advantage", "cpu", ADV, "speedup", "mars-int", 3, "verl-vectorized-int",
         why="mars with anchors vs verl without (less work)"),
    Goal("advantage", "cpu", ADV, "speedup", "mars-noanchor-int", 3, "verl-vectorized-int",
         why="the same work: K = 0"),
    Goal("advantage", "cpu", ADV, "speedup", "mars-str", 3, "verl-vectorized",
         why="uid strings for both"),
    Goal("advantage", "cuda", ADV, "syncs", "mars-int", 1,
         why="the whole public call: at most the validation's one, none in the CUDA op"),
    Goal("advantage", "cuda", ADV, "time", "mars-int", 20e-6),
    Goal("advantage", "cuda", ADV, "speedup", "mars-int", 10, "verl-vectorized-int"),
    *[Goal("policy_loss", "cpu", s, "speedup", "mars-cpu", 10, "reference") for s in _PL],
    *[Goal("policy_loss", "cuda", s, "speedup", "mars-cuda", 5, "reference") for s in _PL],
    *[Goal("policy_loss", "cuda", s, "roofline", "mars-cuda", 0.8) for s in _PL[2:]],
    Goal("fused_lm_head", "cuda", HEAD_GPU, "memory_ratio", "mars", 1.0, "liger"),
    Goal("fused_lm_head", "cuda", HEAD_GPU, "memory_ratio", "mars", 1.0, "cce"),
    Goal("fused_lm_head", "cuda", HEAD_GPU, "time_ratio", "mars", 0.7, "liger"),
    Goal("fused_lm_head", "cpu", HEAD_CPU, "memory_ratio", "mars", 0.25, "reference"),
]


def _why_missing(group: dict | None, name: str) -> str:
    if group is None:
        return "shape not run"
    for k in ("errors", "skipped"):
        if name in group.get(k, {}):
            return f"{name}: {group[k][name]}"
    return f"{name} not run"


def evaluate(goal: Goal, doc: dict) -> dict:
    """{goal, measured, target, status: met | not met | not measured, margin, note}.
    margin: measured / target for >= goals, target / measured for <= goals (> 1: met)."""
    out = {"goal": goal.text, "device": goal.device, "target": goal.target, "why": goal.why,
           "measured": None, "margin": None}
    op = doc.get("ops", {}).get(goal.op)
    groups = {g["size"]: g for g in op["groups"]} if op else {}
    group = groups.get(goal.size)
    res = group["results"] if group else {}

    def missing(name):
        out.update(status="not measured", note=_why_missing(group, name))
        return out

    a = res.get(goal.impl)
    if a is None or "median_s" not in a or goal.impl in (group or {}).get("errors", {}):
        return missing(goal.impl)
    b = None
    if goal.vs:
        b = res.get(goal.vs)
        if b is None or "median_s" not in b:
            return missing(goal.vs)
    m = goal.metric
    if m == "speedup":
        measured = b["median_s"] / a["median_s"]
    elif m == "time_ratio":
        measured = a["median_s"] / b["median_s"]
    elif m == "memory_ratio":
        if "peak_bytes" not in a or "peak_bytes" not in b:
            out.update(status="not measured", note="peak memory not measured")
            return out
        measured = a["peak_bytes"] / max(b["peak_bytes"], 1)
    elif m == "time":
        measured = a["median_s"]
    elif m == "roofline":
        if a.get("roofline_share") is None:
            out.update(status="not measured", note="no roofline (GPU runs only)")
            return out
        measured = a["roofline_share"]
    else:  # syncs
        if a.get("host_syncs") is None:
            out.update(status="not measured", note="host syncs counted on GPU runs only")
            return out
        measured = a["host_syncs"]
    ge = METRICS[m][1] == ">="
    met = measured >= goal.target if ge else measured <= goal.target
    if ge:
        margin = measured / goal.target if goal.target else None
    else:
        margin = goal.target / measured if measured else (float("inf") if met else None)
    out.update(measured=measured, margin=margin, status="met" if met else "not met", note="")
    return out


def evaluate_all(doc: dict) -> list[dict]:
    device = doc["device"]["type"]
    return [evaluate(g, doc) for g in GOALS if g.device == device and g.op in doc.get("ops", {})]
