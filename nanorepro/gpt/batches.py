"""Random (x, y) training batches and whole-split evaluation windows from a prepared dataset folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nanorepro.data.dataset import load_meta
from nanorepro.errors import UserError


class Batches:
    """Random (x, y) training batches from a prepared folder, as nanoGPT's get_batch. Each split's memmap
    is opened once (nanoGPT reopens it per batch against a leak; copying rows out here keeps none)."""

    def __init__(self, data_dir: str | Path, block_size: int, batch_size: int, device: str = "cpu"):
        self.meta = load_meta(data_dir)
        if int(block_size) < 1 or int(batch_size) < 1:
            raise UserError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}",
                            "set positive block_size and batch_size")
        self.block_size, self.batch_size, self.device = int(block_size), int(batch_size), str(device)
        self._data: dict[str, np.memmap] = {}
        for split in ("train", "val"):
            path = Path(data_dir) / f"{split}.bin"
            expected = int(self.meta[f"{split}_tokens"])
            size = path.stat().st_size if path.is_file() else None
            if size != 2 * expected:
                found = "is missing" if size is None else f"has {size:,} bytes ({size // 2:,} tokens)"
                raise UserError(f"{path} {found}, but meta.json says {expected:,} (truncated or changed)",
                                "re-run `nanorepro prepare` to rewrite the dataset")
            if self.block_size >= expected:
                raise UserError(f"block_size {self.block_size} is not shorter than the {split} split "
                                f"({expected:,} tokens)", "use a smaller block_size or a longer text")
            self._data[split] = np.memmap(path, dtype=np.uint16, mode="r")
        self._offsets = np.arange(self.block_size + 1)

    # draw, then read: distributed ranks all draw every batch (one shared stream) and read their own
    def draw(self, split: str, generator=None):
        """The start offsets of one random batch, without reading it."""
        return torch.randint(len(self._split(split)) - self.block_size, (self.batch_size,), generator=generator)

    def windows(self, split: str) -> list:
        """Start offsets of every non-overlapping window of the split (block_size tokens and their targets),
        in order, in batches of batch_size (the last one may be shorter): the whole split, once."""
        starts = torch.arange(0, len(self._split(split)) - self.block_size, self.block_size)
        return list(starts.split(self.batch_size))

    def _split(self, split: str) -> np.memmap:
        if split not in self._data:
            raise UserError(f"unknown split {split!r}", "use 'train' or 'val'")
        return self._data[split]

    def read(self, split: str, ix):
        """(x, y), int64 of shape (batch_size, block_size), for the start offsets `ix` drawn by `draw`;
        y is x shifted by one token."""
        data = self._data[split]
        # one fancy-index read of all rows (block_size + 1 long) instead of 2*batch_size slices
        rows = torch.from_numpy(data[ix.numpy()[:, None] + self._offsets].astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        if self.device.startswith("cuda"):
            # pinned host memory lets the copy overlap with compute
            return (x.contiguous().pin_memory().to(self.device, non_blocking=True),
                    y.contiguous().pin_memory().to(self.device, non_blocking=True))
        return x.contiguous().to(self.device), y.contiguous().to(self.device)
