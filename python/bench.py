"""The Python client's throughput against the Rust client's (`atmorep loader pull`), in the same
run, alternating round by round on one loader (and so on the same machine state).

    python python/bench.py [--store STORE] [--rounds 5] [--batches 80] [--bin target/release/atmorep]

Without --store it writes the reference store of scripts/bench-service.sh (0.25°, 48 hourly
steps, t and z on 5 levels) and streams examples/reference.toml. Prints per round and the
medians: batches/s and token GB/s (f32 source payload, as `pull` counts it) of `pull`,
`Client.stream`, and `LoaderDataset` in a DataLoader with 2 workers (when torch is installed),
and each Python figure over `pull`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed package, not its sources beside this script (they lack the native module).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "python"]
sys.path.insert(0, str(ROOT / "python" / "tests"))

import atmorep  # noqa: E402
from conftest import Server  # noqa: E402


def payload(batch) -> int:
    return sum(f.source.size * 4 for f in batch.fields.values())


def bench_stream(endpoint: str, request: Path, batches: int) -> tuple[float, float]:
    stream = atmorep.Client(endpoint).stream(request)
    started, n, size = time.perf_counter(), 0, 0
    for batch in stream:
        size += payload(batch)
        n += 1
        if n == batches:
            break
    seconds = time.perf_counter() - started
    return n / seconds, size / seconds / 1e9


def bench_dataset(endpoint: str, request: Path, batches: int) -> tuple[float, float] | None:
    try:
        from torch.utils.data import DataLoader

        from atmorep.torch import LoaderDataset
    except ImportError:
        return None
    loader = DataLoader(LoaderDataset(endpoint, str(request)), batch_size=None, num_workers=2)
    started, n, size = time.perf_counter(), 0, 0
    for item in loader:
        size += sum(v["source"].numel() * 4 for k, v in item.items() if isinstance(v, dict)
                    and "source" in v)
        n += 1
        if n == batches:
            break
    seconds = time.perf_counter() - started
    return n / seconds, size / seconds / 1e9


def bench_pull(bin: Path, endpoint: str, request: Path, batches: int) -> tuple[float, float]:
    out = subprocess.run(
        [str(bin), "loader", "pull", endpoint, "--request", str(request), "--batches",
         str(batches), "--json"], capture_output=True, text=True, check=True,
    ).stdout
    report = json.loads(out)
    return report["batches"] / report["seconds"], report["token_gbps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "atmorep")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--request", type=Path, default=ROOT / "examples" / "reference.toml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=80)
    args = ap.parse_args()
    import os

    os.environ["ATMOREP_BIN"] = str(args.bin)
    work = Path(tempfile.mkdtemp())
    store = args.store
    if store is None:
        store = work / "arco.zarr"
        subprocess.run([str(args.bin), "loader", "synth", str(store), "--grid", "0.25", "--steps",
                        "48", "--step-hours", "1", "--levels", "1000,850,700,500,300",
                        "--variables", "t,z"], check=True, capture_output=True)
    subprocess.run([str(args.bin), "loader", "stats", str(store)], check=True,
                   capture_output=True)
    server = Server(["--dataset", f"arco={store}"], work / "serve.log")
    try:
        bench_pull(args.bin, server.endpoint, args.request, 8)  # warm the server's cache
        rows = []
        print(f"{'round':<6} {'pull b/s':>9} {'pull GB/s':>10} {'stream GB/s':>12} "
              f"{'stream/pull':>12} {'dataset GB/s':>13} {'dataset/pull':>13}")
        for r in range(args.rounds):
            pull = bench_pull(args.bin, server.endpoint, args.request, args.batches)
            stream = bench_stream(server.endpoint, args.request, args.batches)
            dataset = bench_dataset(server.endpoint, args.request, args.batches)
            row = (pull[1], stream[1], stream[1] / pull[1],
                   dataset[1] if dataset else float("nan"),
                   dataset[1] / pull[1] if dataset else float("nan"))
            rows.append(row)
            print(f"{r + 1:<6} {pull[0]:>9.1f} {row[0]:>10.3f} {row[1]:>12.3f} {row[2]:>12.2f} "
                  f"{row[3]:>13.3f} {row[4]:>13.2f}", flush=True)
        med = [statistics.median(c) for c in zip(*rows)]
        print(f"{'median':<6} {'':>9} {med[0]:>10.3f} {med[1]:>12.3f} {med[2]:>12.2f} "
              f"{med[3]:>13.3f} {med[4]:>13.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
