#!/usr/bin/env bash
# One call on the GPU machine (device tool): build the extension with CUDA, run the GPU
# tests (and optionally the CPU suite, to check the torch version there), then benchmarks.
# Usage: bash scripts/h200_run.sh [MODES] [bench args]; results go to $OUT (or ./out).
#   MODES: comma-separated from tests, bench, probe, layers, host, pieces, ncu, nculist, fused, dxda, gluon, decode, switches, ab, exitprobe, train;
#   or all (tests,bench).
#   ab: bench_linear, base and lora_ext, with switch sets alternated (AB_SETS, AB_ROUNDS, AB_RANKS).
#   exitprobe: the environment-switch test's subprocess under gdb (its abort at exit).
#   train: benchmarks/bench_train.py (TRAIN_ARGS passes arguments; TRAIN_COMPILE_MODES="default reduce-overhead"
#     runs it once per torch.compile mode, TRAIN_TIMEOUT seconds each).
# The device tool brings back at most 8 files: everything under $OUT is packed into results.tgz
# at the end (with env.txt and the summaries kept beside it).
#   layers: scripts/profile_layer.py per entry of PROFILE_LAYERS (';'-separated "K N r dropout backend [--fwd]").
#   host: the k/v layer's host path (fused_forward_probe.py --host; profile_layer.py's CPU table, p 0 and 0.1).
#   probe: host overhead (eager, and a compiled 7-layer chain per layer), ATen composition A/B and a profiler table of one layer (benchmarks/NOTES.md).
#   pieces: benchmarks/masked_pieces.py (the dropout pieces: host time, mask floor, tile sweep; PIECES_PARTS picks).
#   ncu: Nsight Compute on one launch of the native 'post' backward step (scripts/ncu_piece.py; NCU_* pick it).
#   nculist: several ncu looks in one call (NCU_LIST: entries separated by '#', see the mode below).
#   fused: benchmarks/fused_forward_probe.py (the fused forward GEMM vs cuBLAS; FUSED_ARGS passes arguments).
#   gluon: benchmarks/gluon_gemm_probe.py (a warp-specialised Gluon GEMM, NOTES.md #67; GLUON_ARGS passes arguments).
#   dxda: benchmarks/dx_grad_a_probe.py (dA inside the input-gradient GEMM, NOTES.md #64; DXDA_ARGS passes arguments).
#   decode: benchmarks/decode_probe.py --ranks 16 64 (the few-token routes: fused Triton GEMM, kernel, off).
#   switches: the native path's off-by-default kernels against what runs by default, same run
#     (fused_forward_probe.py --configs default: the op with the 'post' fused GEMMs off / on;
#     then --adapter-grads: the one launch's tiles and the op off / on; then masked_pieces.py's
#     ranks part: the native 'post' backward step with 3 cp.async stages; NOTES.md #31, #33-#36).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# The files already in $OUT when this starts, with their times, go into env.txt: the 12-06 06:52 and 07:00
# archives came back holding results of 03:05-03:18 (how they got there is not known: the device tool empties
# $OUT before each command). Listed, not deleted: an earlier call in the same command (or a step before this
# one) writes there on purpose, and this script cannot tell those from stale ones reliably.
preexisting=$(find "$OUT" -mindepth 1 -type f -printf '%TY-%Tm-%Td %TH:%TM  %P\n' 2>/dev/null | sort)
what=${1:-all}
[[ $what == all ]] && what=tests,bench
# has MODE: whether this call runs MODE. Each mode's block asks once, in the order they run, so where the clock is
# logged (CLOCK_LOG_MS, below) a mode that runs is marked here: its start, and the end of the one before it.
running_mode=
has() {
  [[ ,$what, == *,$1,* ]] || return 1
  end_mode_mark; mark "$1 start"; running_mode=$1
}
end_mode_mark() { [[ -z $running_mode ]] || mark "$running_mode end"; running_mode=; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # the card's power limit and top SM clock: an H100's GEMMs run at the clock its power limit allows (NOTES.md #100)
  nvidia-smi --query-gpu=power.limit,power.max_limit,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  [[ -z $preexisting ]] || printf 'files in $OUT before this script (modified, name):\n%s\n' "$preexisting"
} 2>&1 | tee "$OUT/env.txt"
# CLOCK_LOG_MS=N: the card's SM clock, power draw and temperature every N ms while this script runs, into
# $OUT/clocks.csv, and the time each mode starts and ends into $OUT/clock_marks.csv (end_mode_mark, from has(); the
# machine's local time, as nvidia-smi's timestamps; bench_linear.csv's started / ended columns bracket each of its
# rows the same way). Why: an H100 sets its GEMMs' clock by its power limit, and whether a kernel that ends sooner
# hands the next GEMM a hotter, slower card is one reading of NOTES.md #99. The sampler is stopped on every way out
# (a failed build's exit too).
clock_logger=
stop_clock_logger() {
  if [[ -n $clock_logger ]]; then kill "$clock_logger" 2>/dev/null; wait "$clock_logger" 2>/dev/null; clock_logger=; fi
}
# Each sample also says why the clock is below its maximum (clocks_event_reasons.active, a bit mask: 0x4 the
# power cap, 0x1 idle, 0x20/0x40 thermal; NOTES.md #100 read the clock 0.8-2.7% lower over some rows and could not
# tell why) and the instantaneous power (power.draw is a 1 s average on these cards). Each is probed on its own: a
# driver that lacks one still samples the rest (a query naming an unknown field fails whole).
if [[ -n ${CLOCK_LOG_MS:-} ]]; then
  clock_fields=timestamp,clocks.sm,power.draw,temperature.gpu
  for field in power.draw.instant clocks_event_reasons.active; do
    nvidia-smi --query-gpu=$field --format=csv,noheader > /dev/null 2>&1 && clock_fields+=,$field
  done
  nvidia-smi --query-gpu=$clock_fields --format=csv -lms "$CLOCK_LOG_MS" > "$OUT/clocks.csv" 2>&1 &
  clock_logger=$!
  trap stop_clock_logger EXIT
