"""The one definition of the tokenized-data format, shared by `data_prep/` (writer) and the reader.

A data folder holds `manifest.json`, the tokenizer model and Arrow IPC shard files::

    {
      "format": 1,
      "tokenizer": {"type": "sentencepiece", "path": "tokenizer.model", "sha256": "...",
                    "vocab_size": 4000, "eos_id": 2, "bos_id": 1, "pad_id": 3, "unk_id": 0, ...},
      "token_dtype": "uint16",
      "split_rule": {"method": "sha256", "key": "content", "val_fraction": 0.05, ...},
      "splits": {
        "train":      {"documents": N, "tokens": T, "shards": [{"file": "train-00000.arrow",
                       "rows": n, "tokens": t, "bytes": b, "sha256": "..."}, ...]},
        "validation": {...}
      },
      "stats": {...}, "sources": [...]
    }

Every shard has one row per document: `tokens` (list<uint16|uint32>, no EOS; the reader appends it)
and `doc_id` (string, the document's identity, e.g. `path` or `path:line`). The shard's Arrow schema
metadata repeats the format version, split and tokenizer hash. `tokens` counts exclude the EOS.
Unknown top-level keys and unknown keys inside entries are preserved, so later issues can add
sources, blends and per-task splits without breaking older data folders.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_COLUMN = "tokens"
DOC_ID_COLUMN = "doc_id"
TOKEN_DTYPES = ("uint16", "uint32")
# Arrow schema metadata keys written into every shard.
META_FORMAT = b"hybridlm.format"
META_SPLIT = b"hybridlm.split"
META_TOKENIZER_SHA256 = b"hybridlm.tokenizer_sha256"



class DataError(RuntimeError):
    """Bad, missing or mismatching data; the message names the file (and line) at fault."""


def sha256_file(path: os.PathLike | str, block_size: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            block = handle.read(block_size)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def token_dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype holding every id of a vocabulary."""
    return "uint16" if vocab_size <= (1 << 16) else "uint32"


