#!/usr/bin/env bash
# A source change A/B'd on one GPU machine in one device call: h200_run.sh runs once on the tree as
# committed (OUT/before) and once with PATCH applied (OUT/after), each with its own clean build.
# Why one call: the device tool gives a machine back 30 s after a call ends, so "the same warm machine"
# across two calls is rare, and numbers from two machines (even two H100s) differ by more than the
# few microseconds such a change is after (benchmarks/NOTES.md, #70-#73).
# Usage: bash scripts/patch_ab.sh PATCH MODES_BEFORE MODES_AFTER [bench args]
#   MODES_*: h200_run.sh's modes (e.g. nculist,bench and tests,nculist,bench); the environment
#   (NCU_LIST, TEST_TIMEOUT, ...) reaches both runs. The patch is reverted at the end.
#   PATCH_AB_COMMITTED=1: the tree already holds the change (PATCH is what it added): 'before' runs with
#   PATCH reversed, 'after' on the tree as committed.
#   PATCH_AB_ROUNDS=N (default 1): N - 1 more rounds, before and after alternated (OUT/before_rK, OUT/after_rK),
#   each side on the _C.so its first round built (no rebuild: ~60 s saved per run) and without the 'tests'
#   mode, so that a drift of the card over the call shows as a spread between rounds, not as the change.
set -uo pipefail
[[ $# -ge 3 ]] || { echo "usage: $0 PATCH MODES_BEFORE MODES_AFTER [bench args]" >&2; exit 2; }
patch=$(realpath "$1") before=$2 after=$3  # absolute, before moving to the repository root
shift 3
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: pack() writes it from another folder
committed=${PATCH_AB_COMMITTED:-0}
applied=0  # whether the patch is applied now
if [[ $committed == 1 ]]; then
  git apply -R "$patch" || { echo "patch_ab: $patch does not reverse on this tree" >&2; exit 2; }
else
  git apply --check "$patch" || { echo "patch_ab: $patch does not apply to this tree" >&2; exit 2; }
fi
builds=$(mktemp -d)  # each side's _C.so from its first round: the later rounds' builds, and the one left at the end
# Puts the tree on side $1: before (without the patch) or after (with it).
to_side() {
  if [[ $1 == after && $applied == 0 ]]; then git apply "$patch" && applied=1
  elif [[ $1 == before && $applied == 1 ]]; then git apply -R "$patch" && applied=0; fi
}
# Puts side $1's round-1 build in lora_ext/; where none was kept, removes the build there (fails), so that
# nothing later runs the other side's build on this side's tree.
use_build() {
  local so; so=$(ls lora_ext/_C*.so 2>/dev/null | head -1)
  if [[ -f $builds/$1.so && -n $so ]]; then cp "$builds/$1.so" "$so"; return 0; fi
  rm -f lora_ext/_C*.so; return 1
}
# Back to the tree as it came (without the patch, or with it where committed), also when killed part-way
# (the device tool stops a command at its time limit), and the build of that tree in lora_ext/ (the last run
# may have built the other side: a later `H200_RUN_PREBUILT=1 h200_run.sh tests` must test the tree it sees).
restore() {
  local side=before; [[ $committed == 1 ]] && side=after
  to_side $side
  use_build $side || echo "patch_ab: no '$side' build kept: lora_ext/_C*.so removed"
}
# The device tool brings back at most 8 files, and each side's run leaves 2-3 (results.tgz, env.txt,
# gpu_tests.log): 15:46's three rounds lost four of their six runs. So every finished side's folder goes into
# one archive, with the A/B table beside it (benchmarks/ab_summary.py --patch-ab, which reads each side's
# bench_linear.csv: h200_run.sh leaves them packed in the side's results.tgz). It is packed after every side,
# not only at the exit: a command killed at the tool's time limit runs no trap (12-07 13:17: the sides done
# came back as loose files, and the 8-file limit dropped two of them). Finished sides wait in $stage, out of
# $OUT, so that $OUT holds the archive, the table and at most the side in progress.
stage=$(mktemp -d)
pack() {
  local repo=$PWD
  (cd "$OUT" 2>/dev/null || exit 0
   for d in before* after*; do
     [[ -d $d ]] || continue
     [[ -f $d/results.tgz ]] && tar xzf "$d/results.tgz" -C "$d" && rm -f "$d/results.tgz"
     rm -rf "${stage:?}/$d" && mv "$d" "$stage/"
   done
   cd "$stage" || exit 0
   sides=(); for d in before* after*; do [[ -d $d ]] && sides+=("$d"); done
   (( ${#sides[@]} )) || exit 0
   python3 "$repo/benchmarks/ab_summary.py" --patch-ab . > "$OUT/patch_ab_summary.md" 2>&1
   tar czf "$OUT/patch_ab.tgz.part" "${sides[@]}" && mv "$OUT/patch_ab.tgz.part" "$OUT/patch_ab.tgz")
}
trap 'restore; pack; rm -rf "$builds" "$stage"' EXIT
trap 'exit 130' INT TERM
rounds=${PATCH_AB_ROUNDS:-1}
echo "== before ($before)"
OUT=$OUT/before bash scripts/h200_run.sh "$before" "$@"
before_status=$?
pack
cp lora_ext/_C*.so "$builds/before.so" 2>/dev/null
to_side after || { echo "patch_ab: $patch did not apply after the 'before' run" >&2; exit 2; }
echo "== after ($after), with $patch"
OUT=$OUT/after bash scripts/h200_run.sh "$after" "$@"
after_status=$?
pack
cp lora_ext/_C*.so "$builds/after.so" 2>/dev/null
# A later round's modes: the first round's without 'tests' ('all' is tests,bench: bench).
later_modes() { local m=,$1,; m=${m//,all,/,bench,}; m=${m//,tests,/,}; m=${m#,}; echo "${m%,}"; }
for round in $(seq 2 "$rounds"); do
  for side in before after; do
    modes=$(later_modes "$([[ $side == before ]] && echo "$before" || echo "$after")")
    if [[ -z $modes ]]; then echo "== $side, round $round: nothing but tests in its modes, not run again"; continue; fi
    to_side $side || { echo "patch_ab: $patch did not move the tree to '$side' in round $round" >&2; exit 2; }
    use_build $side || { echo "patch_ab: no build of '$side' from round 1" >&2; exit 2; }
    echo "== $side, round $round ($modes, its round-1 build)"
    H200_RUN_PREBUILT=1 OUT=$OUT/${side}_r$round bash scripts/h200_run.sh "$modes" "$@"
    (( $? == 0 )) || { [[ $side == before ]] && before_status=1 || after_status=1; }
    pack
  done
done
echo "patch_ab: before exit $before_status, after exit $after_status"
exit $(( before_status || after_status ))
