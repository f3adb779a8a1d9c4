"""The Python client's throughput against the Rust client's (`atmorep loader pull`), in the same
run, alternating round by round on one loader (and so on the same machine state).

    python python/bench.py [--store STORE] [--rounds 5] [--batches 80] [--bin target/release/atmorep]
                           [--peer ../shared/bench/python_peer --peer-python PYTHON]

Without --store it writes the reference store of scripts/bench-service.sh (0.25°, 48 hourly
steps, t and z on 5 levels) and streams examples/reference.toml. Prints per round and the
medians: batches/s and token GB/s (f32 source payload, as `pull` counts it) of `pull`,
`Client.stream`, and `LoaderDataset` in a DataLoader with --workers workers (2; when torch is
installed), and each Python figure over `pull`'s.

With --peer, the store is the hand-written Python loader's own (its make_store.py: Zarr v2,
0.25°, 48 hourly steps, `temperature` and `vorticity` on 5 model levels), the request asks for
the same windows and tokens as that loader cuts (36 × 54 × 108 values in tokens of 3 × 9 × 9, 16
samples per batch, both variables on all 5 levels), and each round also runs its best variant
(`smart_raw`, 2 processes, run by PEER_PYTHON, which needs numpy, zarr, numcodecs and xarray):
samples/s of each and the stream's over the peer's, and samples per CPU-second of the
trainer's side: the Python process reading the stream (the loader's CPU is the storage node's),
against the peer's processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed package, not its sources beside this script (they lack the native module).
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "python"]
sys.path.insert(0, str(ROOT / "python" / "tests"))

import atmorep  # noqa: E402
from conftest import Server  # noqa: E402


def payload(batch) -> int:
    return sum(f.source.size * 4 for f in batch.fields.values())


def bench_stream(endpoint: str, request: Path, batches: int) -> tuple[float, float, float]:
    """Batches/s, GB/s, and batches per CPU-second of this (the trainer's) process."""
    stream = atmorep.Client(endpoint).stream(request)
    started, cpu, n, size = time.perf_counter(), time.process_time(), 0, 0
    for batch in stream:
        size += payload(batch)
        n += 1
        if n == batches:
            break
    seconds = time.perf_counter() - started
    return n / seconds, size / seconds / 1e9, n / (time.process_time() - cpu)


def bench_dataset(endpoint: str, request: Path, batches: int, workers: int
                  ) -> tuple[float, float] | None:
    try:
        from torch.utils.data import DataLoader

        from atmorep.torch import LoaderDataset
    except ImportError:
        return None
    loader = DataLoader(LoaderDataset(endpoint, str(request)), batch_size=None,
                        num_workers=workers)
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


def bench_peer(python: str, peer: Path, store: Path, seconds: float) -> tuple[float, float]:
    """Samples/s of the peer's `smart_raw` loader with 2 processes (summed), and its samples per
    CPU-second (the CPU a trainer's own processes spend on loading)."""
    out = store.parent / "peer.jsonl"
    out.unlink(missing_ok=True)
    subprocess.run([python, str(peer / "peer_loader.py"), str(store), "--variants", "smart_raw",
                    "--procs", "2", "--min-seconds", str(seconds), "--json", str(out)],
                   check=True, capture_output=True)
    result = json.loads(out.read_text().splitlines()[-1])
    return result["samples_per_s"], result["samples_per_cpu_s"]


def peer_request(work: Path) -> Path:
    """examples/reference.toml with the peer store's names and model levels."""
    text = (ROOT / "examples" / "reference.toml").read_text()
    text = text.replace('name = "t"', 'name = "temperature"').replace('name = "z"',
                                                                       'name = "vorticity"')
    text = text.replace("levels = [1000, 850, 700, 500, 300]", "levels = [96, 105, 114, 123, 137]")
    path = work / "peer-request.toml"
    path.write_text(text)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "atmorep")
    ap.add_argument("--store", type=Path)
    ap.add_argument("--request", type=Path, default=ROOT / "examples" / "reference.toml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=80)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of LoaderDataset")
    ap.add_argument("--peer", type=Path, help="the folder of peer_loader.py and make_store.py")
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--peer-seconds", type=float, default=20.0,
                    help="each round's run of the peer; 0: its store and request, not its run")
    args = ap.parse_args()
    import os

    os.environ["ATMOREP_BIN"] = str(args.bin)
    work = Path(tempfile.mkdtemp())
    store = args.store
    if args.peer is not None:
        if store is None:
            store = work / "peer.zarr"
            subprocess.run([args.peer_python, str(args.peer / "make_store.py"), str(store),
                            "--workers", "2"], check=True, capture_output=True)
        args.request = peer_request(work)
    elif store is None:
        store = work / "arco.zarr"
        subprocess.run([str(args.bin), "loader", "synth", str(store), "--grid", "0.25", "--steps",
                        "48", "--step-hours", "1", "--levels", "1000,850,700,500,300",
                        "--variables", "t,z"], check=True, capture_output=True)
    run_peer = args.peer is not None and args.peer_seconds > 0
    subprocess.run([str(args.bin), "loader", "stats", str(store)], check=True,
                   capture_output=True)
    server = Server(["--dataset", f"arco={store}"], work / "serve.log")
    try:
        bench_pull(args.bin, server.endpoint, args.request, 8)  # warm the server's cache
        rows = []
        print(f"{'round':<6} {'pull b/s':>9} {'pull GB/s':>10} {'stream GB/s':>12} "
              f"{'stream/pull':>12} {'dataset GB/s':>13} {'dataset/pull':>13}"
              + (f" {'stream sam/s':>13} {'peer sam/s':>11} {'stream/peer':>12}"
                 f" {'stream sam/cpu-s':>17} {'peer sam/cpu-s':>15} {'cpu ratio':>10}"
                 if run_peer else ""))
        for r in range(args.rounds):
            pull = bench_pull(args.bin, server.endpoint, args.request, args.batches)
            stream = bench_stream(server.endpoint, args.request, args.batches)
            dataset = bench_dataset(server.endpoint, args.request, args.batches, args.workers)
            row = (pull[1], stream[1], stream[1] / pull[1],
                   dataset[1] if dataset else float("nan"),
                   dataset[1] / pull[1] if dataset else float("nan"))
            if run_peer:
                # Samples/s: the peer counts samples, the stream batches of batch_size.
                batch_size = tomllib.loads(args.request.read_text())["batch_size"]
                stream_samples, stream_cpu = stream[0] * batch_size, stream[2] * batch_size
                peer, peer_cpu = bench_peer(args.peer_python, args.peer, store, args.peer_seconds)
                row += (stream_samples, peer, stream_samples / peer, stream_cpu, peer_cpu,
                        stream_cpu / peer_cpu)
            rows.append(row)
            extra = (f" {row[5]:>13.1f} {row[6]:>11.1f} {row[7]:>12.2f}"
                     f" {row[8]:>17.1f} {row[9]:>15.1f} {row[10]:>10.1f}" if run_peer else "")
            print(f"{r + 1:<6} {pull[0]:>9.1f} {row[0]:>10.3f} {row[1]:>12.3f} {row[2]:>12.2f} "
                  f"{row[3]:>13.3f} {row[4]:>13.2f}{extra}", flush=True)
        med = [statistics.median(c) for c in zip(*rows)]
        extra = (f" {med[5]:>13.1f} {med[6]:>11.1f} {med[7]:>12.2f}"
                 f" {med[8]:>17.1f} {med[9]:>15.1f} {med[10]:>10.1f}" if run_peer else "")
        print(f"{'median':<6} {'':>9} {med[0]:>10.3f} {med[1]:>12.3f} {med[2]:>12.2f} "
              f"{med[3]:>13.3f} {med[4]:>13.2f}{extra}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
