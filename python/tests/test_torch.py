"""`atmorep.torch.LoaderDataset` in PyTorch DataLoaders against a real loader: an epoch
exactly once through 2 workers and through 2 ranks, tensors without copies, bf16, and
torchdata's `StatefulDataLoader` resuming exactly.

Skipped only when PyTorch is not installed and CI is not set (python/test.sh installs it; in CI
a missing torch fails these tests)."""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI") is None:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (python/test.sh installs it)")
else:
    import torch

from torch.utils.data import DataLoader

from atmorep.torch import LoaderDataset
from conftest import request

EPOCH = 32


def ids(items):
    return [(int(e), int(i)) for it in items for e, i in zip(it["sample_epochs"], it["sample_ids"])]


def assert_whole_epoch(got):
    assert sorted(i for _, i in got) == list(range(EPOCH)), got
    assert all(e == 0 for e, _ in got)


def test_one_process_gives_torch_tensors_without_copies(server):
    items = list(DataLoader(LoaderDataset(server.endpoint, request(end_epoch=1)), batch_size=None))
    assert_whole_epoch(ids(items))
    z = items[0]["z"]
    assert set(z) == {"source", "target", "masked_indices", "masked_counts", "token_info", "pe"}
    assert z["source"].dtype == torch.float32 and z["source"].shape == (4, 72, 9)
    assert z["masked_indices"].dtype == torch.int64
    assert items[-1]["cursor_after"] == {"epoch": 1, "position": 0}


def test_bf16_batches_are_bfloat16_tensors(server):
    item = next(iter(LoaderDataset(server.endpoint, request(end_epoch=1, dtype="bf16"))))
    assert item["z"]["source"].dtype == torch.bfloat16
    assert item["z"]["pe"].dtype == torch.bfloat16
    assert item["z"]["token_info"].dtype == torch.float32
    assert torch.isfinite(item["z"]["source"].float()).all()


def test_two_workers_cover_the_epoch_exactly_once(server):
    loader = DataLoader(
        LoaderDataset(server.endpoint, request(end_epoch=1, batch_size=2)),
        batch_size=None,
        num_workers=2,
    )
    assert_whole_epoch(ids(loader))


def test_two_ranks_of_two_workers_cover_the_epoch_exactly_once(server):
    got = []
    for rank in range(2):
        dataset = LoaderDataset(
            server.endpoint, request(end_epoch=1, batch_size=2), rank=rank, world_size=2
        )
        got += ids(DataLoader(dataset, batch_size=None, num_workers=2))
    assert_whole_epoch(got)


def test_a_bad_request_fails_in_the_main_process():
    with pytest.raises(ValueError, match="batch_sise"):
        LoaderDataset("127.0.0.1:1", request(batch_sise=3))


def test_the_stateful_dataloader_resumes_exactly(server):
    stateful = pytest.importorskip("torchdata.stateful_dataloader") if os.environ.get("CI") is None \
        else __import__("torchdata.stateful_dataloader", fromlist=["StatefulDataLoader"])

    def loader():
        return stateful.StatefulDataLoader(
            LoaderDataset(server.endpoint, request(end_epoch=2, batch_size=2)),
            batch_size=None,
            num_workers=2,
        )

    whole = ids(loader())
    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it, first
    resumed = loader()
    resumed.load_state_dict(state)
    tail = ids(resumed)
    assert sorted(ids(head) + tail) == sorted(whole)
    assert len(ids(head) + tail) == len(whole) == 2 * EPOCH


def test_the_example_trains_checkpoints_and_resumes(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "train_torch.py"
    ckpt = tmp_path / "ckpt.pt"
    common = [sys.executable, str(example), "--endpoint", server.endpoint, "--dataset", "tiny",
              "--checkpoint", str(ckpt), "--every", "10"]
    first = subprocess.run(common + ["--steps", "50"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "done at step 50" in first.stdout, first.stdout
    losses = [float(l.split("loss")[1].split()[0]) for l in first.stdout.splitlines()
              if l.startswith("step")]
    assert losses[-1] < losses[0], first.stdout
    second = subprocess.run(common + ["--steps", "60", "--resume"], capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resumed at step 50" in second.stdout and "done at step 60" in second.stdout


def test_batch_to_torch_shares_the_arrays_memory(server):
    import atmorep

    client = atmorep.Client(server.endpoint)
    batch = next(iter(client.stream(request(end_epoch=1))))
    tensors = batch.to_torch()
    z = batch.fields["z"]
    assert tensors["z"]["source"].data_ptr() == z.source.ctypes.data
    assert tensors["z"]["pe"].data_ptr() == z.pe.ctypes.data
    assert tensors["cursor_after"] == batch.cursor_after
    assert tensors["sample_ids"].tolist() == batch.sample_ids.tolist()
    bf16 = next(iter(client.stream(request(end_epoch=1, dtype="bf16")))).to_torch(device="cpu")
    assert bf16["z"]["source"].dtype == torch.bfloat16
    assert bf16["t"]["target"].dtype == torch.bfloat16
