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
    python benchmarks/ab_summary.py --kernels OUT_DIR
        the same folders' scripts/profile_layer.py tables (layers.log, h200_run.sh's `layers` mode): each
        kernel's self CUDA time per iteration, one column per run (NOTES.md #100: where a piece's gain goes in
        the op).
    python benchmarks/ab_summary.py --clocks OUT_DIR
        the same folders' (or OUT_DIR's own) clock log (h200_run.sh's CLOCK_LOG_MS: clocks.csv) read over each
        bench_linear row, from its `started` to its `ended`: the SM clock's median, min and max, the power's
        median (nvidia-smi's 1 s average; the instantaneous power's median and max where logged), the clock's
        event reasons seen, beside the row's device time.
"""
import csv
import datetime
import pathlib
import re
import statistics
import sys

import bench_common as common


def ratios(path):
    rows = list(csv.DictReader(open(path)))
    key = lambda r: (r["mode"], r["shape"], int(r["r"]), float(r["dropout"]))  # noqa: E731
    base = {key(r): float(r["ms"]) for r in rows if r["provider"] == "base"}
    return {key(r): float(r["ms"]) / base[key(r)] for r in rows if r["provider"] == "lora_ext" and key(r) in base}


def patch_ab_sides(folder, *needs):
    """patch_ab.sh's run folders under `folder` that hold every file in `needs`: (round, side, path), in the order
    they ran (before#1, after#1, before#2, ...)."""
    sides = []
    for sub in pathlib.Path(folder).iterdir():
        match = re.fullmatch(r"(before|after)(?:_r(\d+))?", sub.name)
        if match and all((sub / name).exists() for name in needs):
            sides.append((int(match[2] or 1), match[1], sub))
    if not {side for _, side, _ in sides} >= {"before", "after"}:
        sys.exit(f"no before*/ and after*/ holding {' and '.join(needs)} in {folder}")
    return sorted(sides, key=lambda run: (run[0], run[1] == "after"))


def patch_ab(folder):
    runs = []  # (round, side, rows by (mode, shape, r, p, provider)), in the order patch_ab.sh runs them
    for rnd, side, sub in patch_ab_sides(folder, "bench_linear.csv"):
        rows = list(csv.DictReader(open(sub / "bench_linear.csv")))
        by_key = {(r["mode"], r["shape"], int(r["r"]), float(r["dropout"]), r["provider"]): r for r in rows}
        runs.append((rnd, side, by_key))
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


PROFILER_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def profiler_kernels(log_text, source="layers.log"):
    """Each kernel's self CUDA time per iteration (µs) from each of scripts/profile_layer.py's kernel tables (one
    per PROFILE_LAYERS entry; the host table printed after each is skipped): {entry: {kernel: µs}}, in the log's
    order. Kernels whose names the profiler cut to the same 90 characters are added together."""
    entries = {}
    for block in log_text.split("== profile_layer.py ")[1:]:
        entry, _, body = block.partition("\n")
        table = body.split("host side")[0]
        iterations = re.search(r"\((\d+) iterations\)", table)
        if iterations is None:
            sys.exit(f"{source}: no kernel table for profile_layer.py {entry} (did it fail?)")
        times = {}
        for line in table.splitlines():
            cells = re.split(r"\s{2,}", line.strip())
            # name, self CPU %, self CPU, CPU total %, CPU total, CPU avg, self CUDA, self CUDA %, ..., # of calls
            unit = re.fullmatch(r"[\d.]+(us|ms|s)", cells[6]) if len(cells) == 11 and cells[-1].isdigit() else None
            if unit:
                value = float(cells[6][:-len(unit[1])]) * PROFILER_UNITS[unit[1]] / int(iterations[1])
                if value > 0:
                    times[cells[0]] = times.get(cells[0], 0.0) + value
        entries[entry.strip()] = times
    if not entries:
        sys.exit(f"{source}: no '== profile_layer.py' entry")
    return entries


def kernels(folder):
    runs = [(f"{side}#{rnd}", profiler_kernels((sub / "layers.log").read_text(), str(sub / "layers.log")))
            for rnd, side, sub in patch_ab_sides(folder, "layers.log")]
    print("self CUDA time per iteration, µs (scripts/profile_layer.py: eager, no L2 flush), per run in the order they ran")
    for entry in dict.fromkeys(e for _, entries in runs for e in entries):
        tables = [(n, entries.get(entry, {})) for n, entries in runs]
        names = list(dict.fromkeys(name for _, times in tables for name in times))
        print(f"\nprofile_layer.py {entry}\n")
        print("| kernel | " + " | ".join(n for n, _ in tables) + " | after − before (means) |")
        print("|---" * (len(tables) + 2) + "|")
        for name in names + ["all kernels"]:
            values = [(n, sum(t.values()) if name == "all kernels" else t.get(name)) for n, t in tables]
            sides = {side: [v for n, v in values if n.startswith(side) and v is not None] for side in ("before", "after")}
            delta = (statistics.mean(sides["after"]) - statistics.mean(sides["before"])
                     if sides["after"] and sides["before"] else float("nan"))
            print(f"| {name} | " + " | ".join("—" if v is None else f"{v:.1f}" for _, v in values) + f" | {delta:+.1f} |")


def smi_time(text):  # nvidia-smi's timestamp format, which bench_linear's started / ended columns share
    return datetime.datetime.strptime(text.strip(), common.SMI_TIME_FORMAT)


def clock_samples(path):
    """clocks.csv as dicts of its header's fields, numbers without their units; lines that are no sample (an
    nvidia-smi message) are skipped."""
    lines = pathlib.Path(path).read_text().splitlines()
    # nvidia-smi's header spells the asked-for clocks.sm as clocks.current.sm
    fields = [f.strip().split(" [")[0].replace("clocks.current.sm", "clocks.sm") for f in lines[0].split(",")]
    samples = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            continue
        try:
            sample = {"time": smi_time(cells[0])}
        except ValueError:
            continue
        for field, cell in zip(fields[1:], cells[1:]):
            number = cell.split()[0] if cell else ""
            # the event reasons (clocks_event_reasons.active; clocks_throttle_reasons.active before R535) as the
            # driver prints them, a hex mask
            if field.endswith("reasons.active"):
                sample["reasons"] = number
            else:
                sample[field] = float(number) if re.fullmatch(r"[\d.]+", number) else None
        samples.append(sample)
    return samples


def clocks(folder):
    folder = pathlib.Path(folder)
    runs = ([(f"{side}#{rnd}", sub) for rnd, side, sub in patch_ab_sides(folder, "clocks.csv", "bench_linear.csv")]
            if not (folder / "clocks.csv").exists() else [(folder.name, folder)])
    print("the card over each bench_linear row (its started → ended), from the clock log sampled beside it\n")
    print("| run | mode | shape | r | p | provider | device µs | samples | SM MHz median (min–max) | power W median "
          "(1 s average) | instantaneous W median (max) | event reasons seen |")
    print("|---" * 12 + "|")
    for name, sub in runs:
        samples = clock_samples(sub / "clocks.csv")
        for row in csv.DictReader(open(sub / "bench_linear.csv")):
            if not row.get("started"):
                continue
            start, end = smi_time(row["started"]), smi_time(row["ended"])
            inside = [s for s in samples if start <= s["time"] <= end]
            sm = [s["clocks.sm"] for s in inside if s.get("clocks.sm") is not None]
            watts = [s["power.draw"] for s in inside if s.get("power.draw") is not None]
            instant = [s["power.draw.instant"] for s in inside if s.get("power.draw.instant") is not None]
            reasons = sorted({s["reasons"] for s in inside if s.get("reasons")})
            device = f"{float(row['device_ms']) * 1e3:.1f}" if row.get("device_ms") else "—"
            clock = f"{statistics.median(sm):.0f} ({min(sm):.0f}–{max(sm):.0f})" if sm else "—"
            power = f"{statistics.median(watts):.0f}" if watts else "—"
            peak = f"{statistics.median(instant):.0f} ({max(instant):.0f})" if instant else "—"
            print(f"| {name} | {row['mode']} | {row['shape']} | {row['r']} | {row['dropout']} | {row['provider']} | "
                  f"{device} | {len(inside)} | {clock} | {power} | {peak} | {' '.join(reasons) or '—'} |")


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
    readers = {"--patch-ab": patch_ab, "--kernels": kernels, "--clocks": clocks}
    if len(sys.argv) > 1 and sys.argv[1] in readers:
        readers[sys.argv[1]](sys.argv[2] if len(sys.argv) > 2 else ".")
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else ".")
