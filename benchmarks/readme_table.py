"""Print the README's benchmark table (markdown) from a `python -m autolr_fused.bench` JSON file.

python benchmarks/readme_table.py benchmarks/results/cpu-2core-x86.json
"""

from __future__ import annotations

import json
import sys


def table(path: str) -> str:
    result = json.load(open(path))
    rows = result["rows"]
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["backend"]) for r in rows))
    by = {(r["method"], r["backend"], r["param_set"]): r for r in rows}
    head = "| method | backend | " + " | ".join(f"{s}: x fused SGD bandwidth | {s}: x reference" for s in sets) + " |"
    lines = [
        f"{result['device']}, torch {result['torch']}, commit {result['commit'][:10]}, "
        f"median of {result['steps']} steps after {result['warmup']} warm-up steps, "
        + ", ".join(sorted({r["dtype"] for r in rows}))
        + (", each step timed alternately with a torch fused SGD step" if "timing" in result else "")
        + ":",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(sets)),
    ]
    for method, backend in keys:
        cells = []
        for s in sets:
            r = by.get((method, backend, s))
            if r is None:
                cells += ["", ""]
                continue
            speedup = r["speedup_vs_reference"]
            cells += [f"{r['vs_torch_fused_sgd']:.2f}", "" if speedup != speedup else f"{speedup:.2f}"]
        lines.append(f"| {method} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
