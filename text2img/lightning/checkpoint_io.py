"""Checkpoint files that are whole or absent: a kill in the middle of a save leaves the previous checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from text2img.utils.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` writing each local checkpoint to a temporary file beside its target
    (`.<name>.<pid>.tmp`), synced to disk, then renamed onto the target: readers and resumed runs see the old
    file or the new one, never a part.

    Lightning's own save stages the file in the system's temporary folder and moves it: a copy, not a rename,
    when that folder is on another file system (a node's local /tmp, checkpoints on shared storage), during which
    a kill leaves a truncated checkpoint at the target. Remote paths (s3://...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # the rename must not reach the disk before the bytes do
