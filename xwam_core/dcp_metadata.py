"""torch.distributed.checkpoint's `.metadata`, read with a restricted unpickler.

DCP (the sharded training state of FSDP2 runs, xwam_core.checkpoint) stores its tensors in per-process
files that torch reads with `torch.load(weights_only=True)`, and their index in one `.metadata` file that is
a pickle by nature: torch's own reader unpickles it with `pickle.load`, which would run whatever code a
crafted file names. `RestrictedFileSystemReader` reads it with an unpickler that resolves only the classes
DCP's metadata is made of (its metadata dataclasses, torch.Size, dtypes and layouts, a path) and refuses
anything else with one line naming the file, before any of it runs.

It overrides `FileSystemReader.read_metadata`, whose body relies on torch internals (`_get_metadata_path`,
`fs.create_stream`, `load_id`): torch is pinned (2.14.1) and tests/test_train_fsdp.py reads a real DCP
checkpoint through it, so a torch that changes them fails there.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from xwam_core.errors import XWAMError

_METADATA_CLASSES = (
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name (torch.strided ...)
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of DCP's metadata")


class RestrictedFileSystemReader(dcp.FileSystemReader):
    """dcp.FileSystemReader whose `.metadata` is unpickled with an allow-list (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise XWAMError(f"{path}: not a torch.distributed.checkpoint metadata file ({e})") from None
        if not isinstance(metadata, Metadata):
            raise XWAMError(f"{path}: holds a {type(metadata).__name__}, expected DCP's Metadata")
        storage = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata
