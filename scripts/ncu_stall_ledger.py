"""Where a kernel's warps wait, per SASS instruction and per phase, from Nsight Compute's source page.

Input: the CSV of `ncu -i REPORT --page source --csv --print-source sass` for a report collected with the
full set (its SourceCounters section samples each warp's program counter and why it did not issue).
Output (markdown), per profiled kernel: the sampled stalls summed over the stretches between CTA barriers
(BAR.SYNC), which in the masked step (csrc/cuda/masked_grad_y.cu) are its phases (mask / next loads and
products / ...), then the instructions with the most samples, with their stall reasons. A barrier's wait is
sampled on the instructions after it (`BAR.SYNC.DEFER_BLOCKING` issues, and the next instruction waits), so
samples whose reason is the barrier are counted apart, in a column of the stretch the barrier ends, not in the
stretch where they were sampled. Reasons are the "stall_*" columns; their "(Not Issued)" halves are a subset
and are left out. Columns are found by name, so a newer ncu that adds columns still reads; a CSV without the
sampling columns says so and exits 1.

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


def read_sections(path: str) -> list[tuple[str, list[str], list[dict[str, str]]]]:
    """(kernel name, columns, rows) per profiled kernel: each starts with a "Kernel Name" line, then the header."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith('"Address","Source"')]
    if not headers:
        raise SystemExit(f"{path}: no CSV header starting with Address, Source")
    sections = []
    for k, start in enumerate(headers):
        end = headers[k + 1] - 1 if k + 1 < len(headers) else len(lines)  # the next kernel's name line
        name_line = lines[start - 1] if start > 0 and lines[start - 1].startswith('"Kernel Name"') else ""
        name = next(csv.reader([name_line]))[1] if name_line else "(kernel)"
        reader = csv.DictReader(lines[start:end])
        sections.append((name, list(reader.fieldnames or []), list(reader)))
    return sections


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    status = 0
    for name, columns, rows in read_sections(args.csv):
        print(f"## {name[:120]}\n")
        status |= ledger(columns, rows, args.top)
    return status


def ledger(columns: list[str], rows: list[dict[str, str]], top_count: int) -> int:
    source = next((c for c in columns if c.strip() == "Source"), None)
    address = next((c for c in columns if c.strip() == "Address"), None)
    samples = next((c for c in columns if "Warp Stall Sampling (All" in c), None)
    not_issued = next((c for c in columns if "Warp Stall Sampling (Not" in c), None)
    # Per-reason sample columns, where the page has them (names such as "stall_long_sb" or "Stall Long Scoreboard").
    reasons = [c for c in columns if re.search(r"stall", c, re.I) and "Not Issued" not in c
               and c not in (samples, not_issued)]
    barrier = next((c for c in reasons if c.strip() == "stall_barrier"), None)
    print(f"columns: {len(columns)}; rows: {len(rows)}; samples column: {samples!r}; reasons: {len(reasons)}")
    if source is None or samples is None:
        print("no SASS source or sampling column: was the report collected with the full set?")
        print("columns:", columns)
        return 1
    total = sum(number(row[samples]) for row in rows) or 1.0

    # Phases: the stretches between barriers, in address order (the SASS page is in address order).
    # A stretch's barrier samples are those sampled after the barrier that ends it, before the next one.
    def new_stretch():
        return {"first": None, "last": None, "samples": 0.0, "barrier": 0.0, "instructions": 0, "reasons": {}}
    phases: list[dict] = []
    current = new_stretch()
    for row in rows:
        text = row[source].strip()
        at_barrier = number(row[barrier]) if barrier else 0.0
        if phases and at_barrier:
            phases[-1]["barrier"] += at_barrier  # the wait of the barrier that ended the previous stretch
        current["first"] = current["first"] or (row.get(address) or "").strip()
        current["last"] = (row.get(address) or "").strip()
        current["samples"] += number(row[samples]) - (at_barrier if phases else 0.0)
        current["instructions"] += 1
        for reason in reasons:
            if reason != barrier or not phases:
                current["reasons"][reason] = current["reasons"].get(reason, 0.0) + number(row[reason])
        if "BAR.SYNC" in text or "BAR.RED" in text or text.startswith("EXIT") or " EXIT" in text:
            current["end"] = text
            phases.append(current)
            current = new_stretch()
    if current["instructions"]:
        current["end"] = "(end)"
        phases.append(current)

    print("| stretch (addresses) | ends at | instructions | samples in it | share | its top reasons | "
          "waiting at its end barrier (sampled after it) |")
    print("|---|---|---|---|---|---|---|")
    for phase in phases:
        top = sorted(phase["reasons"].items(), key=lambda kv: -kv[1])[:3]
        reasons_text = ", ".join(f"{name.strip()} {value / total:.1%}" for name, value in top if value > 0)
        print(f"| {phase['first']}–{phase['last']} | {phase['end'][:40]} | {phase['instructions']} | "
              f"{phase['samples']:.0f} | {phase['samples'] / total:.1%} | {reasons_text} | "
              f"{phase['barrier']:.0f} ({phase['barrier'] / total:.1%}) |")

    print(f"\nThe {top_count} instructions with the most samples (of {total:.0f}):\n")
    print("| address | instruction | samples | share | top reasons |")
    print("|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: -number(r[samples]))[:top_count]:
        top = sorted(((name, number(row[name])) for name in reasons), key=lambda kv: -kv[1])[:3]
        reasons_text = ", ".join(f"{name.strip()} {value:.0f}" for name, value in top if value > 0)
        print(f"| {(row.get(address) or '').strip()} | `{row[source].strip()[:60]}` | {number(row[samples]):.0f} | "
              f"{number(row[samples]) / total:.1%} | {reasons_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
