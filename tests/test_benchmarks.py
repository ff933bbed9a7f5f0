"""The benchmark scripts run, on CPU, and say what they measured.

Why: their real runs happen on the H200, in device time that is scarce (30 minutes a session, and
sessions without any): a Python error in a script found there costs a whole call. So every
script's CPU logic check runs here (bench_linear and bench_train on tiny shapes, the host-time
probe, the floor tables, the A/B summary), the GPU-only probes at least import and parse their
arguments, and the shell scripts that drive the device parse. The numbers are not checked (a CPU
wall clock under CI's load says nothing); what each run must produce is: every row, no failure,
and tables that are built from those rows.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run(script: pathlib.Path, *args: str, timeout: float = 300) -> str:
    """stdout of `python script args` from the repo root; fails the test on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    # No lora_ext switch or backend from the caller's environment: the logic checks run the defaults.
    for name in [k for k in env if k.startswith("LORA_EXT_")]:
        del env[name]
    done = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{script.name} {' '.join(args)} exited {done.returncode}:\n" \
                                 f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the markdown table under `heading` in text, as lists of cells."""
    assert heading in text, f"no {heading!r} in:\n{text[:2000]}"
    lines = text.split(heading, 1)[1].splitlines()
    is_row = lambda line: line.startswith("|")  # noqa: E731
    table = list(itertools.takewhile(is_row, itertools.dropwhile(lambda line: not is_row(line), lines)))
    assert len(table) >= 3, f"no table under {heading!r}"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]


def positive(cell: str) -> float:
    value = float(cell.replace("**", "").replace(",", "").split()[0])
    assert value > 0, cell
    return value


