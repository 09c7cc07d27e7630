"""`python -m bench [--quick] [--only NAME ...] [--output FILE]`: run the benchmarks, print markdown tables."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from .harness import THREADS, format_table, machine_check, machine_info, setup

BENCHMARKS = ("preprocess", "vision", "generation", "training")
RATIO_NOTE = (
    "Ratios are ours/native: time for times and speeds (< 1.0 = ours faster), memory for peak RSS. "
    "cpu/wall: process CPU seconds over wall seconds of the timed runs; the machine check (a 2-thread matmul "
    "loop) reads ~2.0 when nothing else competes for the cores."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps (about 3 minutes)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    setup(THREADS)
    command = "python -m bench" + " ".join(["", *(argv if argv is not None else sys.argv[1:])])
    sections = [f"Command: `{command}`", machine_info(), RATIO_NOTE]
    print("\n\n".join(sections), flush=True)
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"bench.{name}")
        start, check = time.perf_counter(), machine_check()
        rows = module.run(args.quick)
        table = (
            f"{format_table(module.TITLE, rows)}\n\n({name}: {time.perf_counter() - start:.0f} s; machine check "
            f"cpu/wall before {check:.2f}, after {machine_check():.2f})"
        )
        print(f"\n{table}", flush=True)
        sections.append(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
