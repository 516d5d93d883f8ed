"""Several data folders (or document ranges of one) behind one sample-id space, and per-sample blending.

A *source* is one folder's train split, optionally restricted to a document range (`continual.num_tasks`
splits a folder into parts). Each source is a `PackedReader` used as a random-access store: its sample
`n` (n = 0, 1, 2, ...) is window `window_of(n)` of its own deterministic order (seed, epoch), so a source
needs only a counter of samples consumed, identical on every rank.

Sample ids stay globally unique across sources and tasks because they carry the source:
`id = code << SOURCE_SHIFT | n` (code >= 1). Stream windows are encoded the same way, so `BatchGuard`'s
quarantine (`window_of`, `sample_documents`) works unchanged on blended and replayed samples.

Blending is per sample and deterministic: `WeightedRoundRobin` assigns global slot `g` to the source
with the largest deficit `(g + 1) * w_i - c_i` (c_i: slots it got so far; ties to the first), i.e.
smooth weighted round-robin. Every prefix of the slot sequence holds each source within one slot of
its exact share, and the assignment depends only on (weights, counts), which every rank holds alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .manifest import DataError, load_manifest
from .reader import PackedReader

SOURCE_SHIFT = 40  # 2^40 samples (or windows) per source; codes up to 2^22 keep ids inside int64
_LOW = (1 << SOURCE_SHIFT) - 1


@dataclass(frozen=True)
class SourceKey:
    data_dir: str
    """Resolved folder path."""
    documents: Optional[Tuple[int, int]] = None
    """Train-split document range [first, end), or None for the whole split."""
    val_documents: Optional[Tuple[int, int]] = None
    """Validation-split document range, or None for the whole split."""

    def label(self) -> str:
        return self.data_dir + (f" documents [{self.documents[0]}, {self.documents[1]})" if self.documents else "")


class SourcePool:
    """The sources of a run, each opened once, with the id encoding and vectorised token reads."""

    def __init__(self, sequence_length: int, seed: int, verify_checksums: bool = True):
        self.sequence_length = int(sequence_length)
        self.seed = int(seed)
        self.verify_checksums = verify_checksums
        self.keys: List[SourceKey] = []
        self.readers: List[PackedReader] = []  # index = code - 1
        self._codes: Dict[SourceKey, int] = {}
        self._validation: Dict[Tuple[int, int, int, int], PackedReader] = {}

    def add(self, key: SourceKey) -> int:
        """The code of a source (the same folder and range always gets the same one)."""
        code = self._codes.get(key)
        if code is None:
            reader = PackedReader(key.data_dir, split="train", sequence_length=self.sequence_length,
                                  micro_batch_size=1, seed=self.seed, rank=0, world_size=1,
                                  verify_checksums=self.verify_checksums, documents=key.documents)
            if reader.num_windows == 0:
                raise DataError(f"{key.label()}: the train split holds {reader.num_tokens} tokens, fewer than one "
                                f"sample of {self.sequence_length + 1}; use more data or a shorter sequence_length")
            self.keys.append(key)
            self.readers.append(reader)
            code = self._codes[key] = len(self.keys)
        return code

    def reader(self, code: int) -> PackedReader:
        if not 1 <= code <= len(self.readers):
            raise DataError(f"sample id names source {code}, but this run has sources 1..{len(self.readers)}")
        return self.readers[code - 1]

    def validation(self, code: int, rank: int, world_size: int, micro_batch_size: int) -> PackedReader:
        """The validation split of a source, laid out for evaluation on this rank (opened once)."""
        handle = (code, rank, world_size, micro_batch_size)
        if handle not in self._validation:
            key = self.keys[code - 1]
            self._validation[handle] = PackedReader(
                key.data_dir, split="validation", sequence_length=self.sequence_length,
                micro_batch_size=micro_batch_size, seed=self.seed, rank=rank, world_size=world_size,
                verify_checksums=self.verify_checksums, documents=key.val_documents)
        return self._validation[handle]

    # ---- ids -----------------------------------------------------------------------------
    @staticmethod
    def encode(code: int, n: np.ndarray) -> np.ndarray:
        return (np.int64(code) << np.int64(SOURCE_SHIFT)) | np.asarray(n, dtype=np.int64)

    @staticmethod
    def decode(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int64)
        return ids >> SOURCE_SHIFT, ids & _LOW

    def window_of(self, sample_id: int) -> int:
        """The encoded stream window of a sample id (the same data whatever the epoch): what quarantine keys on."""
        code, n = int(sample_id) >> SOURCE_SHIFT, int(sample_id) & _LOW
        return (code << SOURCE_SHIFT) | self.reader(code).window_of(n)

    def windows_of(self, ids: Sequence[int]) -> np.ndarray:
        return np.array([self.window_of(i) for i in np.asarray(ids, dtype=np.int64).tolist()], dtype=np.int64)

    def sample_documents(self, sample_id: int) -> List[str]:
        code, n = int(sample_id) >> SOURCE_SHIFT, int(sample_id) & _LOW
        folder = self.keys[code - 1].data_dir
        return [f"{folder}:{doc}" for doc in self.reader(code).sample_documents(n)]

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """Tokens (int64 [len(ids), sequence_length + 1]) of the given sample ids; one vectorised read per source."""
        ids = np.asarray(ids, dtype=np.int64)
        L1 = self.sequence_length + 1
        out = np.empty((len(ids), L1), dtype=np.int64)
        codes, ns = self.decode(ids)
        for code in np.unique(codes):
            rows = np.nonzero(codes == code)[0]
            reader = self.reader(int(code))
            windows = np.array([reader.window_of(int(n)) for n in ns[rows]], dtype=np.int64)
            out[rows] = reader.read_stream(windows * L1, L1)
        return torch.from_numpy(out)

    # ---- facts ---------------------------------------------------------------------------
    def check_one_tokenizer(self, folders: Sequence[str]) -> None:
        """All folders must share one tokenizer (same sha256 in their manifests): token ids mean the same."""
        by_hash: Dict[str, List[str]] = {}
        for folder in dict.fromkeys(folders):
            by_hash.setdefault(load_manifest(folder).tokenizer.sha256, []).append(folder)
        if len(by_hash) > 1:
            groups = "; ".join(f"{', '.join(names)} (tokenizer sha256 {sha[:12]}...)" for sha, names in by_hash.items())
            raise DataError(f"the continual tasks' data folders were tokenized with different tokenizers: {groups}. "
                            "Tokenize every folder with the same tokenizer (data_prep --tokenizer <one .model>)")


class WeightedRoundRobin:
    """Smooth weighted round-robin over the entries of a blend: exact proportions, deterministic, stateless
    apart from the per-entry counts the caller keeps."""

    def __init__(self, weights: Sequence[float]):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(w > 0):
            raise DataError(f"blend weights must be positive, got {list(weights)}")
        self.weights = w / w.sum()

    def assign(self, counts: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """Entries of the next `n` slots, given each entry's slot count so far; returns (entries, new counts).

        A loop over slots (not tokens), with O(entries) work each: a micro-step assigns micro_batch x ranks slots."""
        counts = np.asarray(counts, dtype=np.int64).copy()
        if len(self.weights) == 1:
            counts[0] += n
            return np.zeros(n, dtype=np.int64), counts
        entries = np.empty(n, dtype=np.int64)
        slot = int(counts.sum())
        for j in range(n):
            deficit = (slot + j + 1) * self.weights - counts
            i = int(np.argmax(deficit))  # first maximum: ties go to the earlier entry
            entries[j] = i
            counts[i] += 1
        return entries, counts
