"""``python -m autolr_fused.validation``: rerun the validation experiments and write the report."""

from __future__ import annotations

import argparse
import sys

from autolr_fused.validation.common import single_thread
from autolr_fused.validation.report import SECTIONS, SIZES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m autolr_fused.validation",
        description="Measure each method's paper claims and write <out>/validation.md with PNG figures.",
    )
    parser.add_argument("--out", default="validation_output", help="output folder (the repository uses docs)")
    parser.add_argument(
        "--only",
        default="all",
        help=f"comma-separated sections to run (the report holds only those): {', '.join(SECTIONS)}",
    )
    parser.add_argument("--size", choices=list(SIZES), default="full", help="quick: a smoke run of the same code")
    args = parser.parse_args(argv)
    only = None if args.only == "all" else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only or [] if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    with single_thread():
        path = run(args.out, only, args.size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