def _need(mapping: Dict[str, Any], key: str, kind, where: str):
    if key not in mapping:
        raise DataError(f"{where}: missing key '{key}'")
    value = mapping[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise DataError(f"{where}: key '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


@dataclass
class ShardInfo:
    file: str
    """File name relative to the data folder."""
    rows: int
    """Documents in the shard."""
    tokens: int
    """Tokens in the shard (EOS separators not included)."""
    bytes: int
    """File size in bytes."""
    sha256: str
    """Hex sha256 of the file."""
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str) -> "ShardInfo":
        if not isinstance(d, dict):
            raise DataError(f"{where}: shard entry must be an object, got {d!r}")
        name = _need(d, "file", str, where)
        if os.path.isabs(name) or ".." in Path(name).parts or not name:
            raise DataError(f"{where}: shard file '{name}' must be a plain path inside the data folder")
        known = {"file", "rows", "tokens", "bytes", "sha256"}
        return cls(file=name, rows=_need(d, "rows", int, where), tokens=_need(d, "tokens", int, where),
                   bytes=_need(d, "bytes", int, where), sha256=_need(d, "sha256", str, where),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> Dict[str, Any]:
        out = {"file": self.file, "rows": self.rows, "tokens": self.tokens, "bytes": self.bytes,
               "sha256": self.sha256}
        out.update(self.extra)
        return out


@dataclass
class SplitInfo:
    name: str
    shards: List[ShardInfo]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @classmethod
    def from_dict(cls, name: str, d: Dict[str, Any], where: str) -> "SplitInfo":
        if not isinstance(d, dict):
            raise DataError(f"{where}: split '{name}' must be an object")
        shards_raw = _need(d, "shards", list, f"{where}: split '{name}'")
        shards = [ShardInfo.from_dict(s, f"{where}: split '{name}' shard {i}") for i, s in enumerate(shards_raw)]
        extra = {k: v for k, v in d.items() if k != "shards"}
        split = cls(name=name, shards=shards, extra=extra)
        for key, actual in (("documents", split.documents), ("tokens", split.tokens)):
            if key in extra and extra[key] != actual:
                raise DataError(f"{where}: split '{name}' says {key}={extra[key]} but its shards sum to {actual}")
        return split

    def to_dict(self) -> Dict[str, Any]:
        out = dict(self.extra)
        out["documents"] = self.documents
        out["tokens"] = self.tokens
        out["shards"] = [s.to_dict() for s in self.shards]
        return out


@dataclass
class TokenizerInfo:
    path: str
    """Model file, relative to the data folder (or absolute)."""
    sha256: str
    vocab_size: int
    eos_id: int
    bos_id: int = -1
    pad_id: int = -1
    unk_id: int = -1
    type: str = "sentencepiece"
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str) -> "TokenizerInfo":
        if not isinstance(d, dict):
            raise DataError(f"{where}: 'tokenizer' must be an object")
        w = f"{where}: tokenizer"
        info = cls(path=_need(d, "path", str, w), sha256=_need(d, "sha256", str, w),
                   vocab_size=_need(d, "vocab_size", int, w), eos_id=_need(d, "eos_id", int, w),
                   bos_id=int(d.get("bos_id", -1)), pad_id=int(d.get("pad_id", -1)),
                   unk_id=int(d.get("unk_id", -1)), type=str(d.get("type", "sentencepiece")),
                   extra={k: v for k, v in d.items()
                          if k not in {"path", "sha256", "vocab_size", "eos_id", "bos_id", "pad_id", "unk_id", "type"}})
        if info.vocab_size <= 0:
            raise DataError(f"{w}: vocab_size must be positive, got {info.vocab_size}")
        if not 0 <= info.eos_id < info.vocab_size:
            raise DataError(f"{w}: eos_id {info.eos_id} is not a valid id (documents are joined with EOS)")
        return info

    def to_dict(self) -> Dict[str, Any]:
        out = {"type": self.type, "path": self.path, "sha256": self.sha256, "vocab_size": self.vocab_size,
               "eos_id": self.eos_id, "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id}
        out.update(self.extra)
        return out


@dataclass
class Manifest:
    tokenizer: TokenizerInfo
    splits: Dict[str, SplitInfo]
    token_dtype: str = "uint16"
    format: int = FORMAT_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)
    """Other top-level keys (split_rule, stats, sources, ...), preserved as they are."""
    data_dir: Optional[Path] = None
    """Folder the manifest was loaded from (set by `load_manifest`)."""

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        if not isinstance(d, dict):
            raise DataError(f"{where}: top level must be a JSON object")
        fmt = _need(d, "format", int, where)
        if fmt > FORMAT_VERSION or fmt < 1:
            raise DataError(f"{where}: format {fmt} is not supported (this code reads format {FORMAT_VERSION}); "
                            "re-run data_prep or update the code")
        tokenizer = TokenizerInfo.from_dict(d.get("tokenizer"), where)
        dtype = d.get("token_dtype", token_dtype_for_vocab(tokenizer.vocab_size))
        if dtype not in TOKEN_DTYPES:
            raise DataError(f"{where}: token_dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
        if dtype == "uint16" and tokenizer.vocab_size > (1 << 16):
            raise DataError(f"{where}: token_dtype uint16 cannot hold vocab_size {tokenizer.vocab_size}")
        splits_raw = _need(d, "splits", dict, where)
        splits = {name: SplitInfo.from_dict(name, s, where) for name, s in splits_raw.items()}
        files = [s.file for sp in splits.values() for s in sp.shards]
        dupes = sorted({f for f in files if files.count(f) > 1})
        if dupes:
            raise DataError(f"{where}: shard file(s) listed more than once: {dupes}")
        extra = {k: copy.deepcopy(v) for k, v in d.items()
                 if k not in {"format", "tokenizer", "token_dtype", "splits"}}
        return cls(tokenizer=tokenizer, splits=splits, token_dtype=dtype, format=fmt, extra=extra)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"format": self.format, "tokenizer": self.tokenizer.to_dict(),
                               "token_dtype": self.token_dtype}
        out.update(copy.deepcopy(self.extra))
        out["splits"] = {name: sp.to_dict() for name, sp in self.splits.items()}
        return out

    def save(self, data_dir: os.PathLike | str) -> Path:
        """Write `manifest.json` atomically (temp file + rename)."""
        path = Path(data_dir) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    # ---- queries ------------------------------------------------------------------------
    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"{self._where()}: no split '{name}' (available: {sorted(self.splits)})")
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> Path:
        return (self.data_dir or Path(".")) / shard.file

    @property
    def tokenizer_path(self) -> Path:
        p = Path(self.tokenizer.path)
        return p if p.is_absolute() else (self.data_dir or Path(".")) / p

    def fingerprint(self, split: str) -> str:
        """Identity of one split's token stream: tokenizer hash, dtype and the ordered shard list.

        Stable across re-runs that produce the same shards (the manifest holds no timestamps)."""
        sp = self.split(split)
        ident = {"tokenizer_sha256": self.tokenizer.sha256, "token_dtype": self.token_dtype,
                 "shards": [[s.file, s.sha256, s.rows, s.tokens] for s in sp.shards]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def _where(self) -> str:
        return str((self.data_dir or Path(".")) / MANIFEST_NAME)

    # ---- verification -------------------------------------------------------------------
    def check_tokenizer(self, expected_sha256: Optional[str] = None, verify_file: bool = True) -> None:
        """Refuse a tokenizer that differs from `expected_sha256` or from the model file on disk."""
        if expected_sha256 is not None and expected_sha256 != self.tokenizer.sha256:
            raise DataError(f"{self._where()}: tokenizer sha256 {self.tokenizer.sha256[:16]}... differs from the "
                            f"expected {expected_sha256[:16]}... (data was tokenized with another tokenizer)")
        path = self.tokenizer_path
        if verify_file and path.exists():
            actual = sha256_file(path)
            if actual != self.tokenizer.sha256:
                raise DataError(f"{path}: tokenizer model sha256 {actual[:16]}... does not match the manifest's "
                                f"{self.tokenizer.sha256[:16]}... (was the tokenizer replaced after tokenizing?)")

    def verify_shard(self, shard: ShardInfo, verify_checksum: bool = True) -> Path:
        """Check a shard file exists, has the listed size and (optionally) sha256."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {self._where()} is missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise DataError(f"{path}: shard size {size} bytes does not match the manifest's {shard.bytes} "
                            "(corrupted, truncated or rewritten)")
        if verify_checksum:
            actual = sha256_file(path)
            if actual != shard.sha256:
                raise DataError(f"{path}: shard sha256 {actual[:16]}... does not match the manifest's "
                                f"{shard.sha256[:16]}... (corrupted or rewritten)")
        return path


def manifest_hash(manifest: "Manifest | os.PathLike | str") -> str:
    """Hex sha256 identifying a data folder's content: tokenizer hash, token dtype and every split's
    ordered shards (file, sha256, rows, tokens). Equal for two runs of data_prep that wrote the same
    shards (the manifest holds no timestamps); different as soon as any token of any split differs.
    A checkpoint stores it so that a resume can tell the data changed underneath it."""
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    ident = {"tokenizer_sha256": m.tokenizer.sha256, "token_dtype": m.token_dtype,
             "splits": {name: [[s.file, s.sha256, s.rows, s.tokens] for s in sp.shards]
                        for name, sp in sorted(m.splits.items())}}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def load_manifest(data_dir: os.PathLike | str) -> Manifest:
    """Read and validate `<data_dir>/manifest.json` (a path to the JSON file itself also works)."""
    path = Path(data_dir)
    if path.is_dir() or not path.suffix == ".json":
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (run `python -m data_prep.prepare ... --out_dir {path.parent}` first)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    manifest = Manifest.from_dict(raw, where=str(path))
    manifest.data_dir = path.parent
    return manifest
