"""`python -m bench.fidelity [--small] [--write-readme]`: issue 14's fidelity table, measured (and written into
README.md between its fidelity markers with `--write-readme`).

A random model (our tiny towers and LLM, run at the released input sizes 1024 / 384 unless `--small`) is written
in the official checkpoint layout, converted with `convert --from official` and no extra settings, and loaded
through the Auto classes. Each cell is the max |logit difference| on real tokens between the converted folder
(its processor making the pixels) and the source model fed the official preprocessing's pixels (the reference
written from the spec in tests/official_reference.py): with the folder's defaults, and with the opt-in
settings `resample_backend="torch"`, `alpha_mode="composite"`. fp32, CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.harness import write_readme_block
from tests.official_reference import FIDELITY_PRESETS, OPT_IN, fidelity_table

README = Path(__file__).resolve().parents[1] / "README.md"
MARKERS = ("<!-- fidelity:start -->", "<!-- fidelity:end -->")


def render(rows: list[dict]) -> str:
    """A markdown table of `fidelity_table` rows."""
    columns = [key for key in rows[0] if key != "case"]
    lines = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + row["case"] + " | " + " | ".join(f"{row[c]:.1e}" for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny towers' own input sizes (fast)")
    parser.add_argument("--write-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    sizes = "tiny towers' own input sizes" if args.small else "released input sizes (1024 hybrid, 384 SigLIP-only)"
    command = "python -m bench.fidelity" + (" --small" if args.small else "")
    text = (f"Max absolute logit difference against the source model fed the official pixels ({', '.join(FIDELITY_PRESETS)}; "
            f"{sizes}; fp32, CPU; opt-in = `{OPT_IN}`), written by `{command} --write-readme`:\n\n"
            + render(fidelity_table(full_size=not args.small)))
    print(text)
    if args.write_readme:
        write_readme_block(MARKERS, text)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
