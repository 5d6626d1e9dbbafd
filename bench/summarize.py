"""Turns a pytest-benchmark JSON file into a Markdown table of medians and ratios within
each benchmark group (ratio = other's median / this one's: > 1 means this one is faster).

    python bench/summarize.py results.json [--baseline mars-int] > results.md
"""
import argparse
import json
import platform
import re
from collections import defaultdict


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    args = p.parse_args()
    data = json.load(open(args.json))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    info = data.get("machine_info", {})
    print(f"# {args.json}\n")
    print(f"machine: {info.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{info.get('cpu', {}).get('count', '?')} cores; python {info.get('python_version')}; "
          f"date {data.get('datetime', '?')}\n")
    for group, rows in sorted(groups.items()):
        rows.sort(key=lambda b: b["stats"]["median"])
        print(f"## {group}\n")
        extra = rows[0].get("extra_info", {})
        if extra:
            print("; ".join(f"{k} {v}" for k, v in extra.items() if k != "note") + "\n")
        names = [re.sub(r"^test_\w+\[(.*)\]$", r"\1", b["name"]).split("-", 2)[-1] for b in rows]
        print("| impl | median | min | rounds | " + " | ".join(f"vs {n}" for n in names) + " |")
        print("|---|---|---|---|" + "---|" * len(names))
        for name, b in zip(names, rows):
            s = b["stats"]
            ratios = " | ".join(f"{o['stats']['median'] / s['median']:.2f}x" for o in rows)
            print(f"| {name} | {s['median'] * 1e6:.1f} us | {s['min'] * 1e6:.1f} us | "
                  f"{s['rounds']} | {ratios} |")
        print()


if __name__ == "__main__":
    main()
