#!/usr/bin/env bash
# Fuzzes the loader's input parsing for SECONDS per target (default 20): request validation,
# CF time parsing and store metadata discovery (fuzz_targets/). Installs cargo-fuzz if it is
# missing, builds the targets, runs each against a scratch copy of its committed seeds
# (corpus/<target>/, which a run never changes) and exits non-zero if any target crashed, leaving
# the crashing input in artifacts/<target>/.
#
# Stable toolchain: cargo-fuzz needs nightly flags (-Zsanitizer), which RUSTC_BOOTSTRAP=1
# unlocks on stable. FUZZ_SANITIZER=none skips AddressSanitizer (faster; Rust is memory-safe
# without unsafe code, so the targets find panics either way).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-20}"
sanitizer="${FUZZ_SANITIZER:-address}"
cargo_fuzz_version=0.13.2
targets=(request cf_time metadata)

if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
  cargo install --locked "cargo-fuzz@$cargo_fuzz_version"
fi
export RUSTC_BOOTSTRAP=1
# Its own target folder: the fuzz build's flags would invalidate the workspace's.
target_dir="${CARGO_TARGET_DIR:-../target}/fuzz"
build=(--release --debug-assertions --sanitizer "$sanitizer" --target-dir "$target_dir")

start=$SECONDS
cargo fuzz build "${build[@]}"
echo "fuzz: built in $((SECONDS - start)) s"

status=0
for t in "${targets[@]}"; do
  scratch="scratch/$t"
  rm -rf "$scratch" && mkdir -p "$scratch" "artifacts/$t"
  cp corpus/"$t"/* "$scratch"/
  log="scratch/$t.log"
  # -rss_limit_mb: a target that balloons is a finding too. Output goes to a log: libFuzzer
  # prints a line per new coverage point.
  if cargo fuzz run "${build[@]}" "$t" "$scratch" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="artifacts/$t/" -print_final_stats=1 >"$log" 2>&1; then
    execs=$(grep -m1 '^stat::number_of_executed_units' "$log" | awk '{print $2}')
    rate=$(grep -m1 '^stat::average_exec_per_sec' "$log" | awk '{print $2}')
    echo "fuzz: $t: ${execs:-?} runs, ${rate:-?} exec/s, corpus $(ls "$scratch" | wc -l) inputs"
  else
    echo "fuzz: $t FAILED; the end of its log ($log):" >&2
    tail -n 40 "$log" >&2
    status=1
  fi
done
exit "$status"
