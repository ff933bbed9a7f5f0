"""Summarise scripts/h200_run.sh's `ab` runs: lora_ext / base per configuration, one column per
switch set and round (bench_linear CSVs named ab_<set>_<round>.csv), so the spread between rounds
of one set can be read next to the difference between sets.

    python benchmarks/ab_summary.py OUT_DIR
"""
import csv
import pathlib
import re
import sys


def ratios(path):
    rows = list(csv.DictReader(open(path)))
    key = lambda r: (r["mode"], r["shape"], int(r["r"]), float(r["dropout"]))  # noqa: E731
    base = {key(r): float(r["ms"]) for r in rows if r["provider"] == "base"}
    return {key(r): float(r["ms"]) / base[key(r)] for r in rows if r["provider"] == "lora_ext" and key(r) in base}


def main(folder):
    runs = {}
    for path in sorted(pathlib.Path(folder).glob("ab_*.csv")):
        match = re.fullmatch(r"ab_(.+)_(\d+)", path.stem)
        if match:
            runs[f"{match[1]}#{match[2]}"] = ratios(path)
    if not runs:
        sys.exit(f"no ab_<set>_<round>.csv in {folder}")
    names = sorted(runs, key=lambda n: (n.split("#")[1], n))
    configs = sorted({k for r in runs.values() for k in r})
    print("| mode | shape | r | p | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for c in configs:
        cells = [f"{runs[n][c]:.3f}" if c in runs[n] else "—" for n in names]
        print(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
