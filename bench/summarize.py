"""A pytest-benchmark JSON file -> a Markdown table of medians and ratios within each
benchmark group (ratio = other's median / this one's: > 1 means this one is faster), or,
with --compact, a compact JSON of medians and ratios (what bench/results/ keeps instead of
pytest-benchmark's raw dump of every round).

    python bench/summarize.py results.json > results.md
    python bench/summarize.py results.json --compact > results.compact.json

`mars bench` (python -m mars.bench) writes both directly; this is for bench/*.py runs.
"""
import argparse
import json
import re
from collections import defaultdict


def impl_name(b):
    """The implementation of one benchmark: extra_info['impl'] (bench/conftest.py), else
    the last part of the test id (older files)."""
    if b.get("extra_info", {}).get("impl"):
        return b["extra_info"]["impl"]
    param = b.get("param") or re.sub(r"^test_\w+\[(.*)\]$", r"\1", b["name"])
    parts = param.split("-")
    # older ids: size, dtype and device first ("1024x(16+2)-cpu-mars-int", "cpu-mars-chunk128")
    while len(parts) > 1 and (parts[0] in ("cpu", "gpu", "cuda", "fp32", "bf16")
                              or re.fullmatch(r"\d+x[\d(+)]+", parts[0])):
        parts.pop(0)
    return "-".join(parts)


def sig(x, digits=4):
    return None if x is None else float(f"{x:.{digits}g}")


def compact(data):
    """{machine, date, groups: {group: {impl: {median_s, iqr_s, min_s, rounds, extra},
    ratios_vs: {impl: {other: other median / this median}}}}}: the numbers a reader needs,
    not every round."""
    info = data.get("machine_info", {})
    out = {"source": "pytest-benchmark " + str(data.get("version", "?")),
           "date": data.get("datetime"),
           "machine": {"cpu": info.get("cpu", {}).get("brand_raw"),
                       "cores": info.get("cpu", {}).get("count"),
                       "python": info.get("python_version")},
           "groups": {}}
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    for group, rows in sorted(groups.items()):
        res = {}
        for b in sorted(rows, key=lambda b: b["stats"]["median"]):
            s = b["stats"]
            rec = {"median_s": sig(s["median"]), "iqr_s": sig(s.get("iqr")),
                   "min_s": sig(s["min"]), "rounds": s["rounds"]}
            extra = {k: v for k, v in b.get("extra_info", {}).items()
                     if k not in ("impl", "op", "size", "device")}
            if extra:
                rec["extra"] = extra
            res[impl_name(b)] = rec
        ratios = {a: {o: sig(res[o]["median_s"] / res[a]["median_s"], 3) for o in res if o != a}
                  for a in res}
        out["groups"][group] = {"results": res, "ratios_vs": ratios}
    return out


def markdown(data, title):
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    info = data.get("machine_info", {})
    lines = [f"# {title}", "",
             f"machine: {info.get('cpu', {}).get('brand_raw', '?')}, "
             f"{info.get('cpu', {}).get('count', '?')} cores; python {info.get('python_version')}; "
             f"date {data.get('datetime', '?')}", ""]
    for group, rows in sorted(groups.items()):
        rows.sort(key=lambda b: b["stats"]["median"])
        lines += [f"## {group}", ""]
        names = [impl_name(b) for b in rows]
        mem = any("peak_MiB" in b.get("extra_info", {}) for b in rows)
        lines.append("| impl | median | min | rounds | " + ("peak memory | " if mem else "")
                     + " | ".join(f"vs {n}" for n in names) + " |")
        lines.append("|---|---|---|---|" + ("---|" if mem else "") + "---|" * len(names))
        for name, b in zip(names, rows):
            s = b["stats"]
            ratios = " | ".join(f"{o['stats']['median'] / s['median']:.2f}x" for o in rows)
            peak = f"{b['extra_info'].get('peak_MiB', '-')} MiB | " if mem else ""
            lines.append(f"| {name} | {s['median'] * 1e6:.1f} us | {s['min'] * 1e6:.1f} us | "
                         f"{s['rounds']} | {peak}{ratios} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--compact", action="store_true", help="compact JSON instead of Markdown")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    if args.compact:
        print(json.dumps(compact(data), indent=1))
    else:
        print(markdown(data, args.json))


if __name__ == "__main__":
    main()
