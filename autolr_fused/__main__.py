"""Command line: ``python -m autolr_fused demo [options]`` (also the ``autolr-fused`` script)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train every method on a small dataset and compare them"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m autolr_fused {demo} [options]\n")
        for name, text in commands.items():
            print(f"  {name:8s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from autolr_fused.demo import run

    return run.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
