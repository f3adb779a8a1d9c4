"""Fixtures: the tiny synthetic store (written by `atmorep loader synth`, with its statistics)
and real `atmorep loader serve` processes on 127.0.0.1.

The binary is `$ATMOREP_BIN`, else `$CARGO_TARGET_DIR/{release,debug}/atmorep`, else
`target/{release,debug}/atmorep` of the workspace (whichever exists, release first).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "proto" / "tests" / "fixtures"
TOKEN = "correct horse battery staple"


def atmorep_bin() -> Path:
    if "ATMOREP_BIN" in os.environ:
        return Path(os.environ["ATMOREP_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for profile in ("release", "debug"):
        candidate = target / profile / "atmorep"
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"no atmorep binary under {target}: build it (`cargo build -p atmorep`) or set ATMOREP_BIN"
    )


def run(*args: str) -> str:
    done = subprocess.run(
        [str(atmorep_bin()), *args], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"atmorep {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


class Server:
    """`atmorep loader serve ARGS --bind BIND`, its address read from `listening on ADDR`."""

    def __init__(self, args: list[str], log: Path, bind: str = "127.0.0.1:0"):
        self.args, self.log_path, self.proc = args, log, None
        self.start(bind)

    def start(self, bind: str) -> None:
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(atmorep_bin()), "loader", "serve", *self.args, "--bind", bind],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "RUST_LOG": "info"},
        )
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("listening on ") and not found:
                    found.append(line.split("listening on ", 1)[1].strip())
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or not found:
            self.stop()
            raise RuntimeError(f"the loader did not start:\n{self.log_path.read_text()}")
        self.addr = found[0]

    @property
    def endpoint(self) -> str:
        return f"http://{self.addr}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self) -> None:
        """Starts the server again on the same port."""
        self.start(self.addr)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def request(dataset: str = "tiny", batch_size: int = 4, samples_per_block: int = 8, **extra):
    """The cross-process tests' request (testkit's `request_toml`): `z` on both levels
    (BERT-masked) and `t` on 500 hPa; an epoch has 32 samples with the default 8 per block."""
    req = {
        "dataset": dataset,
        "batch_size": batch_size,
        "seed": 7,
        "samples_per_block": samples_per_block,
        "fields": [
            {
                "name": "z",
                "levels": [850, 500],
                "num_tokens": [2, 3, 6],
                "token_size": [1, 3, 3],
                "pe": "local",
                "pe_width": 8,
                "mask": {"kind": "bert", "r_max": 0.5},
            },
            {
                "name": "t",
                "levels": [500],
                "num_tokens": [2, 3, 6],
                "token_size": [1, 3, 3],
                "pe": "global",
                "pe_width": 8,
            },
        ],
    }
    req.update(extra)
    return req


def to_toml(value, key: str = "") -> str:
    """A request dict as TOML (for `atmorep loader pull --request`)."""
    lines, tables = [], []
    for k, v in value.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {scalar(v)}")
    for k, items in tables:
        for item in items:
            lines.append(f"\n[[{k}]]")
            lines.extend(f"{ik} = {scalar(iv)}" for ik, iv in item.items())
    return "\n".join(lines) + "\n"


def scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(scalar(x) for x in v) + "]"
    return json.dumps(v)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """The tiny store (10° grid, `z` and `t` on 850/500 hPa, 40 steps of 6 h) and its stats."""
    path = tmp_path_factory.mktemp("store") / "tiny.zarr"
    run(
        "loader", "synth", str(path), "--grid", "10", "--steps", "40", "--step-hours", "6",
        "--levels", "850,500", "--variables", "z,t", "--cyclones", "0",
    )
    run("loader", "stats", str(path))
    return path


@pytest.fixture(scope="session")
def server(tiny_store, tmp_path_factory):
    """A loader serving the tiny store as `tiny`, for the whole session (tests that kill their
    loader start their own)."""
    srv = Server(["--dataset", f"tiny={tiny_store}"], tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    srv.stop()


@pytest.fixture()
def own_server(tiny_store, tmp_path):
    """A loader of this test only."""
    srv = Server(["--dataset", f"tiny={tiny_store}"], tmp_path / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tls_server(tiny_store, tmp_path_factory):
    """A loader with TLS (the fixture certificate for `loader.test`) and a bearer token."""
    dir = tmp_path_factory.mktemp("tls")
    config = dir / "loader.toml"
    config.write_text(
        f'token = "{TOKEN}"\n\n[tls]\ncert = "{FIXTURES / "server.pem"}"\n'
        f'key = "{FIXTURES / "server.key"}"\n\n'
        f'[[datasets]]\nname = "tiny"\nurl = "{tiny_store}"\n'
    )
    srv = Server(["--config", str(config)], dir / "server.log")
    yield srv
    srv.stop()
