"""`python -m bench [--quick | --smoke] [--only NAME ...] [--write | --render]`: run the benchmark sections and
print their tables; `--write` also stores the results in bench/results.json and regenerates BENCHMARKS.md from
them and bench/BENCHMARKS.template.md; `--render` only regenerates BENCHMARKS.md from the stored results."""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
from dataclasses import asdict

from .harness import THREADS, MachineCheck, format_table, machine_info, setup
from .report import BENCHMARKS_MD, load_results, render_file, rows_of, save_results

# The registry: a section is a module `bench/NAME.py` that follows the contract in bench/README.md. To add one,
# write the module and append its name here (the order is the order of BENCHMARKS.md).
SECTIONS = (
    "preprocess",
    "vision",
    "generation",
    "training",
    "modality_grouping",
    "sft_encoding",
    "quantization",
    "serving",
    "evaluation",
    "data_cost",
)


def run_section(name: str, mode: str) -> dict:
    """Run one section in `mode` with a machine check around it: its stored result (rows, verdicts, machine)."""
    module = importlib.import_module(f"bench.{name}")
    check, start = MachineCheck.start(), time.perf_counter()
    rows = module.run(mode)
    seconds = time.perf_counter() - start
    check.finish()
    return {
        "title": module.TITLE,
        "labels": list(getattr(module, "LABELS", ("ours", "native"))),
        "mode": mode,
        "date": datetime.date.today().isoformat(),
        "command": f"python -m bench{'' if mode == 'full' else ' --' + mode} --only {name}",
        "seconds": round(seconds, 1),
        "versions": machine_info(),
        "machine": asdict(check),
        "rows": [asdict(row) for row in rows],
        "targets": [target.judge(rows) for target in getattr(module, "TARGETS", ())],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats and steps (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks rows and correctness (CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--write", action="store_true",
                        help="store the results in bench/results.json and regenerate BENCHMARKS.md")
    output.add_argument("--render", action="store_true", help="only regenerate BENCHMARKS.md from the stored results")
    args = parser.parse_args(argv)
    if args.render:
        render_file(SECTIONS)
        print(f"wrote {BENCHMARKS_MD}")
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.write and mode == "smoke":
        parser.error("--smoke figures are not published; --write needs a full or --quick run")
    setup(THREADS)
    print(machine_info(), flush=True)
    for name in args.only or SECTIONS:
        result = run_section(name, mode)
        print(f"\n{format_table(result['title'], rows_of(result), tuple(result['labels']))}\n\n"
              f"({name}: {result['seconds']:.0f} s; {MachineCheck(**result['machine']).line()})", flush=True)
        for verdict in result["targets"]:
            print(f"target {verdict['target']}: {'met' if verdict['met'] else 'NOT met'} ({verdict['detail']})")
        if args.write:  # stored section by section (re-read first: another run may have stored its sections)
            results = load_results()
            results["sections"][name] = result
            save_results(results)
            render_file(SECTIONS)
    if args.write:
        print(f"\nwrote bench/results.json and {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
