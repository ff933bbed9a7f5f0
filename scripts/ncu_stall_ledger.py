"""Where a kernel's warps wait, per SASS instruction and per phase, from Nsight Compute's source page.

Input: the CSV of `ncu -i REPORT --page source --csv --print-source sass` for a report collected with the
full set (its SourceCounters section samples each warp's program counter and why it did not issue).
Output (markdown): the sampled stalls summed over the stretches between CTA barriers (BAR.SYNC), which in
the masked step (csrc/cuda/masked_grad_y.cu) are its phases (mask / next loads and products / ...), then the
instructions with the most samples, with their stall reasons. Columns are found by name, so a newer ncu
that adds columns still reads; a CSV without the sampling columns says so and exits 1.

Usage: python scripts/ncu_stall_ledger.py ncu_source.csv [--top 30]
"""
from __future__ import annotations

import argparse
import csv
import re
import sys


def number(text: str) -> float:
    text = (text or "").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return 0.0


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    # ncu prints its own lines (==PROF==, warnings) before the CSV header: start at the first quoted row
    # that names an address or source column.
    start = next((i for i, line in enumerate(lines) if line.startswith('"') and
                  ("Address" in line or "Source" in line)), None)
    if start is None:
        raise SystemExit(f"{path}: no CSV header with an Address or Source column")
    reader = csv.DictReader(lines[start:])
    return list(reader.fieldnames or []), list(reader)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    columns, rows = read_rows(args.csv)
    source = next((c for c in columns if c.strip() == "Source"), None)
    address = next((c for c in columns if c.strip() == "Address"), None)
    samples = next((c for c in columns if "Warp Stall Sampling (All" in c), None)
    not_issued = next((c for c in columns if "Warp Stall Sampling (Not" in c), None)
    # Per-reason sample columns, where the page has them (names such as "stall_long_sb" or "Stall Long Scoreboard").
    reasons = [c for c in columns if re.search(r"stall", c, re.I) and c not in (samples, not_issued)]
    print(f"columns: {len(columns)}; rows: {len(rows)}; samples column: {samples!r}; reasons: {len(reasons)}")
    if source is None or samples is None:
        print("no SASS source or sampling column: was the report collected with the full set?")
        print("columns:", columns)
        return 1
    total = sum(number(row[samples]) for row in rows) or 1.0

    # Phases: the stretches between barriers, in address order (the SASS page is in address order).
    phases: list[dict] = []
    current = {"first": None, "last": None, "samples": 0.0, "instructions": 0, "reasons": {}}
    for row in rows:
        text = row[source].strip()
        current["first"] = current["first"] or (row.get(address) or "").strip()
        current["last"] = (row.get(address) or "").strip()
        current["samples"] += number(row[samples])
        current["instructions"] += 1
        for reason in reasons:
            current["reasons"][reason] = current["reasons"].get(reason, 0.0) + number(row[reason])
        if "BAR.SYNC" in text or "BAR.RED" in text or text.startswith("EXIT") or " EXIT" in text:
            current["end"] = text
            phases.append(current)
            current = {"first": None, "last": None, "samples": 0.0, "instructions": 0, "reasons": {}}
    if current["instructions"]:
        current["end"] = "(end)"
        phases.append(current)

    print("\n| stretch (addresses) | ends at | instructions | samples | share | top reasons |")
    print("|---|---|---|---|---|---|")
    for phase in phases:
        top = sorted(phase["reasons"].items(), key=lambda kv: -kv[1])[:3]
        reasons_text = ", ".join(f"{name.strip()} {value / total:.1%}" for name, value in top if value > 0)
        print(f"| {phase['first']}–{phase['last']} | {phase['end'][:40]} | {phase['instructions']} | "
              f"{phase['samples']:.0f} | {phase['samples'] / total:.1%} | {reasons_text} |")

    print(f"\nThe {args.top} instructions with the most samples (of {total:.0f}):\n")
    print("| address | instruction | samples | share | top reasons |")
    print("|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: -number(r[samples]))[:args.top]:
        top = sorted(((name, number(row[name])) for name in reasons), key=lambda kv: -kv[1])[:3]
        reasons_text = ", ".join(f"{name.strip()} {value:.0f}" for name, value in top if value > 0)
        print(f"| {(row.get(address) or '').strip()} | `{row[source].strip()[:60]}` | {number(row[samples]):.0f} | "
              f"{number(row[samples]) / total:.1%} | {reasons_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
