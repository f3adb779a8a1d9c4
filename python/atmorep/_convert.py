"""numpy → torch conversions shared by ``Batch.to_torch`` and ``atmorep.torch``."""

from __future__ import annotations

from typing import Any

#: The arrays of a field that ``to_torch`` converts (``windows`` stays numpy).
FIELD_ARRAYS = ("source", "target", "masked_indices", "masked_counts", "token_info", "pe")


def _tensor(torch: Any, array: Any, bf16: bool, device: Any) -> Any:
    # from_numpy shares the array's memory (and so the client's buffer): no copy.
    tensor = torch.from_numpy(array)
    if bf16:
        # The uint16 array holds bf16 bits: reinterpret them, again without a copy.
        tensor = tensor.view(torch.bfloat16)
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    return tensor


def field_to_torch(torch: Any, field: Any, device: Any = None) -> dict:
    bf16 = field.dtype == "bfloat16"
    out = {}
    for name in FIELD_ARRAYS:
        array = getattr(field, name)
        wide = bf16 and name in ("source", "target", "pe")
        out[name] = _tensor(torch, array, wide, device)
    return out


def batch_to_torch(batch: Any, device: Any = None) -> dict:
    import torch

    out: dict = {
        "sample_ids": torch.from_numpy(batch.sample_ids.astype("int64", copy=False)),
        "sample_epochs": torch.from_numpy(batch.sample_epochs.astype("int64", copy=False)),
        "cursor_after": batch.cursor_after,
    }
    for name, field in batch.fields.items():
        out[name] = field_to_torch(torch, field, device)
    return out
