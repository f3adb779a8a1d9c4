"""Trains a small masked-token transformer from the loader's stream, checkpointing the loader's
state with the model and resuming from it.

    atmorep loader synth demo.zarr --grid 5 --variables t --levels 850,500
    atmorep loader stats demo.zarr
    atmorep loader serve --dataset demo=demo.zarr --bind 127.0.0.1:50051 &
    python python/examples/train_torch.py --endpoint 127.0.0.1:50051 --steps 300 \
        --checkpoint ckpt.pt                        # loss falls; stop it any time
    python python/examples/train_torch.py --endpoint 127.0.0.1:50051 --steps 400 \
        --checkpoint ckpt.pt --resume               # goes on from step and sample where it was

The model sees each field's tokens (the masked ones replaced by the loader, see `mask` below)
with their positional encoding and predicts the original values of the masked tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from atmorep.torch import LoaderDataset

try:  # torchdata's loader keeps the workers' cursors in its state; else one worker.
    from torchdata.stateful_dataloader import StatefulDataLoader
except ImportError:
    StatefulDataLoader = None


def request(dataset: str) -> dict:
    return {
        "dataset": dataset,
        "batch_size": 8,
        "seed": 1,
        "fields": [
            {
                "name": "t",
                "levels": [850, 500],
                "num_tokens": [2, 4, 8],
                "token_size": [1, 3, 3],
                "pe": "local",
                "pe_width": 16,
                "mask": {"kind": "bert", "r_max": 0.5},
            }
        ],
    }


class MaskedTokenModel(nn.Module):
    def __init__(self, values: int, pe_width: int, width: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(values + pe_width, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(width, values)

    def forward(self, source, pe):
        return self.head(self.encoder(self.embed(torch.cat([source, pe], dim=-1))))


def masked_loss(prediction, field):
    """MSE between the predictions at the masked tokens and their original values."""
    counts = field["masked_counts"]
    rows = torch.repeat_interleave(torch.arange(len(counts)), counts)
    picked = prediction[rows, field["masked_indices"]]
    return nn.functional.mse_loss(picked, field["target"].float())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default="127.0.0.1:50051")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--checkpoint", default="ckpt.pt")
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    dataset = LoaderDataset(args.endpoint, request(args.dataset))
    if StatefulDataLoader is not None:
        loader = StatefulDataLoader(dataset, batch_size=None, num_workers=args.workers)
    else:
        loader = DataLoader(dataset, batch_size=None, num_workers=0)
    model = MaskedTokenModel(values=9, pe_width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = 0
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        (loader if StatefulDataLoader is not None else dataset).load_state_dict(state["loader"])
        step = state["step"]
        print(f"resumed at step {step}")

    def save() -> None:
        loader_state = (loader if StatefulDataLoader is not None else dataset).state_dict()
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "loader": loader_state, "step": step},
            args.checkpoint,
        )

    started, running = time.monotonic(), None
    for batch in loader:
        if step >= args.steps:
            break
        field = batch["t"]
        loss = masked_loss(model(field["source"].float(), field["pe"].float()), field)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 25 == 0:
            print(f"step {step:5d}  loss {running:.4f}  ({time.monotonic() - started:.1f} s)",
                  flush=True)
        if step % args.every == 0:
            save()
    save()
    print(f"done at step {step}, loss {running:.4f}; checkpoint {args.checkpoint}")


if __name__ == "__main__":
    main()
