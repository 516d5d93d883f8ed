"""Tokenized data: the manifest/shard format (shared with `data_prep/`) and the packed reader.

`PackedReader` is imported lazily so that `data_prep` can use the manifest without importing torch.
"""
from .manifest import DataError, Manifest, load_manifest, manifest_hash

__all__ = ["Manifest", "load_manifest", "manifest_hash", "PackedReader", "DataError"]


def __getattr__(name):
    if name == "PackedReader":
        from .reader import PackedReader
        return PackedReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
