"""Type stubs of the native module (python/src)."""

from os import PathLike
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

__version__: str

Request = dict[str, Any] | str | PathLike[str]
Cursor = dict[str, int]

class LoaderError(Exception):
    """A failed loader call."""

    code: str | None
    """The gRPC status name (``"INVALID_ARGUMENT"``, ``"UNAVAILABLE"``, …), None without one."""
    message: str
    """The server's message (it names the offending request field)."""

class FieldBatch:
    """One field of every sample of a batch: ``B`` samples, ``N`` tokens of ``V`` values,
    ``M`` masked tokens in all, positional-encoding width ``W``."""

    name: str
    dtype: str
    """``"float32"``, or ``"bfloat16"`` (then source, target and pe are uint16 bf16 bits)."""
    source: npt.NDArray[np.float32] | npt.NDArray[np.uint16]
    """``[B, N, V]``: the model input after masking."""
    target: npt.NDArray[np.float32] | npt.NDArray[np.uint16]
    """``[M, V]``: the masked tokens' original values, sample by sample."""
    masked_indices: npt.NDArray[np.int64]
    """``[M]``: the masked tokens' indices in ``0..N``, sample by sample, ascending."""
    masked_counts: npt.NDArray[np.int64]
    """``[B]``: masked tokens per sample."""
    token_info: npt.NDArray[np.float32]
    """``[B, N, 8]``."""
    pe: npt.NDArray[np.float32] | npt.NDArray[np.uint16]
    """``[B, N, W]``."""
    windows: npt.NDArray[np.int64]
    """``[B, 6]``: time, lat, lon start on the grid, then the size along (time, lat, lon)."""

class Batch:
    """A decoded batch."""

    sample_ids: npt.NDArray[np.uint64]
    sample_epochs: npt.NDArray[np.uint64]
    end_of_stream: bool
    fields: dict[str, FieldBatch]
    @property
    def cursor_after(self) -> Cursor: ...
    def __len__(self) -> int: ...
    def to_torch(self, device: Any = None) -> dict[str, Any]:
        """A dict of torch tensors sharing the arrays' memory (bf16 as ``torch.bfloat16``)."""

class Stream(Iterator[Batch]):
    """The batches of one request."""

    def __iter__(self) -> Stream: ...
    def __next__(self) -> Batch: ...
    @property
    def cursor(self) -> Cursor | None: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...

class Client:
    """A client of one or more equivalent loaders."""

    def __init__(
        self,
        endpoints: str | list[str],
        token: str | None = None,
        ca: str | bytes | PathLike[str] | None = None,
        stripe: bool = False,
        *,
        tls_domain: str | None = None,
        connect_timeout: float = 5.0,
        retry_timeout: float = 60.0,
        compression: str | None = None,
    ) -> None: ...
    @property
    def endpoints(self) -> list[str]: ...
    def datasets(self) -> list[str]: ...
    def dataset_info(self, name: str) -> dict[str, Any]: ...
    def statistics(self, dataset: str, variable: str) -> dict[str, npt.NDArray[Any]]: ...
    def stream(
        self, request: Request, resume: Cursor | None = None, prefetch: int = 4
    ) -> Stream: ...

def load_request(request: Request) -> dict[str, Any]:
    """The request checked and completed with its defaults (ValueError naming a bad key)."""
