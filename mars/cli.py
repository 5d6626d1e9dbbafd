"""The `mars` command line: `mars train`, `mars eval`, `mars check`, `mars bench`."""
from __future__ import annotations

import argparse
import os
import sys


def _check(argv) -> int:
    p = argparse.ArgumentParser(prog="mars check", description=(
        "Run every available backend of every op against mars.reference on random data "
        "and print max errors and median timings."))
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if not any(a.startswith("TRITON_INTERPRET") for a in os.environ) and not _has_gpu():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: check Triton on CPU
    from .backends import backends
    from .check import run_checks
    print("backends:")
    for name, b in backends().items():
        print(f"  {name:<10}{'yes' if b.available else 'no':<5}{b.reason}")
    print()
    ok = run_checks(args.op, args.seed, args.repeats)
    print("\nall backends match the reference" if ok else "\nSOME BACKENDS DISAGREE WITH THE REFERENCE")
    return 0 if ok else 1


def _has_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def _eval(argv) -> int:
    from .evaluation import cli_main
    return cli_main(argv)


def _train(argv) -> int:
    from .train.command import cli_main
    return cli_main(argv)


def _bench(argv) -> int:
    from .bench import main as bench_main
    return bench_main(argv)


COMMANDS = {"train": _train, "check": _check, "eval": _eval, "bench": _bench}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: mars {train,eval,check,bench} [options]\n"
              "  train  train with GRPO / DAPO + MARS (no arguments: the embedded tiny default; "
              "mars train --help)\n"
              "  check  every backend of every op vs the reference: max errors and timings\n"
              "  eval   evaluate a model on an evaluation file (mars eval --help)\n"
              "  bench  time every op against the reference and the peers (mars bench --help)", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
