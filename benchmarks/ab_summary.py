"""Summarise A/B runs of bench_linear, so that the spread between rounds of one side can be read next to
the difference between the sides.

    python benchmarks/ab_summary.py OUT_DIR
        scripts/h200_run.sh's `ab` runs: lora_ext / base per configuration, one column per switch set and
        round (bench_linear CSVs named ab_<set>_<round>.csv).
    python benchmarks/ab_summary.py --patch-ab OUT_DIR
        scripts/patch_ab.sh's runs (OUT_DIR/before, after, before_r2, after_r2, ...: one bench_linear.csv
        each): lora_ext's device time and do_bench time per run in the order they ran, each side's mean,
        and after / before; the base's device time beside them (a drift of the card shows there too), and
        after / before with each side's lora_ext device time over its own base's: the ratio net of a drift
        that moves both alike (NOTES.md #90 read a 0.994 at q/o against a base that moved 0.985).
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


def patch_ab(folder):
    runs = []  # (round, side, rows by (mode, shape, r, p, provider)), in the order patch_ab.sh runs them
    for sub in pathlib.Path(folder).iterdir():
        match = re.fullmatch(r"(before|after)(?:_r(\d+))?", sub.name)
        if match and (sub / "bench_linear.csv").exists():
            rows = list(csv.DictReader(open(sub / "bench_linear.csv")))
            by_key = {(r["mode"], r["shape"], int(r["r"]), float(r["dropout"]), r["provider"]): r for r in rows}
            runs.append((int(match[2] or 1), match[1], by_key))
    if not {side for _, side, _ in runs} >= {"before", "after"}:
        sys.exit(f"no before*/ and after*/ bench_linear.csv in {folder}")
    runs.sort(key=lambda run: (run[0], run[1] == "after"))
    names = [f"{side}#{rnd}" for rnd, side, _ in runs]
    configs = sorted({k[:4] for _, _, rows in runs for k in rows if k[4] == "lora_ext"})

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    def micros(row, column):  # bench_linear's times are ms; an empty device_ms (not measured) is nan
        return float(row[column]) * 1e3 if row.get(column) else float("nan")

    print("lora_ext, µs: device time (CUDA graph) / do_bench, per run in the order they ran; then each side's mean,\n"
          "after ÷ before, the frozen base's device time (its drift over the call), and after ÷ before of lora_ext's\n"
          "device time over the base's (each side's means)\n")
    print("| mode | shape | r | p | " + " | ".join(names) + " | before mean | after mean | after ÷ before "
          "(device / do_bench) | base device µs before / after | after ÷ before, over the base (device) |")
    print("|---" * (4 + len(names) + 5) + "|")
    for c in configs:
        cells, sides = [], {"before": ([], [], []), "after": ([], [], [])}
        for _, side, rows in runs:
            row, base = rows.get(c + ("lora_ext",)), rows.get(c + ("base",))
            if row is None:
                cells.append("—")
                continue
            device, bench = micros(row, "device_ms"), micros(row, "ms")
            cells.append(f"{device:.1f} / {bench:.1f}")
            sides[side][0].append(device)
            sides[side][1].append(bench)
            if base is not None:
                sides[side][2].append(micros(base, "device_ms"))
        (bd, bb, bbase), (ad, ab, abase) = sides["before"], sides["after"]
        print(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]:g} | " + " | ".join(cells)
              + f" | {mean(bd):.1f} / {mean(bb):.1f} | {mean(ad):.1f} / {mean(ab):.1f}"
              + f" | {mean(ad) / mean(bd):.3f} / {mean(ab) / mean(bb):.3f} | {mean(bbase):.1f} / {mean(abase):.1f}"
              + f" | {(mean(ad) / mean(abase)) / (mean(bd) / mean(bbase)):.3f} |")


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
    if len(sys.argv) > 1 and sys.argv[1] == "--patch-ab":
        patch_ab(sys.argv[2] if len(sys.argv) > 2 else ".")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else ".")
