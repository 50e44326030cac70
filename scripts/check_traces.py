"""Check that every trace in a folder records a complete run.

Usage: ``python scripts/check_traces.py TRACE_DIR [--samples N] [--unscored]``

A complete run has the four spatial patches and the semantic patch, N samples for each
described patch, statements (scored unless ``--unscored``), a final level that covers every
described patch and every spatial patch, and a non-empty caption. Exits 1 when any trace
falls short, listing what each one lacks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from patch_matters_core.types import GLOBAL, SEMANTIC, SPATIAL_PATCH_NAMES, Trace


def find_problems(trace: Trace, num_samples: int, scored: bool) -> list[str]:
    problems = []
    names = [patch.name for patch in trace.patches]
    for name in (*SPATIAL_PATCH_NAMES, SEMANTIC):
        if name not in names:
            problems.append(f"patch {name} missing")

    described = [patch.name for patch in trace.patches if patch.described and patch.name != GLOBAL]
    for name in described:
        count = len(trace.descriptions.get(name, []))
        if count != num_samples:
            problems.append(f"{name} has {count} samples, expected {num_samples}")

    if not trace.statements:
        problems.append("no statements")
    elif scored and all(statement.score is None for statement in trace.statements):
        problems.append("no statement was scored")

    final = [level for level in trace.levels if level.level == 3]
    if len(final) != 1:
        problems.append(f"{len(final)} final levels, expected 1")
    else:
        for name in sorted(set(described) | set(SPATIAL_PATCH_NAMES)):
            if name not in final[0].covers:
                problems.append(f"final level does not cover {name}")

    if not trace.caption.strip():
        problems.append("empty caption")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description="Check that every trace in a folder records a complete run.")
    parser.add_argument("folder", type=Path, help="folder of trace JSON files")
    parser.add_argument("--samples", type=int, default=3, help="samples expected per described patch (default: 3)")
    parser.add_argument("--unscored", action="store_true", help="the run had no scorer")
    args = parser.parse_args()

    paths = sorted(args.folder.glob("*.json"))
    incomplete = 0
    for path in paths:
        problems = find_problems(Trace.load(path), args.samples, scored=not args.unscored)
        if problems:
            incomplete += 1
            print(f"{path.name}: {'; '.join(problems)}")
    print(f"{len(paths) - incomplete} of {len(paths)} traces complete")
    return 1 if incomplete or not paths else 0


if __name__ == "__main__":
    sys.exit(main())
