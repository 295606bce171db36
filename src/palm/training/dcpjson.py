"""torch.distributed.checkpoint storage that never unpickles: metadata in JSON, tensors only.

DCP's own FileSystemWriter/Reader keep the checkpoint's metadata as a pickle (`.metadata`) and store
every non-tensor value as a pickle too; reading a crafted checkpoint would run its code. Here the
metadata is `metadata.json`, only tensor entries are accepted (their bytes are read with
`torch.load(weights_only=True)`, which admits tensors alone), and non-tensor state (step counts,
optimizer settings) lives in the checkpoint's state.json beside it. A pickled `.metadata` is never
opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..core.errors import CheckpointError

METADATA = "metadata.json"
FORMAT = 1


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{METADATA} names an unknown dtype {name!r}")
    return dtype


def encode(metadata: Metadata) -> dict[str, Any]:
    tensors = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{fqn} is not a tensor: palm's sharded checkpoints hold tensors only")
        tensors[fqn] = {
            "dtype": str(md.properties.dtype).removeprefix("torch."),
            "size": list(md.size),
            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
        }
    storage = [
        {
            "fqn": index.fqn,
            "offset": None if index.offset is None else list(index.offset),
            "index": index.index,
            "path": info.relative_path,
            "start": info.offset,
            "length": info.length,
            "transforms": list(info.transform_descriptors) if info.transform_descriptors else None,
        }
        for index, info in metadata.storage_data.items()
    ]
    planner = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    return {"format": FORMAT, "version": metadata.version, "tensors": tensors, "storage": storage, "planner": planner}


def decode(raw: Any) -> Metadata:
    try:
        if raw["format"] != FORMAT:
            raise CheckpointError(f"{METADATA} has format {raw['format']!r}; this palm reads format {FORMAT}")
        tensors = {
            fqn: TensorStorageMetadata(
                properties=TensorProperties(dtype=_dtype(md["dtype"])),
                size=torch.Size(int(n) for n in md["size"]),
                chunks=[
                    ChunkStorageMetadata(
                        offsets=torch.Size(map(int, c["offsets"])), sizes=torch.Size(map(int, c["sizes"]))
                    )
                    for c in md["chunks"]
                ],
            )
            for fqn, md in raw["tensors"].items()
        }
        storage = {}
        for item in raw["storage"]:
            if Path(item["path"]).name != item["path"] or item["path"].startswith("."):
                raise CheckpointError(f"{METADATA} points outside its folder ({item['path']!r})")
            offset = None if item["offset"] is None else torch.Size(map(int, item["offset"]))
            key = MetadataIndex(fqn=str(item["fqn"]), offset=offset, index=item["index"])
            storage[key] = _StorageInfo(
                relative_path=item["path"],
                offset=int(item["start"]),
                length=int(item["length"]),
                transform_descriptors=item["transforms"],
            )
        planner = {k: tuple(v) for k, v in raw["planner"].items()}
        return Metadata(
            state_dict_metadata=tensors,  # type: ignore[arg-type]
            planner_data=planner,
            storage_data=storage,
            version=raw["version"],
            storage_meta=StorageMeta(),
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{METADATA} is corrupt ({type(e).__name__}: {e})") from None


class JsonWriter(FileSystemWriter):
    def finish(self, metadata: Metadata, results) -> None:
        metadata.storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        metadata.version = getattr(metadata, "version", None)
        path = Path(self.path) / METADATA
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(encode(metadata), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class JsonReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent} has no {METADATA}: not a palm sharded checkpoint") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: {e}") from None
        metadata = decode(raw)
        metadata.storage_meta.load_id = self.load_id
        return metadata