fi
mark() { [[ -z $clock_logger ]] || echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), $1" >> "$OUT/clock_marks.csv"; }

# The image's default g++ (/opt/gcc/bin/g++) links libstdc++ statically into _C.so; that copy's
# stream code then crashes formatting numbers into C++ error messages (cuda-gdb, 2026-11-28).
# The system compiler links it dynamically, as torch does.
# setuptools links with LDSHARED (the interpreter's, /opt/gcc's g++), not CXX: set both.
# build/ is removed so that no object or link from an earlier call (other compiler) survives.
# The image may set CXX to /opt/gcc's g++ itself (2026-12-04: the static link came back with
# CXX set), so the system compiler wins whenever it exists; LORA_EXT_KEEP_CXX=1 keeps CXX.
echo "compiler: CXX=${CXX:-unset}, /usr/bin/g++ $([[ -x /usr/bin/g++ ]] && echo present || echo absent)"
if [[ ${LORA_EXT_KEEP_CXX:-0} != 1 && -x /usr/bin/g++ ]]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
# H200_RUN_PREBUILT=1: lora_ext/_C*.so is already the build of this tree (scripts/patch_ab.sh's later rounds
# put back the one it built for this side): no rebuild.
if [[ ${H200_RUN_PREBUILT:-0} == 1 ]]; then
  ls lora_ext/_C*.so > /dev/null || { echo "H200_RUN_PREBUILT=1 but no lora_ext/_C*.so"; exit 1; }
  echo "build: skipped (H200_RUN_PREBUILT=1: $(md5sum lora_ext/_C*.so | cut -c1-12))"
else
  rm -rf build lora_ext/_C*.so
  t0=$(date +%s)
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  # A statically linked libstdc++ brings its UTF-8 helpers into _C.so (README, Toolchain).
  if [[ $(nm -C lora_ext/_C*.so 2>/dev/null | grep -c read_utf8_code_point) != 0 ]]; then
    echo "WARNING: _C.so carries its own libstdc++ (static link)"; fi
  echo "build: $(( $(date +%s) - t0 )) s"; grep -E "lora_ext: building" "$OUT/build.log"
fi
python3 -c "import lora_ext; print('native CUDA kernels built:', lora_ext._C.has_cuda())"

status=0
if has tests; then
  t0=$(date +%s)
  # pytest-xdist (on the H200 image) spreads the suite over 8 workers on the one GPU: ~2 min instead of 7.
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
  # TEST_SELECT narrows the run (paths and -k), e.g. when little device time is left.
  # -v: every test's outcome is a line of its own when it ends ("[gwN] [ x%] FAILED name" under xdist), so a
  # run cut short still names its failures (12-06 03:49 lost its one failure's name with the summary);
  # and on timeout pytest gets SIGINT first, which makes it print its summary of what ran (KILL 30 s
  # later). The whole log goes to gpu_tests.log; the console shows the failures and the summary.
  timeout -s INT -k 30 ${TEST_TIMEOUT:-420} python3 -m pytest ${TEST_SELECT:-tests} -v -m cuda $workers -rfE \
    -p no:cacheprovider --durations=15 2>&1 | tee "$OUT/gpu_tests.log" |
    grep -E "FAILED|ERROR|^E |^tests/.*: in |[0-9]+ (passed|failed|skipped|deselected)|Interrupt|^[0-9.]+s (call|setup|teardown) " |
    tail -80
  status=${PIPESTATUS[0]}
  echo "gpu tests: $(( $(date +%s) - t0 )) s, exit $status"
fi
if has probe; then
  { python3 benchmarks/host_overhead.py --compiled
    python3 benchmarks/compose_ab.py
    for shape in "4096 1024" "4096 4096"; do python3 scripts/profile_layer.py $shape 16 0.0 native; done
  } 2>&1 | tee "$OUT/probe.log" | tail -150
fi
if has layers; then
  # scripts/profile_layer.py once per entry of PROFILE_LAYERS (';'-separated argument lists, "K N r dropout backend [--fwd]").
  IFS=';' read -ra layer_args <<< "${PROFILE_LAYERS:-4096 1024 64 0.1 native; 4096 1024 64 0.0 native}"
  for args in "${layer_args[@]}"; do
    echo "== profile_layer.py $args"; timeout 120 python3 scripts/profile_layer.py $args || echo "layers: exit $? ($args)"
  done 2>&1 | tee "$OUT/layers.log" | tail -150
  grep -q "^layers: exit" "$OUT/layers.log" && status=1
fi
if has host; then
  { python3 benchmarks/fused_forward_probe.py --host
    for p in 0.0 0.1; do python3 scripts/profile_layer.py 4096 1024 16 $p native; done
  } 2>&1 | tee "$OUT/host.log" | tail -120
fi
if has pieces; then
  # PIECES_PARTS picks masked_pieces.py's parts (default all four; "native": the native step's two load schemes).
  python3 benchmarks/masked_pieces.py --out "$OUT" --time-budget ${SWEEP_BUDGET:-180} \
    --parts ${PIECES_PARTS:-host floor ranks sweep} 2>&1 | tee "$OUT/pieces.log" | tail -80
fi
if has fused; then
  python3 benchmarks/fused_forward_probe.py ${FUSED_ARGS:-} 2>&1 | tee "$OUT/fused.log" | tail -80
fi
# Nsight Compute's binary (ncu and nculist), or nothing.
find_ncu() { command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1; }
if has ncu; then
  # Nsight Compute on one launch of a masked piece (scripts/ncu_piece.py; NCU_PIECE default grad_y_native,
  # the native 'post' backward step; NCU_SHAPE qo; NCU_RANK 16; NCU_KERNEL the kernel-name regex; NCU_SUM_BLOCKS, read by
  # scripts/ncu_piece.py, forces the Triton pieces' sum blocks): the full
  # set, then each stall reason's cycles per issued instruction (NOTES.md #55: what bounds the step).
  ncu_bin=$(find_ncu)
  if [[ -z $ncu_bin ]]; then echo "ncu: Nsight Compute not found"; else
    # NCU_SKIP / NCU_COUNT: the matching launches skipped and profiled (a piece that launches the kernel twice per
    # call, as the 'post' piece's two sums: NCU_SKIP=4 NCU_COUNT=2 for its third call's pair).
    ncu_args=(--clock-control none -k "regex:${NCU_KERNEL:-masked_grad_y_kernel}" --launch-skip ${NCU_SKIP:-2}
              --launch-count ${NCU_COUNT:-1})
    piece_args=(scripts/ncu_piece.py ${NCU_PIECE:-grad_y_native} ${NCU_SHAPE:-qo} ${NCU_RANK:-16})
    # The full set into a report, then two pages of it: the sections (ncu_full.log) and the SASS with each
    # instruction's sampled warp stalls (ncu_source.csv: which instructions a tile's cycles wait on;
    # scripts/ncu_stall_ledger.py sums them by phase).
    timeout 240 "$ncu_bin" "${ncu_args[@]}" --set full -f -o "$OUT/ncu_full" python3 "${piece_args[@]}" \
      > "$OUT/ncu_run.log" 2>&1
    echo "ncu full set: exit $?"
    "$ncu_bin" -i "$OUT/ncu_full.ncu-rep" --page details > "$OUT/ncu_full.log" 2>&1
    "$ncu_bin" -i "$OUT/ncu_full.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_source.csv" 2>&1
    echo "ncu source page: exit $? ($(wc -l < "$OUT/ncu_source.csv") lines)"
    python3 scripts/ncu_stall_ledger.py "$OUT/ncu_source.csv" > "$OUT/ncu_ledger.md" 2>&1
    head -60 "$OUT/ncu_ledger.md"
    # The device tool brings back files of at most 16 MiB: the report goes only where it is well under that.
    [[ $(stat -c %s "$OUT/ncu_full.ncu-rep" 2>/dev/null || echo 0) -lt 12000000 ]] || rm -f "$OUT/ncu_full.ncu-rep"
    timeout 120 "$ncu_bin" "${ncu_args[@]}" \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' python3 "${piece_args[@]}" \
      > "$OUT/ncu_stalls.log" 2>&1
    echo "ncu stall reasons: exit $?"
    grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Warp Cycles Per Issued|Issued Ipc|No Eligible|Registers Per" \
      "$OUT/ncu_full.log" | head -20
    grep -E "stalled" "$OUT/ncu_stalls.log" | sort -k3 -g -r | head -25
  fi
fi
if has nculist; then
  # Several ncu looks in one call (a fresh machine and its build cost ~70 s): NCU_LIST holds entries separated by
  # '#', each "piece shape rank kernel-regex skip count [sum-blocks]" (scripts/ncu_piece.py's arguments, the
  # launches skipped and profiled, and NCU_SUM_BLOCKS, or none for the library's rule). Per entry: the speed-of-light,
  # memory, occupancy, launch and warp-state sections into ncu_list_<i>.log, its durations and throughputs printed.
  ncu_bin=$(find_ncu)
  [[ -n $ncu_bin ]] || echo "nculist: Nsight Compute not found"
  [[ -n ${NCU_LIST:-} ]] || echo "nculist: NCU_LIST is empty"
  # (One line: a newline in NCU_LIST would end the list there.)
  IFS='#' read -ra ncu_entries <<< "${NCU_LIST:-}"
  for i in "${!ncu_entries[@]}"; do
    [[ -n $ncu_bin ]] || break
    read -r piece shape rank kernel skip count blocks <<< "${ncu_entries[$i]}"
    [[ -n ${count:-} ]] || { echo "nculist: entry $i needs piece shape rank kernel skip count: '${ncu_entries[$i]}'"; continue; }
    # (heading, not what: $what holds the modes, and overwriting it here skipped every mode after nculist, 12-06 13:55.)
    heading="== ncu $i: $piece $shape r=$rank kernel=$kernel skip=$skip count=$count sum_blocks=${blocks:-rule}"
    echo "$heading"
    # The entry's settings head its log, so that the file says what it measured.
    { echo "$heading"
      NCU_SUM_BLOCKS=${blocks:-} timeout 150 "$ncu_bin" --clock-control none -k "regex:$kernel" --launch-skip "$skip" \
        --launch-count "$count" --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats python3 scripts/ncu_piece.py "$piece" "$shape" "$rank"
      echo "exit $?"; } > "$OUT/ncu_list_$i.log" 2>&1
    grep -E "^exit |^  [_a-zA-Z].*\(|Duration|DRAM Throughput|Memory Throughput|Grid Size|Block Size|Registers Per|Theoretical Occupancy|Achieved Occupancy|Warp Cycles Per Issued" \
      "$OUT/ncu_list_$i.log" | head -40
  done
fi
if has dxda; then
  # benchmarks/dx_grad_a_probe.py: dA inside the input-gradient GEMM (NOTES.md #64); DXDA_ARGS passes arguments.
  python3 benchmarks/dx_grad_a_probe.py ${DXDA_ARGS:-} 2>&1 | tee "$OUT/dx_grad_a.log" | tail -40
fi
if has gluon; then
  # benchmarks/gluon_gemm_probe.py: a warp-specialised Gluon GEMM against cuBLAS and the library's Triton GEMM
  # (NOTES.md #67); GLUON_ARGS passes arguments (--dx-lora: the dx + dA kernel). Under `timeout` (GLUON_TIMEOUT
  # seconds, default 240): a Gluon kernel that hangs on an mbarrier must not eat the whole device call.
  timeout ${GLUON_TIMEOUT:-240} python3 benchmarks/gluon_gemm_probe.py ${GLUON_ARGS:-} 2>&1 | tee "$OUT/gluon_gemm.log" | tail -40 \
    || echo "gluon: exit $? (124: timed out after ${GLUON_TIMEOUT:-240} s)" | tee -a "$OUT/gluon_gemm.log"
fi
if has decode; then
  python3 benchmarks/decode_probe.py --ranks 16 64 2>&1 | tee "$OUT/decode.log" | tail -60
fi
if has switches; then
  python3 benchmarks/fused_forward_probe.py --configs default 2>&1 | tee "$OUT/switches_fused.log" | tail -40
  python3 benchmarks/fused_forward_probe.py --adapter-grads 2>&1 | tee "$OUT/switches_adapter_grads.log" | tail -20
  python3 benchmarks/masked_pieces.py --parts ranks --out "$OUT" 2>&1 | tee "$OUT/switches_pieces.log" | tail -45
fi
if has exitprobe; then
  # The environment-switch test's subprocess aborts at exit ("terminate called without an active
  # exception", 12-05): run it under gdb for the C++ stacks of every thread at the abort.
  # The test's script and environment, from the test module (one definition).
  probe_env=$(python3 -c "import sys; sys.path.insert(0, 'tests'); import test_cuda
# Without the script's closing os._exit (78fd678), which skips the finalization race this probe is for.
open('/tmp/exit_probe.py', 'w').write(test_cuda.NATIVE_KERNELS_OFF_SCRIPT.replace('os._exit(0)', 'pass'))
print(' '.join(f'{k}={v}' for k, v in test_cuda.NATIVE_KERNELS_OFF_ENV.items()))")
  # Three plain runs first: is the abort every time?
  for i in 1 2 3; do
    env $probe_env LORA_EXT_TERMINATE_BACKTRACE=1 python3 -X faulthandler /tmp/exit_probe.py \
      >> "$OUT/exit_probe_plain.log" 2>&1; echo "exit probe, plain run $i: exit $?" | tee -a "$OUT/exit_probe_plain.log"
  done
  tail -5 "$OUT/exit_probe_plain.log"
  gdb_bin=$(command -v gdb || command -v cuda-gdb)
  # Under gdb the 02:47 run exited normally ("ok", no abort): EXITPROBE_GDB=0 skips it.
  [[ ${EXITPROBE_GDB:-1} == 1 ]] && env $probe_env LORA_EXT_TERMINATE_BACKTRACE=1 timeout 240 "$gdb_bin" -q -batch \
    -ex "set pagination off" -ex run -ex "info threads" -ex "thread apply all bt 25" --args python3 /tmp/exit_probe.py \
    2>&1 | grep -v "^\[New Thread\|^\[Thread .* exited" | tee "$OUT/exit_probe.log" | tail -120
fi
if has ab; then
  # Whole-op A/B of switch sets against the defaults: bench_linear runs (base and
  # lora_ext, same run) alternated set by set, AB_ROUNDS times, so a drift in clocks or a first-run
  # penalty shows up as a spread between rounds instead of as a difference between sets.
  for round in $(seq ${AB_ROUNDS:-2}); do
    # default: what ships; post_off / switches_off: the 12-05 switches (NOTES.md #39) turned back off.
    for set in ${AB_SETS:-default post_off switches_off}; do
      case $set in
        default) envs=();;
        post_off) envs=(LORA_EXT_FUSED_POST_DROPOUT=0);;
        switches_off) envs=(LORA_EXT_FUSED_POST_DROPOUT=0 LORA_EXT_FUSED_ADAPTER_GRADS=0);;
        *) echo "ab: unknown set $set"; continue;;
      esac
      env "${envs[@]}" python3 benchmarks/bench_linear.py --out "$OUT" --tag "ab_${set}_$round" --providers base lora_ext \
        --ranks ${AB_RANKS:-16 64} --dropouts 0.0 0.1 --modes train --no-check --no-ceilings --no-device-time > "$OUT/ab_${set}_$round.log" 2>&1
      echo "ab $set round $round: exit $?"
    done
  done
  python3 benchmarks/ab_summary.py "$OUT" | tee "$OUT/ab_summary.md"
fi
if has train; then
  t0=$(date +%s)
  # TRAIN_COMPILE_MODES: one run per torch.compile mode (default, reduce-overhead), each with its own files.
  for mode in ${TRAIN_COMPILE_MODES:-default}; do
    tag=bench_train; [[ $mode == default ]] || tag=bench_train_$mode
    # The loop's --tag and --compile-mode last: they win over any in TRAIN_ARGS (argparse keeps the last).
    timeout ${TRAIN_TIMEOUT:-300} python3 benchmarks/bench_train.py --out "$OUT" ${TRAIN_ARGS:-} --tag $tag \
      --compile-mode $mode 2>&1 | tee "$OUT/$tag.log" | tail -30
  done
  echo "train: $(( $(date +%s) - t0 )) s"
fi
if has bench; then
  shift || true
  t0=$(date +%s)
  python3 benchmarks/bench_linear.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_linear.log" | tail -60
  echo "bench: $(( $(date +%s) - t0 )) s"
fi
end_mode_mark
stop_clock_logger  # before packing: its file is complete
# At most 8 files come back from the device tool: pack everything, keep the small summaries. An archive from
# an earlier call in the same command (e.g. `h200_run.sh fused; h200_run.sh train`) is unpacked first, without
# overwriting this call's files, so that the new archive holds both (12-06 05:19 lost the first call's files).
(cd "$OUT" && { [[ ! -f results.tgz ]] || tar xzf results.tgz --skip-old-files; } &&
  tar czf /tmp/results.tgz --exclude=results.tgz . && mv /tmp/results.tgz . &&
  find . -type f ! -name results.tgz ! -name env.txt ! -name ab_summary.md ! -name run.log ! -name gpu_tests.log -delete)
exit $status
