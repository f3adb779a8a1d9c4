#!/usr/bin/env bash
# Scaling measurements of docs/SCALING.md: L loader processes side by side on loopback, C client
# processes (`atmorep loader pull`, ranks 0..C of a world of C) pulling the same request at once.
# Prints one line per (L, C): aggregate samples/s and token GB/s (all samples ÷ the slowest
# client's wall time), the slowest client's batch-gap p99, and the loaders' peak resident memory.
#
#   scripts/scaling.sh                      # target/release/atmorep, arco.zarr, reference request
#   BIN=... STORE=... REQUEST=... EPOCHS=4 LOADERS="1 2" CLIENTS="1 2 4" STRIPE=1 scripts/scaling.sh
#
# STORE is the README's reference store (`atmorep loader synth arco.zarr --grid 0.25 --steps 48
# --step-hours 1 --levels 1000,850,700,500,300 --variables t,z` and `atmorep loader stats`).
# Client i talks to loader i mod L; with STRIPE=1 every client gets all L endpoints (its own
# first) and stripes its stream across them. Each configuration first streams one unmeasured
# epoch so that every loader's decoded-chunk cache is warm.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/atmorep}
STORE=${STORE:-arco.zarr}
REQUEST=${REQUEST:-examples/reference.toml}
EPOCHS=${EPOCHS:-4}
LOADERS=${LOADERS:-"1 2"}
CLIENTS=${CLIENTS:-"1 2 4"}
STRIPE=${STRIPE:-0}
BASE_PORT=${BASE_PORT:-50151}
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The request with this client's rank, world size and number of epochs.
request_for() { # rank world epochs out
  grep -v -E '^(rank|world_size|end_epoch) *=' "$REQUEST" | awk -v r="$1" -v w="$2" -v e="$3" '
    /^\[/ && !done { print "rank = " r; print "world_size = " w; print "end_epoch = " e; done = 1 }
    { print }' >"$4"
}

endpoints_for() { # client loaders
  local first=$(($1 % $2)) list="" k
  if [ "$STRIPE" = 1 ]; then
    for ((k = 0; k < $2; k++)); do
      list+="${list:+,}http://127.0.0.1:$((BASE_PORT + (first + k) % $2))"
    done
  else
    list="http://127.0.0.1:$((BASE_PORT + first))"
  fi
  echo "$list"
}

printf '%-8s %-8s %-10s %-10s %-12s %-14s\n' loaders clients samples/s GB/s gap_p99_ms loader_peak_MiB
for L in $LOADERS; do
  pids=()
  for ((k = 0; k < L; k++)); do
    "$BIN" loader serve --dataset "arco=$STORE" --bind "127.0.0.1:$((BASE_PORT + k))" \
      >"$work/loader$k.log" 2>&1 &
    pids+=($!)
  done
  for ((k = 0; k < L; k++)); do
    for _ in $(seq 100); do
      grep -q "listening on" "$work/loader$k.log" && break
      sleep 0.2
    done
  done
  for C in $CLIENTS; do
    # Warm every loader's cache with an unmeasured epoch of the same request.
    for ((k = 0; k < L; k++)); do
      request_for 0 1 1 "$work/warm.toml"
      "$BIN" loader pull "http://127.0.0.1:$((BASE_PORT + k))" --request "$work/warm.toml" \
        --json >/dev/null
    done
    for ((i = 0; i < C; i++)); do
      request_for "$i" "$C" "$EPOCHS" "$work/req$i.toml"
      "$BIN" loader pull "$(endpoints_for "$i" "$L")" --request "$work/req$i.toml" --json \
        >"$work/pull$i.json" &
    done
    wait $(jobs -p | grep -v -x -F "$(printf '%s\n' "${pids[@]}")")
    peak=0
    for p in "${pids[@]}"; do
      hwm=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$p/status")
      peak=$((hwm > peak ? hwm : peak))
    done
    python3 - "$work" "$C" "$L" "$peak" <<'EOF'
import json, sys
work, clients, loaders, peak = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = [json.load(open(f"{work}/pull{i}.json")) for i in range(clients)]
secs = max(r["seconds"] for r in runs)
samples = sum(r["samples"] for r in runs)
gb = sum(r["token_gbps"] * r["seconds"] for r in runs)
p99 = max(r["gap_p99_ms"] for r in runs)
print(f"{loaders:<8} {clients:<8} {samples / secs:<10.1f} {gb / secs:<10.3f} {p99:<12.0f} {peak:<14}")
EOF
  done
  for p in "${pids[@]}"; do kill "$p"; done
  wait "${pids[@]}" 2>/dev/null || true
done
