#!/usr/bin/env bash
# The service benchmark: `atmorep loader pull` in a second process on loopback against
# the in-process pipeline (`bench-pipeline`) of the same run, alternating round by round so that
# both see the same machine. Prints one row per round and the medians.
#
#   scripts/bench-service.sh [STORE] [ROUNDS]        (BIN, BATCHES, REQUEST override defaults)
#
# Without STORE it writes the reference store (0.25°, 48 hourly steps, t and z on 5 levels).
# The server is warmed by one pull first, so `pull` measures a server whose chunk cache holds the
# block (as during training); `bench-pipeline` decodes its chunks every epoch: its epoch 0 is a
# fresh process, its epochs 1–2 the steady state.
set -euo pipefail

BIN=${BIN:-target/release/atmorep}
REQUEST=${REQUEST:-examples/reference.toml}
BATCHES=${BATCHES:-80}
STORE=${1:-}
ROUNDS=${2:-5}

work=$(mktemp -d)
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$STORE" ]; then
  STORE=$work/arco.zarr
  "$BIN" loader synth "$STORE" --grid 0.25 --steps 48 --step-hours 1 \
    --levels 1000,850,700,500,300 --variables t,z >/dev/null
fi
# A loader serves normalized samples only once the store's statistics exist.
"$BIN" loader stats "$STORE" >/dev/null

"$BIN" loader serve --dataset "arco=$STORE" --bind 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.log" &
server=$!
for _ in $(seq 600); do
  grep -q "listening on" "$work/serve.out" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
endpoint="http://$(sed -n 's/^listening on //p' "$work/serve.out")"

# Warm the server's cache and the page cache of the store bench-pipeline reads.
"$BIN" loader pull "$endpoint" --request "$REQUEST" --batches 8 >/dev/null
"$BIN" loader bench-pipeline "$STORE" --config "$REQUEST" --epochs 1 >/dev/null

printf '%-6s %14s %14s %10s %12s %12s\n' round "epoch0 GB/s" "steady GB/s" "pull GB/s" "pull/epoch0" "pull/steady"
for round in $(seq "$ROUNDS"); do
  "$BIN" loader bench-pipeline "$STORE" --config "$REQUEST" --epochs 3 >"$work/bench.txt" 2>&1
  "$BIN" loader pull "$endpoint" --request "$REQUEST" --batches "$BATCHES" --json >"$work/pull.json"
  python3 - "$work/bench.txt" "$work/pull.json" "$round" >>"$work/rows.txt" <<'EOF'
import json, re, sys
bench = [float(x) for x in re.findall(r"token payload\s+([0-9.]+) GB/s", open(sys.argv[1]).read())]
pull = json.load(open(sys.argv[2]))["token_gbps"]
epoch0, steady = bench[0], sum(bench[1:]) / len(bench[1:])
print(sys.argv[3], epoch0, steady, pull, pull / epoch0, pull / steady)
EOF
  tail -n1 "$work/rows.txt" | awk '{printf "%-6s %14.3f %14.3f %10.3f %12.2f %12.2f\n", $1, $2, $3, $4, $5, $6}'
done
python3 - "$work/rows.txt" <<'EOF'
import statistics, sys
rows = [list(map(float, line.split()[1:])) for line in open(sys.argv[1])]
med = [statistics.median(col) for col in zip(*rows)]
print("%-6s %14.3f %14.3f %10.3f %12.2f %12.2f" % ("median", *med))
EOF
