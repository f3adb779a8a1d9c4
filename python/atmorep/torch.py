"""``LoaderDataset``: the loader's stream as a PyTorch ``IterableDataset``.

Each DataLoader worker of each ``torch.distributed`` rank streams its own shard of every epoch,
``rank × workers + worker`` of ``world_size × workers`` (the loader's own sharding, so the
shards together cover an epoch exactly once), and keeps the cursor after the last batch it
yielded. ``state_dict()`` / ``load_state_dict()`` hold that cursor: torchdata's
``StatefulDataLoader`` collects it from every worker with each batch and hands it back to the
same worker on resume, which then continues right after the last batch the trainer saw.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import Client, load_request
from ._convert import field_to_torch


class LoaderDataset(IterableDataset):
    """The batches of ``request`` from the loaders at ``endpoints``, one dict per batch.

    ``request`` is a request dict or the path of a request TOML file; its ``rank`` and
    ``world_size`` are replaced by this process's shard. ``rank`` and ``world_size`` default
    to ``torch.distributed``'s (0 and 1 without it). ``prefetch`` batches are decoded ahead in
    each worker; the other keyword arguments go to ``atmorep.Client`` (``token``, ``ca``,
    ``stripe``, …). Use it with ``DataLoader(dataset, batch_size=None, num_workers=…)``: every
    item is already a batch.

    Each item: ``sample_ids`` and ``sample_epochs`` (int64 tensors), ``cursor_after`` (the
    worker's cursor dict) and, per field name, a dict of ``source``, ``target``,
    ``masked_indices``, ``masked_counts``, ``token_info`` and ``pe`` tensors that share the
    client's buffers (no copy; ``torch.bfloat16`` for bf16 requests).
    """

    def __init__(
        self,
        endpoints: str | list[str],
        request: dict | str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 4,
        **client_kwargs: Any,
    ) -> None:
        super().__init__()
        # Checked here, in the main process: a bad request fails before any worker starts.
        self.request = load_request(request)
        self.endpoints = endpoints
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch
        self.client_kwargs = client_kwargs
        # Where this process's shard continues (set by load_state_dict), and where it is.
        self._resume: dict | None = None
        self._cursor: dict | None = None
        # Fails early on bad client settings (no connection is opened).
        Client(endpoints, **client_kwargs)

    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of the shard this process (rank, DataLoader worker) streams."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
        rank = 0 if rank is None else rank
        world = 1 if world is None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world}")
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict]:
        index, count = self.shard()
        request = dict(self.request, rank=index, world_size=count)
        resume = self._resume
        self._cursor = resume
        # Made here, in the worker: a client is not carried across a fork.
        client = Client(self.endpoints, **self.client_kwargs)
        for batch in client.stream(request, resume=resume, prefetch=self.prefetch):
            item: dict = {
                "sample_ids": torch.from_numpy(batch.sample_ids.view("int64")),
                "sample_epochs": torch.from_numpy(batch.sample_epochs.view("int64")),
                "cursor_after": batch.cursor_after,
            }
            for name, field in batch.fields.items():
                item[name] = field_to_torch(torch, field)
            self._cursor = item["cursor_after"]
            yield item

    def state_dict(self) -> dict:
        """This process's shard and the cursor after the last batch it yielded."""
        index, count = self.shard()
        return {"shard": index, "shards": count, "cursor": self._cursor}

    def load_state_dict(self, state: dict) -> None:
        """Continues after the batch ``state`` was taken at (from ``state_dict`` of the same
        shard: the same ranks, workers and request)."""
        index, count = self.shard()
        if (state.get("shard"), state.get("shards")) != (index, count):
            raise ValueError(
                f"the state is of shard {state.get('shard')} of {state.get('shards')}, "
                f"this process streams shard {index} of {count}: resume with the same ranks "
                "and workers"
            )
        self._resume = state.get("cursor")
        self._cursor = self._resume
