#!/usr/bin/env bash
# The trainer benchmark: the PyTorch eager twin of the `bench-mid` model
# (../shared/bench/torch_ref/bench_mid.py) and `atmorep train --bench` on the `bench-mid` preset
# against a loader on a 1° t/z store, alternating round by round in one run so that both see the
# same machine. Prints one row per round, the medians and the ratio ours / twin, for the training
# step and for forward passes alone (as eval and infer run the model).
#
#   scripts/bench-trainer.sh [ROUNDS]      (BIN, STEPS, THREADS, TWIN, VENV override defaults)
#
# REFERENCE=1 also runs ours with ATMOREP_FUSED=0 (the primitive-op reference path instead of the
# fused kernels) in each round, as a third column.
# The twin needs torch: on first use it is installed from PyPI into $VENV (default
# $CARGO_TARGET_DIR/torch-venv, else target/torch-venv; ~5 GB), reused afterwards.
set -euo pipefail

ROUNDS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/atmorep}
STEPS=${STEPS:-12}
THREADS=${THREADS:-2}
TWIN=${TWIN:-../shared/bench/torch_ref/bench_mid.py}
VENV=${VENV:-$TARGET/torch-venv}
TORCH=${TORCH:-torch==2.15.0}

[ -x "$BIN" ] || { echo "no binary $BIN (cargo build --release -p atmorep)" >&2; exit 1; }
[ -f "$TWIN" ] || { echo "no PyTorch twin at $TWIN (set TWIN)" >&2; exit 1; }
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "installing $TORCH into $VENV (first use)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH" numpy
fi

work=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# bench-mid's fields: 2 levels × 6×4×8 tokens of 3×9×9 values; 1° hourly steps, 2 levels.
"$BIN" loader synth "$work/store.zarr" --grid 1 --steps 48 --step-hours 1 \
  --levels 850,500 --variables t,z >/dev/null
"$BIN" loader stats "$work/store.zarr" >/dev/null
cat >"$work/train.toml" <<TOML
steps = $STEPS
seed = 0
model = "bench-mid"

[[tasks]]
name = "bert"
mask = { kind = "bert", r_max = 0.5, noise_fraction = 0.1, mask_value = 0.0 }

[optimizer]
lr = 1e-4
weight_decay = 0.05
grad_clip_norm = 1.0

[validation]
every = 0

[checkpoint]
every = 0
keep = 1

[request]
dataset = "era5"
batch_size = 4
seed = 0
$(for v in t z; do printf '\n[[request.fields]]\nname = "%s"\nlevels = [850, 500]\nnum_tokens = [6, 4, 8]\ntoken_size = [3, 9, 9]\npe = "local"\npe_width = 256\n' "$v"; done)
TOML

"$BIN" loader serve --dataset "era5=$work/store.zarr" --bind 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 600); do
  grep -q "listening on" "$work/serve.out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
endpoint="http://$(sed -n 's/^listening on //p' "$work/serve.out")"

REFERENCE=${REFERENCE:-0}
printf '%-6s %12s %12s %12s %12s %8s %10s %10s %10s %10s %10s %8s\n' round "ours tok/s" \
  "twin tok/s" "ours GF/s" "twin GF/s" ratio "ours MiB" "twin MiB" "ref tok/s" "ours fwd" \
  "twin fwd" "fwd ratio"
for round in $(seq "$ROUNDS"); do
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$VENV/bin/python" "$TWIN" --threads "$THREADS" \
    --steps "$STEPS" --warmup 2 --fwd-steps 8 --json "$work/twin.jsonl" >"$work/twin.txt"
  ours() {
    rm -rf "$work/run"
    RAYON_NUM_THREADS=$THREADS /usr/bin/time -f 'peak_rss_kib %M' "$BIN" train \
      --config "$work/train.toml" --loader "$endpoint" --out "$work/run" --bench --quiet \
      >"$work/$1.txt" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
  }
  ours ours
  echo "0 tokens/s" >"$work/ref.txt"
  [ "$REFERENCE" = 1 ] && ATMOREP_FUSED=0 ours ref
  python3 - "$work/ours.txt" "$work/ours.err" "$work/twin.jsonl" "$round" "$work/ref.txt" \
    >>"$work/rows.txt" <<'PY'
import json, re, sys
ours, err = open(sys.argv[1]).read(), open(sys.argv[2]).read()
ref = float(re.search(r"([0-9.]+) tokens/s", open(sys.argv[5]).read()).group(1))
twin = [json.loads(l) for l in open(sys.argv[3])][-1]
tok = float(re.search(r"([0-9.]+) tokens/s", ours).group(1))
gf = re.search(r"([0-9.]+) GFLOP/s", ours)
rss = int(re.search(r"peak_rss_kib (\d+)", err).group(1)) / 1024
fwd = float(re.search(r"forward only: ([0-9.]+) tokens/s", ours).group(1))
print(sys.argv[4], tok, twin["tokens_per_s"], gf.group(1) if gf else "nan", twin["train_gflops"],
      tok / twin["tokens_per_s"], round(rss), twin["peak_rss_mib"], ref, fwd,
      twin["fwd_tokens_per_s"], fwd / twin["fwd_tokens_per_s"], twin["fwd_in_step_ms"])
PY
  tail -n1 "$work/rows.txt" | awk '{printf "%-6s %12.0f %12.0f %12s %12s %8.3f %10s %10s %10.0f %10.0f %10.0f %8.3f\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12}'
done
python3 - "$work/rows.txt" <<'PY'
import statistics, sys
rows = [line.split()[1:] for line in open(sys.argv[1])]
med = [statistics.median(float(x) for x in col) for col in zip(*rows)]
print("%-6s %12.0f %12.0f %12.1f %12.1f %8.3f %10.0f %10.0f %10.0f %10.0f %10.0f %8.3f"
      % ("median", *med[:11]))
print(f"twin: forward in the training step {med[11]:.0f} ms")
PY
echo "ours (last round): $(grep -E 'tokens/s' "$work/ours.txt")"