def render_rows(script: str, rows: list[dict], meta: pathlib.Path, path: pathlib.Path) -> str:
    """What `script --from-csv` prints for `rows` written as the CSV `path` with the run metadata `meta`
    beside it (the scripts read <csv stem>.meta.json)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(meta, path.with_suffix(".meta.json"))
    return run(BENCH / script, "--from-csv", str(path), "--out", str(path.parent), "--tag", "rendered")


@pytest.fixture(scope="module")
def bench_linear_run(tmp_path_factory):
    """One `bench_linear.py --device cpu --quick` run: its output folder and stdout."""
    out = tmp_path_factory.mktemp("bench_linear")
    return out, run(BENCH / "bench_linear.py", "--device", "cpu", "--quick", "--out", str(out))


def test_bench_linear_logic_check_times_every_provider_and_passes_every_float64_check(bench_linear_run):
    out, stdout = bench_linear_run
    with open(out / "bench_linear.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {row["provider"] for row in rows}
    assert {"base", "full", "peft", "lora_ext", "lora_ext_triton", "lora_ext_native"} <= providers, providers
    # --quick: shapes qo and kv, r = 16, dropout 0 and 0.1 for training, M = 1 and 16 for decode.
    keys = {(row["mode"], row["shape"], row["dropout"], row["M"]) for row in rows}
    for shape in ("qo", "kv"):
        for dropout in ("0.0", "0.1"):
            assert ("fwd", shape, dropout, "256") in keys and ("fwd+bwd", shape, dropout, "256") in keys
        assert ("decode", shape, "0.0", "1") in keys and ("decode", shape, "0.0", "16") in keys
    for row in rows:
        assert row["ms"] and float(row["ms"]) > 0, row
        assert not row["note"], row  # "WRONG: ...", "failed: ..." or "check failed: ..."
        assert row["device_ms"] == "", row  # no CUDA graph on CPU
        assert row["started"] <= row["ended"], row  # the local wall time around each row's timing
    # Rows are timed one after another: each starts after the one before it ended (the clock log's reading).
    assert all(a["ended"] <= b["started"] for a, b in zip(rows, rows[1:]))
    assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{3}", rows[0]["started"]), rows[0]
    checked = [row for row in rows if row["rel_err"]]
    assert checked and all(float(row["rel_err"]) <= 3e-2 for row in checked)
    # The tables are printed and written, with a row per training configuration and no ✗.
    written = (out / "bench_linear.md").read_text()
    assert written.strip() in stdout
    time_rows = table_rows(written, "### Time, ratio to the frozen base (same run)")
    assert len(time_rows) == 4 and not any("✗" in cell for row in time_rows for cell in row)
    assert "### Device time" not in written  # no device times on CPU
    assert len(table_rows(written, "### Decode")) == 4
    assert json.loads((out / "bench_linear.meta.json").read_text())["elapsed_s"] >= 0


def test_bench_linear_renders_device_times_from_a_csv(bench_linear_run, tmp_path):
    """The device-time table (CUDA runs) from rows that carry device_ms: the ratio to the base's device
    time and do_bench over the device time, each computed from the CSV's own numbers."""
    out, _ = bench_linear_run
    with open(out / "bench_linear.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # The base's device time differs between a shape's two rows (dropout 0 and 0.1: 0.5 and 0.7 ms, median 0.6),
    # lora_ext's is 0.6 ms in both: 1.20 and 0.86 of the base beside it, 1.00 of the shape's median base.
    device = {("base", "0.0"): 0.5, ("base", "0.1"): 0.7, ("lora_ext", "0.0"): 0.6, ("lora_ext", "0.1"): 0.6}
    for row in rows:
        if row["mode"] in ("fwd", "fwd+bwd") and (row["provider"], row["dropout"]) in device:
            row["device_ms"] = device[(row["provider"], row["dropout"])]
            row["ms"] = row["device_ms"] * (2.0 if row["provider"] == "lora_ext" else 1.0)
    text = render_rows("bench_linear.py", rows, out / "bench_linear.meta.json", tmp_path / "with_device.csv")
    device_rows = table_rows(text, "### Device time")
    assert len(device_rows) == 4
    for row in device_rows:
        # K×N, M, r, dropout, base device ms, base do_bench ÷ device, lora_ext device ratio, its do_bench ÷ device,
        # lora_ext device ÷ the shape's median base device.
        expected = {"0.0": ["0.500 / 0.500", "1.00 / 1.00", "1.20 / 1.20", "2.00 / 2.00", "1.00 / 1.00"],
                    "0.1": ["0.700 / 0.700", "1.00 / 1.00", "0.86 / 0.86", "2.00 / 2.00", "1.00 / 1.00"]}
        assert row[4:] == expected[row[3]], row
    # The CSV of a run from before the column (the H200's, 12-05 04:58) still renders, without that table.
    old_csv = BENCH / "results/2026-12-05_h200b/bench_linear.csv"
    assert "device_ms" not in old_csv.read_text().splitlines()[0]
    old = run(BENCH / "bench_linear.py", "--from-csv", str(old_csv), "--out", str(tmp_path), "--tag", "old")
    assert len(table_rows(old, "### Time, ratio")) == 16 and "### Device time" not in old


def test_ab_summary_reads_bench_linear_csvs(bench_linear_run, tmp_path):
    """scripts/h200_run.sh's `ab` mode: bench_linear CSVs named ab_<set>_<round>.csv, one column each."""
    out, _ = bench_linear_run
    for name in ("ab_default_1", "ab_post_off_1", "ab_default_2"):
        shutil.copy(out / "bench_linear.csv", tmp_path / f"{name}.csv")
    text = run(BENCH / "ab_summary.py", str(tmp_path))
    header, *_ = [line for line in text.splitlines() if line.startswith("| mode")]
    assert [c.strip() for c in header.strip("|").split("|")][4:] == ["default#1", "post_off#1", "default#2"]
    body = [line for line in text.splitlines() if line.startswith("| fwd")]
    assert len(body) == 8  # fwd and fwd+bwd x qo, kv x dropout 0, 0.1
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")][4:]
        assert len(set(cells)) == 1 and positive(cells[0])  # the same CSV three times: the same ratio


def _profiler_table_line(name: str, self_cuda: str, calls: int) -> str:
    """One kernel's line of torch.profiler's key_averages() table as scripts/profile_layer.py prints it."""
    cells = ["0.00%", "0.000us", "0.00%", "0.000us", "0.000us", self_cuda, "12.34%", self_cuda, "1.000us", str(calls)]
    return f"{name:>90}  " + "  ".join(f"{c:>12}" for c in cells) + "  "


def test_ab_summary_reads_profiler_kernel_tables(tmp_path):
    """--kernels (NOTES.md #100): each kernel's self CUDA time per iteration from each run's layers.log, one column
    per run in the order they ran, after − before of the sides' means; the host table printed after the kernel
    table is not read; two kernels whose names the profiler cut alike are added together; a run whose profile
    failed is named, not a traceback."""
    step = "void lora::(anonymous namespace)::masked_grad_y_kernel<__nv_bfloat16, 64, 0>(__nv_bfloa..."
    reduce = "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloa..."
    for side, step_total in (("before", "433.500us"), ("after", "396.000us"), ("before_r2", "436.500us"),
                             ("after_r2", "399.000us")):
        (tmp_path / side).mkdir()
        lines = ["== profile_layer.py 4096 4096 64 0.1 native",
                 "K=4096 N=4096 r=64 p=0.1 backend=native, forward + backward (5 iterations)", "-" * 90,
                 _profiler_table_line("Name", "Self CUDA", 0).replace(" 0  ", " # of Calls  "),
                 _profiler_table_line("_lora_gemm_kernel", "2.225ms", 5),
                 _profiler_table_line(step, step_total, 5),
                 _profiler_table_line(reduce, "10.000us", 5), _profiler_table_line(reduce, "20.000us", 5),
                 _profiler_table_line("cudaLaunchKernel", "0.000us", 40),
                 "host side, same layer (5 iterations), by self CPU time",
                 _profiler_table_line("aten::mm", "300.000us", 10)]
        (tmp_path / side / "layers.log").write_text("\n".join(lines) + "\n")
    text = run(BENCH / "ab_summary.py", "--kernels", str(tmp_path))
    table = {cells[0]: cells[1:] for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| "))}
    assert table["kernel"] == ["before#1", "after#1", "before#2", "after#2", "after − before (means)"]
    assert table["_lora_gemm_kernel"] == ["445.0"] * 4 + ["+0.0"]
    assert table[step] == ["86.7", "79.2", "87.3", "79.8", "-7.5"]
    assert table[reduce] == ["6.0"] * 4 + ["+0.0"]
    assert table["all kernels"] == ["537.7", "530.2", "538.3", "530.8", "-7.5"]
    assert "aten::mm" not in table and "cudaLaunchKernel" not in table  # the host table; a kernel of no GPU time
    (tmp_path / "after_r2/layers.log").write_text("== profile_layer.py 4096 4096 64 0.1 native\nlayers: exit 1\n")
    failed = subprocess.run([sys.executable, str(BENCH / "ab_summary.py"), "--kernels", str(tmp_path)],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no kernel table for profile_layer.py 4096 4096 64 0.1 native" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_ab_summary_reads_the_clock_over_each_row(tmp_path):
    """--clocks (NOTES.md #100): the clock log's samples between each bench_linear row's started and ended, the SM
    clock's median (min–max), the power's median and the event reasons seen; a sample outside every row, and a
    line that is no sample, count nowhere."""
    (tmp_path / "clocks.csv").write_text(
        "timestamp, clocks.current.sm [MHz], power.draw [W], temperature.gpu, power.draw.instant [W], "
        "clocks_event_reasons.active\n"
        "2026/12/07 22:00:00.000, 1000 MHz, 100.00 W, 40, 120.00 W, 0x0000000000000001\n"  # before the rows
        "2026/12/07 22:00:01.100, 1900 MHz, 400.00 W, 50, 450.00 W, 0x0000000000000000\n"
        "2026/12/07 22:00:01.500, 1800 MHz, 500.00 W, 51, 690.00 W, 0x0000000000000004\n"
        "2026/12/07 22:00:01.900, 2000 MHz, 450.00 W, 51, 500.00 W, 0x0000000000000000\n"
        "Unable to determine the device handle for GPU0: Unknown Error\n"
        "2026/12/07 22:00:02.500, 1700 MHz, 600.00 W, 52, 700.00 W, 0x0000000000000004\n")
    fields = ["mode", "shape", "M", "K", "N", "r", "dropout", "provider", "ms", "peak_mib", "rel_err", "note",
              "device_ms", "started", "ended"]
    with open(tmp_path / "bench_linear.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for provider, device_ms, started, ended in (("base", "0.7700", "22:00:01.000", "22:00:02.000"),
                                                    ("lora_ext", "1.0050", "22:00:02.000", "22:00:03.000")):
            writer.writerow(dict(mode="fwd+bwd", shape="qo", M=8192, K=4096, N=4096, r=64, dropout=0.1,
                                 provider=provider, ms=device_ms, peak_mib="", rel_err="", note="",
                                 device_ms=device_ms, started=f"2026/12/07 {started}", ended=f"2026/12/07 {ended}"))
    text = run(BENCH / "ab_summary.py", "--clocks", str(tmp_path))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {tmp_path.name} ")]
    assert [row[5:] for row in rows] == [
        ["base", "770.0", "3", "1900 (1800–2000)", "450", "500 (690)", "0x0000000000000000 0x0000000000000004"],
        ["lora_ext", "1005.0", "1", "1700 (1700–1700)", "600", "700 (700)", "0x0000000000000004"]], text


def test_ab_summary_reads_patch_ab_folders(bench_linear_run, tmp_path):
    """scripts/patch_ab.sh's folders (before, after, before_r2, after_r2): one column per run in the order they
    ran, each side's mean and after / before, from lora_ext's device time and do_bench time; and after / before
    over each side's base, which takes out a drift of the base (here the base 1.2x slower on the 'after' side)."""
    out, _ = bench_linear_run
    rows = list(csv.DictReader(open(out / "bench_linear.csv")))
    # (side, lora_ext's factor, the base's factor): 'after' times lora_ext 1.5x slower and the base 1.2x
    for name, factor, base_factor in (("before", 1.0, 1.0), ("after", 1.5, 1.2), ("before_r2", 1.0, 1.0),
                                      ("after_r2", 1.5, 1.2)):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "bench_linear.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                scaled = factor if row["provider"] == "lora_ext" else base_factor
                writer.writerow({**row, "ms": float(row["ms"]) * scaled,
                                 "device_ms": float(row["device_ms"]) * scaled if row["device_ms"] else ""})
    text = run(BENCH / "ab_summary.py", "--patch-ab", str(tmp_path))
    header, *_ = [line for line in text.splitlines() if line.startswith("| mode")]
    assert [c.strip() for c in header.strip("|").split("|")][4:8] == ["before#1", "after#1", "before#2", "after#2"]
    body = [line for line in text.splitlines() if line.startswith("| fwd")]
    assert len(body) == 8  # fwd and fwd+bwd x qo, kv x dropout 0, 0.1
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        device, bench = (float(v) for v in cells[10].split(" / "))
        assert bench == pytest.approx(1.5, abs=1e-3), line
        assert device == pytest.approx(1.5, abs=1e-3) or math.isnan(device), line
        over_base = float(cells[12])
        assert over_base == pytest.approx(1.5 / 1.2, abs=1e-3) or math.isnan(over_base), line


STUB_H200_RUN = r"""#!/usr/bin/env bash
# A stand-in for scripts/h200_run.sh: a "build" (the md5 of f.txt, as lora_ext/_C.stub.so) unless
# H200_RUN_PREBUILT=1, a bench_linear.csv, and the real script's packing (results.tgz, env.txt kept).
set -u
mkdir -p "$OUT" lora_ext
[[ ${H200_RUN_PREBUILT:-0} == 1 ]] || md5sum f.txt | cut -c1-12 > lora_ext/_C.stub.so
echo "modes=$1 prebuilt=${H200_RUN_PREBUILT:-0} build=$(cat lora_ext/_C.stub.so) tree=$(md5sum f.txt | cut -c1-12)" >> "$CALLS"
cp "$CSV" "$OUT/bench_linear.csv"; echo env > "$OUT/env.txt"
# KILL_AT=N: the N-th run is cut off part-way, as the device tool's time limit does: its loose files written,
# then patch_ab.sh itself killed (SIGKILL: no trap runs).
if [[ -n ${KILL_AT:-} && $(wc -l < "$CALLS") -ge $KILL_AT ]]; then kill -9 "$PPID"; exit 137; fi
(cd "$OUT" && tar czf results.tgz bench_linear.csv env.txt && rm bench_linear.csv)
"""


def _patch_ab_in_scratch_repo(bench_linear_run, tmp_path, **env_extra):
    """Runs scripts/patch_ab.sh (two rounds, before 'bench', after 'tests,bench') with the stand-in h200_run.sh
    in a scratch git repo whose patch changes f.txt; returns the finished process and the repo's path."""
    out, _ = bench_linear_run
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "benchmarks").mkdir()
    shutil.copy(REPO / "scripts/patch_ab.sh", repo / "scripts/patch_ab.sh")
    for script in ("ab_summary.py", "bench_common.py"):  # the summary and the helpers it imports
        shutil.copy(BENCH / script, repo / "benchmarks" / script)
    (repo / "scripts/h200_run.sh").write_text(STUB_H200_RUN)
    (repo / "f.txt").write_text("before\n")
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "base")
    (repo / "f.txt").write_text("after\n")
    (tmp_path / "change.patch").write_text(git("diff").stdout)
    git("checkout", "f.txt")
    env = dict(os.environ, OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls.log"),
               CSV=str(out / "bench_linear.csv"), PATCH_AB_ROUNDS="2", **env_extra)
    done = subprocess.run(["bash", "scripts/patch_ab.sh", str(tmp_path / "change.patch"), "bench", "tests,bench"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    return done, repo


def test_patch_ab_alternates_rounds_packs_one_archive_and_leaves_the_tree_and_its_build(bench_linear_run,
                                                                                       tmp_path):
    """scripts/patch_ab.sh with a stand-in h200_run.sh, in a scratch git repo: round 1 builds each side, later
    rounds alternate on those builds without 'tests'; the sides' folders come back as one archive with the A/B
    table read from inside each side's results.tgz; the tree ends as it came, with its own build in lora_ext/."""
    done, repo = _patch_ab_in_scratch_repo(bench_linear_run, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    builds = [line.split("build=")[1].split()[0] for line in calls]
    trees = [line.split("tree=")[1] for line in calls]
    assert [line.split()[0] for line in calls] == ["modes=bench", "modes=tests,bench", "modes=bench", "modes=bench"]
    assert [line.split()[1] for line in calls] == ["prebuilt=0", "prebuilt=0", "prebuilt=1", "prebuilt=1"]
    assert builds == trees and trees[0] == trees[2] != trees[1] == trees[3]  # each run on its own side's build
    assert (repo / "f.txt").read_text() == "before\n"  # the tree as it came (the patch not committed) ...
    assert (repo / "lora_ext/_C.stub.so").read_text().strip() == trees[0]  # ... and its build, not the last run's
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["patch_ab.tgz", "patch_ab_summary.md"]
    summary = (tmp_path / "out/patch_ab_summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| mode"))
    assert [c.strip() for c in header.strip("|").split("|")][4:8] == ["before#1", "after#1", "before#2", "after#2"]
    listed = subprocess.run(["tar", "tzf", str(tmp_path / "out/patch_ab.tgz")], capture_output=True, text=True).stdout
    assert "before_r2/bench_linear.csv" in listed and "after/env.txt" in listed and "results.tgz" not in listed


def test_patch_ab_killed_part_way_leaves_the_finished_sides_in_one_archive(bench_linear_run, tmp_path):
    """Cut off in its fourth run (SIGKILL, as at the device tool's time limit: no trap runs), patch_ab.sh has
    already packed the three finished sides into one archive with their A/B table; the side in progress is
    what is left loose (at most its own few files): well inside the tool's 8 files."""
    done, _ = _patch_ab_in_scratch_repo(bench_linear_run, tmp_path, KILL_AT="4")
    assert done.returncode != 0, done.stdout + done.stderr
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 4
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert left == ["after_r2/bench_linear.csv", "after_r2/env.txt", "patch_ab.tgz", "patch_ab_summary.md"], left
    listed = subprocess.run(["tar", "tzf", str(tmp_path / "out/patch_ab.tgz")], capture_output=True, text=True).stdout
    assert all(f"{side}/bench_linear.csv" in listed for side in ("before", "after", "before_r2")), listed
    assert "after_r2" not in listed
    header = next(line for line in (tmp_path / "out/patch_ab_summary.md").read_text().splitlines()
                  if line.startswith("| mode"))
    assert [c.strip() for c in header.strip("|").split("|")][4:7] == ["before#1", "after#1", "before#2"]


STUB_NVIDIA_SMI = r"""#!/usr/bin/env bash
# A stand-in for nvidia-smi: with -lms it samples until killed (its pid in $SMI_PID), its header the fields asked
# for; else one query's answer. A query naming $SMI_UNKNOWN_FIELD fails, as an older driver's does.
fields=; for arg in "$@"; do [[ $arg == --query-gpu=* ]] && fields=${arg#--query-gpu=}; done
if [[ -n ${SMI_UNKNOWN_FIELD:-} && ,$fields, == *,$SMI_UNKNOWN_FIELD,* ]]; then
  echo "Field \"$SMI_UNKNOWN_FIELD\" is not a valid field to query."; exit 2
fi
if [[ " $* " == *" -lms "* ]]; then
  echo $$ > "$SMI_PID"; echo "${fields//,/, }"
  while true; do echo "2026/12/07 20:00:00.000, 1980 MHz, 500.00 W, 50"; sleep 0.02; done
fi
echo "Stand-in GPU, 0.0, 0 MiB"
"""


def _h200_run_with_clock_logged(tmp_path, with_build: bool, **env_extra: str
                                ) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
    """The real scripts/h200_run.sh with CLOCK_LOG_MS, its 'layers' mode, in a scratch tree whose nvidia-smi,
    profile_layer.py and build are stand-ins (without the build H200_RUN_PREBUILT=1 ends it early, as a failed
    build does). Returns the finished process and the file holding the stand-in sampler's pid; a sampler still
    alive afterwards is killed here, so that a failing test leaves nothing running."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "lora_ext").mkdir()
    (repo / "bin").mkdir()
    shutil.copy(REPO / "scripts/h200_run.sh", repo / "scripts/h200_run.sh")
    (repo / "scripts/profile_layer.py").write_text("import time; time.sleep(0.3); print('profiled')\n")
    (repo / "lora_ext/__init__.py").write_text("class _C:\n    has_cuda = staticmethod(lambda: False)\n")
    if with_build:
        (repo / "lora_ext/_C.stand_in.so").write_text("")
    (repo / "bin/nvidia-smi").write_text(STUB_NVIDIA_SMI)
    (repo / "bin/nvidia-smi").chmod(0o755)
    pid_file = tmp_path / "smi.pid"
    env = dict(os.environ, OUT=str(tmp_path / "out"), SMI_PID=str(pid_file), CLOCK_LOG_MS="20",
               H200_RUN_PREBUILT="1", PROFILE_LAYERS="4096 1024 16 0.1 native",
               PATH=f"{repo / 'bin'}:{os.environ['PATH']}", **env_extra)
    try:
        done = subprocess.run(["bash", "scripts/h200_run.sh", "layers"], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=120)
        return done, pid_file
    finally:
        time.sleep(0.5)  # a sampler left running has written its pid by now (one killed at once may not have)
        alive = pid_file.exists() and pid_file.read_text().strip()
        if alive:
            try:
                os.kill(int(alive), 0)
            except ProcessLookupError:
                pass
            else:
                pid_file.with_suffix(".alive").write_text(alive)
                os.kill(int(alive), 9)


def test_h200_run_logs_the_clock_beside_each_mode_and_stops_the_logger(tmp_path):
    """CLOCK_LOG_MS (NOTES.md Next 10): scripts/h200_run.sh samples the card while it runs, marks when each mode
    starts and ends, stops the sampler before packing (no process left behind, the call does not hang on it) and
    packs both files into results.tgz."""
    done, pid_file = _h200_run_with_clock_logged(tmp_path, with_build=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "profiled" in done.stdout
    assert pid_file.exists() and not pid_file.with_suffix(".alive").exists()  # it ran, and was stopped
    out = tmp_path / "out"
    subprocess.run(["tar", "xzf", "results.tgz"], cwd=out, check=True)
    samples = (out / "clocks.csv").read_text().splitlines()
    assert samples[0].startswith("timestamp") and len(samples) >= 3 and "MHz" in samples[-1], samples
    # why the clock is where it is, where the driver can say (NOTES.md #100)
    assert samples[0].split(", ")[-2:] == ["power.draw.instant", "clocks_event_reasons.active"], samples[0]
    marks = [line.split(", ", 1)[1] for line in (out / "clock_marks.csv").read_text().splitlines()]
    assert marks == ["layers start", "layers end"], marks


def test_h200_run_samples_the_fields_the_driver_knows(tmp_path):
    """A driver without clocks_event_reasons (older than R535) still gets a clock log with every field it knows:
    that field's probe fails, not the sampler."""
    done, _ = _h200_run_with_clock_logged(tmp_path, with_build=True, SMI_UNKNOWN_FIELD="clocks_event_reasons.active")
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    subprocess.run(["tar", "xzf", "results.tgz"], cwd=out, check=True)
    samples = (out / "clocks.csv").read_text().splitlines()
    assert samples[0] == "timestamp, clocks.sm, power.draw, temperature.gpu, power.draw.instant", samples
    assert len(samples) >= 3, samples


def test_h200_run_stops_the_clock_logger_when_it_ends_early(tmp_path):
    """An early exit (here H200_RUN_PREBUILT=1 without a build; a failed build exits the same way) stops the
    sampler too: on the device it would otherwise sample for the rest of the call."""
    done, pid_file = _h200_run_with_clock_logged(tmp_path, with_build=False)
    assert done.returncode == 1 and "no lora_ext/_C*.so" in done.stdout, done.stdout + done.stderr
    assert not pid_file.with_suffix(".alive").exists()


def test_bench_train_reduce_overhead_mode_reaches_every_compile_and_the_row(tmp_path):
    """--compile-mode reduce-overhead: the step (with CUDA graph trees' step marker) trains, and the row and
    settings say the mode (on CPU torch.compile skips the CUDA graphs themselves; the GPU run records them)."""
    run(BENCH / "bench_train.py", "--device", "cpu", "--quick", "--providers", "lora_ext", "--compile-mode",
        "reduce-overhead", "--out", str(tmp_path), timeout=600)
    with open(tmp_path / "bench_train.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["compile"] == "layers:reduce-overhead" and int(row["graphs"]) > 0 and not row["note"], row
    assert math.isfinite(float(row["last_loss"])) and float(row["tokens_per_s"]) > 0, row
    assert "compile=layers:reduce-overhead;" in (tmp_path / "bench_train.md").read_text()


def test_bench_train_logic_check_compiles_and_trains_every_provider(tmp_path):
    """bench_train's compiled path (each decoder layer compiled, as on the GPU), on the tiny model,
    for the providers of the next device run; losses finite and falling."""
    providers = ["peft", "lora_ext", "lora_ext_switches_off", "frozen_base"]
    # --profile: the profile pass after the timed runs (on CUDA it also gives the GPU busy time).
    stdout = run(BENCH / "bench_train.py", "--device", "cpu", "--quick", "--dropouts", "0.1", "--providers",
                 *providers, "--profile", "3", "--out", str(tmp_path), timeout=600)
    for provider in providers:
        assert f"--- profile of one step: {provider}, dropout 0.1" in stdout
    with open(tmp_path / "bench_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["provider"] for row in rows) == sorted(providers)
    for row in rows:
        assert row["compile"] == "layers" and int(row["graphs"]) > 0 and not row["note"], row
        first, last = float(row["first_loss"]), float(row["last_loss"])
        # A random model over a few steps: the loss stays near ln(vocab); finite and not diverging.
        assert math.isfinite(first) and math.isfinite(last) and last < first + 0.05, row
        assert float(row["tokens_per_s"]) > 0, row
        assert float(row["host_issue_ms"]) > 0 and row["gpu_busy_ms"] == "", row  # no GPU to be busy
    # The floor: no adapters, only the norms train; the model's LoRA sizes still come from a LoRA row.
    floor = next(row for row in rows if row["provider"] == "frozen_base")
    lora = next(row for row in rows if row["provider"] == "lora_ext")
    assert int(floor["n_lora_layers"]) == 0 and float(floor["trainable_m"]) < float(lora["trainable_m"]), floor
    text = (tmp_path / "bench_train.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| 0.1 |")]
    assert [line.split("|")[2].strip() for line in table] == providers
    assert f"{lora['n_lora_layers']} LoRA layers" in text and "- frozen_base = the same model" in text
    # On CUDA a row carries the kernels' time of a profiled step: the table gives it as a share of the step.
    for row in rows:
        row["gpu_busy_ms"] = float(row["step_ms"]) * (0.5 if row["provider"] == "peft" else 0.75)
    text = render_rows("bench_train.py", rows, tmp_path / "bench_train.meta.json", tmp_path / "with_busy.csv")
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")[-2:]]
             for line in text.splitlines() if line.startswith("| 0.1 |")}
    for row in rows:  # host issue ms, then GPU busy ÷ step
        assert cells[row["provider"]] == [f"{float(row['host_issue_ms']):.1f}",
                                          "0.50" if row["provider"] == "peft" else "0.75"], cells


def test_host_overhead_probe_reports_every_provider_on_cpu():
    text = run(BENCH / "host_overhead.py", "--device", "cpu", "--compiled")
    rows = table_rows(text, "host time per call")
    assert [row[0] for row in rows] == ["base nn.Linear", "PEFT formulation", "lora_ext LinearLoRA"]
    for row in rows:
        assert len(row) == 5 and all(positive(cell) for cell in row[1:]), row


def test_floor_tables_count_the_base_gemm():
    """floor.py's FLOPs: 2 M N K for the base forward, 2 M r (K + N) for the LoRA term."""
    text = run(BENCH / "floor.py")
    qo = next(line for line in text.splitlines() if line.startswith("| 4096×4096 (qo)"))
    cells = [c.strip() for c in qo.strip("|").split("|")]
    assert cells[1] == f"{2 * 8192 * 4096 * 4096 / 1e9:.0f} G", cells  # 275 G
    assert cells[7].startswith(f"{2 * 8192 * 16 * (4096 + 4096) / 1e9:.2f} G"), cells  # 2.15 G


GPU_ONLY_SCRIPTS = ["decode_probe.py", "fused_forward_probe.py", "dx_grad_a_probe.py", "gluon_gemm_probe.py",
                    "masked_pieces.py", "compose_ab.py", "fsdp_gpu.py",
                    "bench_cpu.py"]


@pytest.mark.parametrize("script", GPU_ONLY_SCRIPTS)
def test_probe_scripts_import_and_parse_their_arguments(script):
    """The probes that need the GPU (and bench_cpu, slow to run) at least import and build their parsers."""
    assert "usage:" in run(BENCH / script, "--help", timeout=120)


def planned_calls():
    """(script, arguments) of each benchmark call that benchmarks/NOTES.md's device plans write out:
    FUSED_ARGS for fused_forward_probe.py, TRAIN_ARGS for bench_train.py, PIECES_PARTS for masked_pieces.py
    (its --parts), DXDA_ARGS for dx_grad_a_probe.py, GLUON_ARGS for gluon_gemm_probe.py, and the arguments after
    `h200_run.sh MODES` (bench_linear.py's, where MODES has bench)."""
    notes = (BENCH / "NOTES.md").read_text()
    calls = [("fused_forward_probe.py", args) for args in re.findall(r'FUSED_ARGS="([^"]*)"', notes)]
    calls += [("bench_train.py", args) for args in re.findall(r'TRAIN_ARGS="([^"]*)"', notes)]
    calls += [("masked_pieces.py", f"--parts {args}") for args in re.findall(r'PIECES_PARTS="([^"]*)"', notes)]
    calls += [("dx_grad_a_probe.py", args) for args in re.findall(r'DXDA_ARGS="([^"]*)"', notes)]
    calls += [("gluon_gemm_probe.py", args) for args in re.findall(r'GLUON_ARGS="([^"]*)"', notes)]
    # Each command is a code span (it may wrap lines): its words after the modes are bench_linear's.
    for span in re.findall(r"`([^`]*h200_run\.sh [^`]*)`", notes):
        modes, *args = span.split("h200_run.sh", 1)[1].split()
        if "bench" in modes.split(",") and args:
            calls.append(("bench_linear.py", " ".join(args)))
    # scripts/patch_ab.sh PATCH MODES_BEFORE MODES_AFTER [bench args]: the same, where either side benches.
    for span in [span for span in re.findall(r"`([^`]*)`", notes) if "patch_ab.sh " in span]:
        words = span.split("patch_ab.sh", 1)[1].split()
        if len(words) > 3 and "bench" in f"{words[1]},{words[2]}".split(","):
            calls.append(("bench_linear.py", " ".join(words[3:])))
    return calls


def test_the_patches_that_the_next_device_plan_names_apply_to_this_tree():
    """Each patch a `patch_ab.sh` command in NOTES.md's "Next" plan names exists and applies (or, with
    PATCH_AB_COMMITTED=1, reverses): a plan whose patch no longer fits the tree would spend a device call on
    nothing. (The Log's rows keep the commands as they ran, on the trees of their day.) A plan may name no
    patch (its next step a profile, say): then there is nothing to check until one names a patch again."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    notes = (BENCH / "NOTES.md").read_text()
    plan = notes[notes.index("## Next on the GPU"):notes.index("## Log")]
    commands = [span for span in re.findall(r"`([^`]*)`", plan) if "patch_ab.sh " in span]  # code spans, in pairs
    for command in commands:
        patch = command.split("patch_ab.sh", 1)[1].split()[0]
        committed = "PATCH_AB_COMMITTED=1" in command
        done = subprocess.run(["git", "apply", "--check", *(["-R"] if committed else []), patch], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == 0, (command, done.stderr)


def test_the_next_device_plan_parses():
    """The benchmark arguments that NOTES.md's plan for the next device call writes out are accepted by
    their scripts (an unknown tile name or option ends a script with an argparse error, after the build):
    each script parses them, then --help ends it before any work."""
    calls = planned_calls()
    assert {script for script, _ in calls} >= {"fused_forward_probe.py", "bench_train.py", "bench_linear.py"}, calls
    for script, args in calls:
        assert "usage:" in run(BENCH / script, *args.split(), "--help", timeout=120), (script, args)


def test_the_device_calls_named_in_notes_use_modes_that_h200_run_has():
    """Every `h200_run.sh MODES` in benchmarks/NOTES.md names modes the script runs (an unknown one
    is silently skipped there: the call would spend its device time on the build alone)."""
    modes = set(re.findall(r"\bhas ([a-z]+)", (REPO / "scripts/h200_run.sh").read_text()))
    assert {"tests", "bench", "decode", "train", "fused", "host"} <= modes, modes
    named = re.findall(r"h200_run\.sh ([a-z,]+)", (BENCH / "NOTES.md").read_text())
    assert named
    for call in named:
        assert set(call.split(",")) <= modes | {"all"}, call


@pytest.mark.parametrize("script", ["scripts/h200_run.sh", "scripts/patch_ab.sh", "scripts/check_h200_stack.sh", "scripts/setup_env.sh",
                                    "scripts/test.sh", "scripts/demo.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ncu_stall_ledger_counts_barrier_waits_at_their_barrier_and_reads_each_kernel(tmp_path):
    """scripts/ncu_stall_ledger.py on a made-up source page of two kernels: a deferred barrier's wait is sampled on
    the instruction after it, so it is counted as the wait of the stretch that barrier ends, not as work of the next;
    the "(Not Issued)" reason columns (a subset) are left out; each kernel gets its own ledger."""
    header = ('"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
              '"stall_long_sb","stall_long_sb (Not Issued)","stall_barrier"')
    kernel = [header,
              '"0x10","LDG.E R4, [R2]","10","8","6","5","0"',
              '"0x20","BAR.SYNC.DEFER_BLOCKING 0x0","2","2","0","0","0"',
              '"0x30","@!P3 BRA 0x10","30","30","0","0","28"',
              '"0x40","HMMA.16816.F32.BF16 R8, R4, R6, R8","20","15","15","12","0"',
              '"0x50","EXIT","1","1","0","0","0"']
    page = tmp_path / "source.csv"
    page.write_text("\n".join(['==PROF== noise', '"Kernel Name","first"', *kernel,
                               '"Kernel Name","second"', *kernel]) + "\n")
    out = run(REPO / "scripts" / "ncu_stall_ledger.py", str(page))
    assert out.count("## first") == 1 and out.count("## second") == 1, out
    rows = [line for line in out.splitlines() if line.startswith("| 0x")]
    stretches = [r for r in rows if r.count("|") == 8]
    assert len(stretches) == 4, rows  # two per kernel: up to the barrier, then up to EXIT
    first, second = ([c.strip() for c in r.strip("|").split("|")] for r in stretches[:2])
    # 63 samples in all: the first stretch holds 12 and is waited at its end for 28; the second holds 30 - 28 + 21.
    assert first[3] == "12" and first[6] == "28 (44.4%)", first
    assert second[3] == "23" and second[6] == "0 (0.0%)", second
    assert "Not Issued" not in out and "stall_long_sb" in out
