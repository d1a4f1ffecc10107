#!/usr/bin/env bash
# Fuzzes kindred-domain's parsers with libFuzzer, on stable Rust.
#
#   fuzz/run.sh SECONDS [TARGET...]    (every target when none is named)
#
# Builds the targets (nice, one job unless CARGO_BUILD_JOBS says otherwise),
# then runs each for SECONDS in one process, from a scratch corpus under
# fuzz/target/corpus/TARGET that starts with the committed seeds/TARGET and
# regressions/TARGET (inputs that crashed once, replayed first) and keeps
# what earlier runs found. Prints one line per target; exits non-zero if a
# target crashed (a panic, an input over the time or memory limit) and
# prints where the crashing input was saved.
#
# For long runs:
#   FUZZ_PARALLEL=1    run the targets at the same time (one process each)
#   FUZZ_KEEP_GOING=1  save a crash and go on fuzzing (libFuzzer's -fork=1:
#                      one worker process at a time, restarted after a crash)
#   FUZZ_LOG_PREFIX=P  libFuzzer's output goes to P<target>.log
#                      (default fuzz/target/logs/)
set -euo pipefail
cd "$(dirname "$0")"
fuzz_dir=$PWD

all_targets=(event_batch definition identity_settings destination_settings)
usage="usage: fuzz/run.sh SECONDS [TARGET...]; targets: ${all_targets[*]}"
seconds=${1:-}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage" >&2
  exit 2
fi
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
  if [[ " ${all_targets[*]} " != *" $t "* ]]; then
    echo "unknown target $t; $usage" >&2
    exit 2
  fi
done

# What `cargo fuzz build --sanitizer none` passes, less nightly-only flags;
# --target keeps them off build scripts and proc macros.
triple=$(rustc -vV | sed -n 's/^host: //p')
rustflags=(
  --cfg fuzzing
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Clink-dead-code
  -Cdebug-assertions
  -Coverflow-checks
  -Ccodegen-units=1
)
export CARGO_TARGET_DIR="$fuzz_dir/target"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
unset CARGO_ENCODED_RUSTFLAGS
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
build_start=$SECONDS
RUSTFLAGS="${rustflags[*]}" nice -n 19 cargo build --locked --release --quiet \
  --manifest-path "$fuzz_dir/Cargo.toml" --target "$triple" "${bins[@]}"
echo "fuzz: built ${targets[*]} in $((SECONDS - build_start)) s"
bin_dir="$CARGO_TARGET_DIR/$triple/release"
log_prefix=${FUZZ_LOG_PREFIX:-$CARGO_TARGET_DIR/logs/}

# Fuzzes target $1 for $seconds; prints its summary; fails if it crashed.
fuzz_one() {
  local t=$1
  local corpus="$CARGO_TARGET_DIR/corpus/$t"
  local artifacts="$CARGO_TARGET_DIR/artifacts/$t"
  local log="$log_prefix$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  for dir in "$fuzz_dir/seeds/$t" "$fuzz_dir/regressions/$t"; do
    if [ -d "$dir" ]; then
      cp -n "$dir"/* "$corpus"/ 2>/dev/null || true
    fi
  done
  local options=(
    -max_total_time="$seconds"
    -timeout=30
    -rss_limit_mb=2048
    -print_final_stats=1
    -artifact_prefix="$artifacts/"
  )
  if [ -f "$fuzz_dir/dicts/$t.dict" ]; then
    options+=(-dict="$fuzz_dir/dicts/$t.dict")
  fi
  if [ "${FUZZ_KEEP_GOING:-}" = 1 ]; then
    options+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
  fi
  local stamp
  stamp=$(mktemp)
  local start=$SECONDS status=0
  nice -n 19 "$bin_dir/$t" "${options[@]}" "$corpus" >"$log" 2>&1 || status=$?
  local elapsed=$((SECONDS - start))
  local saved
  saved=$(find "$artifacts" -type f -newer "$stamp" | sort)
  rm -f "$stamp"
  # libFuzzer's status lines: "#RUNS<tab>EVENT cov: N ft: N corp: N/SIZE ..."
  # ("#RUNS: cov: ... corp: N ..." with -fork).
  local last runs cov ft corp
  last=$(grep -E '^#[0-9]+[:[:space:]].*cov: ' "$log" | tail -n 1 || true)
  runs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+).*/\1/p' "$log" | tail -n 1)
  runs=${runs:-$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")}
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corp=$(sed -nE 's/.* corp: ([0-9]+(\/[0-9A-Za-z]+)?).*/\1/p' <<<"$last")
  local summary="fuzz: $t: ${runs:-0} runs in $elapsed s, cov ${cov:-n/a}, ft ${ft:-n/a}, corpus ${corp:-n/a}"
  if [ "$status" -eq 0 ] && [ -z "$saved" ]; then
    echo "$summary, no crash"
    return 0
  fi
  {
    echo "$summary, CRASHED (libFuzzer exit $status, log $log)"
    if [ -z "$saved" ]; then
      echo "  no input saved; see the log"
    fi
    # Each saved input replayed once, for its panic message.
    local input
    for input in $(head -n 5 <<<"$saved"); do
      echo "  crashing input: $input"
      timeout 120 "$bin_dir/$t" -timeout=30 -rss_limit_mb=2048 "$input" 2>&1 |
        awk '/panicked at / { sub(/.*panicked at /, ""); loc = $0; getline; print "    panicked at " loc " " $0 }
             /ERROR: libFuzzer: (timeout|out-of-memory)/ { sub(/.*ERROR: /, ""); print "    " $0 }' |
        head -n 2
    done
    if [ "$(grep -c . <<<"$saved")" -gt 5 ]; then
      echo "  ... $(grep -c . <<<"$saved") inputs saved in $artifacts"
    fi
    echo "  replay: $bin_dir/$t INPUT; keep it in fuzz/regressions/$t/"
  }
  return 1
}

crashed=0
if [ "${FUZZ_PARALLEL:-}" = 1 ]; then
  out=$(mktemp -d)
  pids=()
  for t in "${targets[@]}"; do
    fuzz_one "$t" >"$out/$t" 2>&1 &
    pids+=($!)
  done
  for i in "${!targets[@]}"; do
    wait "${pids[$i]}" || crashed=1
    cat "$out/${targets[$i]}"
  done
  rm -rf "$out"
else
  for t in "${targets[@]}"; do
    fuzz_one "$t" || crashed=1
  done
fi
exit "$crashed"
