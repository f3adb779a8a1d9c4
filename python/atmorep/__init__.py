"""The atmorep-rs loader's stream of training batches in Python.

``Client`` talks to one or more ``atmorep loader serve`` processes through the Rust client of
atmorep-rs (failover, reconnection with resume, striping, large HTTP/2 frames, buffer
recycling); ``Client.stream`` yields ``Batch`` objects whose numpy arrays borrow the client's
decoded buffers. ``atmorep.torch.LoaderDataset`` is the PyTorch ``IterableDataset`` over it.
See python/README.md.
"""

from ._atmorep import (
    Batch,
    Client,
    FieldBatch,
    LoaderError,
    Stream,
    __version__,
    load_request,
)

__all__ = [
    "Batch",
    "Client",
    "FieldBatch",
    "LoaderError",
    "Stream",
    "__version__",
    "load_request",
]
