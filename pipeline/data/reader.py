"""Packed, memory-mapped, deterministic and resumable reader of the Arrow shards.

Token stream: the split's documents in manifest order (shard by shard, row by row), each followed by
EOS. Training samples are non-overlapping windows of `sequence_length + 1` stream tokens
(inputs = window[:-1], targets = window[1:]); the tail that does not fill a window is dropped.

Order: epoch `e` uses the permutation `numpy.random.default_rng((seed, e)).permutation(num_windows)`,
whatever the number of ranks. The ranks walk it together: `consumed` positions of the epoch's order
are used up, and the next micro-batch of rank `r` of `w` holds positions `consumed + b*w + r`
(b < B, interleaved); after it, `consumed` has grown by `B*w` on every rank. When the rest of the
order cannot fill one more micro-batch on every rank, the epoch ends and that rest (fewer than
`B*w` windows, `samples_dropped`; a different subset each epoch) is skipped. `num_samples =
batches_per_epoch * B * w` is what an epoch uses when it starts from position 0.
`sample_index` = `epoch * num_windows + position`: unique across ranks and epochs, independent of the
number of ranks, and `sample_tokens(sample_index)` re-reads that sample.

The `state_dict` is the same on every rank (DeepSpeed writes client state from rank 0 only) and
holds no rank layout: a run checkpointed at N ranks (or micro batch B) continues at M ranks (or
B') from the same position of the same epoch, so no sample of the epoch is read twice or skipped.
At an unchanged layout the order is exactly the one of an uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import torch

from .manifest import (DOC_ID_COLUMN, META_TOKENIZER_SHA256, TOKENS_COLUMN, DataError, Manifest,
                       load_manifest)

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # 1: per-rank micro-batch count of a fixed layout (still loaded)


class _Chunk:
    """One record batch of one shard: a zero-copy numpy view of its token values."""

    __slots__ = ("values", "doc_ids", "shard")

    def __init__(self, values: np.ndarray, doc_ids: pa.Array, shard: str):
        self.values = values
        self.doc_ids = doc_ids
        self.shard = shard


class PackedReader:
    """Fixed-length packed samples from one split of a tokenized data folder (see module doc)."""

    def __init__(self, data_dir: os.PathLike | str, split: str = "train", sequence_length: int = 128,
                 micro_batch_size: int = 1, seed: int = 1234, rank: int = 0, world_size: int = 1,
                 verify_checksums: bool = True, expected_tokenizer_sha256: Optional[str] = None,
                 manifest: Optional[Manifest] = None, trace_file: Optional[os.PathLike | str] = None,
                 documents: Optional[tuple[int, int]] = None, allow_changed: bool = False):
        if sequence_length < 1:
            raise DataError(f"sequence_length must be at least 1, got {sequence_length}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not inside world_size {world_size}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        self.data_dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.data_dir)
        self.split = split
        self.sequence_length = int(sequence_length)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.manifest.check_tokenizer(expected_tokenizer_sha256, verify_file=verify_checksums)
        self.fingerprint = self.manifest.fingerprint(split)
        # data.allow_changed: a resume onto rewritten data continues at the saved position over the new shards.
        self.allow_changed = allow_changed
        self._open(verify_checksums)
        if documents is not None:  # a continual task's part of the folder (continual.num_tasks)
            self._keep_documents(*documents)

        window = self.sequence_length + 1
        self.num_windows = int(self.num_tokens // window)
        self.tokens_dropped_tail = int(self.num_tokens - self.num_windows * window)
        per_step = self.micro_batch_size * self.world_size
        self.batches_per_epoch = self.num_windows // per_step
        self.num_samples = self.batches_per_epoch * per_step
        self.samples_dropped = self.num_windows - self.num_samples
        self.epoch = 0
        self.consumed = 0  # positions of the current epoch's order read by all ranks together
        self.samples_consumed = 0  # over all epochs and restarts, for logs
        self._perms: Dict[int, np.ndarray] = {}
        # Audit trail: the global sample ids this rank reads, one JSON line per micro-batch.
        self.trace_file = Path(trace_file) if trace_file is not None else None
        if self.trace_file is not None:
            self.trace_file.parent.mkdir(parents=True, exist_ok=True)

    # ---- opening shards -----------------------------------------------------------------
    def _open(self, verify_checksums: bool) -> None:
        m = self.manifest
        split = m.split(self.split)
        dtype = np.dtype(m.token_dtype)
        self._files = []  # keep memory maps alive
        chunks: List[_Chunk] = []
        lens, voffs, chunk_ids = [], [], []
        for shard in split.shards:
            path = m.verify_shard(shard, verify_checksum=verify_checksums)
            try:
                source = pa.memory_map(str(path), "r")
                reader = pa.ipc.open_file(source)
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{path}: not a readable Arrow IPC file ({err})") from None
            self._files.append((source, reader))
            meta = reader.schema.metadata or {}
            shard_tok = meta.get(META_TOKENIZER_SHA256, b"").decode()
            if shard_tok != m.tokenizer.sha256:
                raise DataError(f"{path}: shard was tokenized with tokenizer sha256 {shard_tok[:16] or '?'}..., "
                                f"the manifest says {m.tokenizer.sha256[:16]}...")
            names = reader.schema.names
            if TOKENS_COLUMN not in names or DOC_ID_COLUMN not in names:
                raise DataError(f"{path}: shard lacks the '{TOKENS_COLUMN}'/'{DOC_ID_COLUMN}' columns (has {names})")
            rows = tokens = 0
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                col = batch.column(TOKENS_COLUMN)
                if col.null_count:
                    raise DataError(f"{path}: null documents in '{TOKENS_COLUMN}'")
                values = col.values
                if values.type != pa.from_numpy_dtype(dtype):
                    raise DataError(f"{path}: token type {values.type} differs from the manifest's {m.token_dtype}")
                offsets = col.offsets.to_numpy().astype(np.int64)
                n = len(offsets) - 1
                if n == 0:
                    continue
                chunk_values = values.to_numpy(zero_copy_only=True)
                chunks.append(_Chunk(chunk_values, batch.column(DOC_ID_COLUMN), shard.file))
                lens.append(np.diff(offsets))
                voffs.append(offsets[:-1])
                chunk_ids.append(np.full(n, len(chunks) - 1, dtype=np.int32))
                rows += n
                tokens += int(offsets[-1] - offsets[0])
            if rows != shard.rows or tokens != shard.tokens:
                raise DataError(f"{path}: holds {rows} documents / {tokens} tokens, the manifest says "
                                f"{shard.rows} / {shard.tokens}")
        if not chunks:
            raise DataError(f"{m._where()}: split '{self.split}' has no tokens")
        self._chunks = chunks
        self._doc_len = np.concatenate(lens)
        self._doc_voff = np.concatenate(voffs)
        self._doc_chunk = np.concatenate(chunk_ids)
        # Stream start of every document (its tokens, then one EOS).
        self._doc_start = np.zeros(len(self._doc_len), dtype=np.int64)
        np.cumsum(self._doc_len[:-1] + 1, out=self._doc_start[1:])
        self.num_documents = int(len(self._doc_len))
        self.num_tokens = int(self._doc_start[-1] + self._doc_len[-1] + 1)
        # Doc ids per chunk start, to name documents of a sample.
        self._chunk_first_doc = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(c.doc_ids) for c in chunks], out=self._chunk_first_doc[1:])

    def _keep_documents(self, first: int, end: int) -> None:
        """Restrict the stream to the split's documents `[first, end)` (in manifest order)."""
        if not 0 <= first < end <= self.num_documents:
            raise DataError(f"{self.data_dir}: document range [{first}, {end}) is outside the {self.num_documents} "
                            f"documents of split '{self.split}'")
        self._doc_len = self._doc_len[first:end]
        self._doc_voff = self._doc_voff[first:end]
        self._doc_chunk = self._doc_chunk[first:end]
        self._doc_start = self._doc_start[first:end] - self._doc_start[first]
        self._chunk_first_doc = self._chunk_first_doc - first  # sample_documents counts documents from `first`
        self.num_documents = end - first
        self.num_tokens = int(self._doc_start[-1] + self._doc_len[-1] + 1)
        self.fingerprint = f"{self.fingerprint}:documents[{first},{end})"  # another order: resume must refuse it

    # ---- manifest facts -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.manifest.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        """Id used to pad evaluation batches (the tokenizer's pad id, or EOS when it has none)."""
        pad = self.manifest.tokenizer.pad_id
        return pad if 0 <= pad < self.vocab_size else self.eos_id

    @property
    def tokenizer_path(self) -> str:
        return str(self.manifest.tokenizer_path)

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest.tokenizer.sha256

    # ---- token gathering ----------------------------------------------------------------
    def read_stream(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens `[starts[i], starts[i] + length)` of the stream as int64 `[len(starts), length]`.

        Vectorised: one searchsorted over document starts, then one fancy-index per distinct
        Arrow chunk touched; positions past the end of the stream raise DataError."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.num_tokens):
            raise DataError(f"stream range out of bounds (stream has {self.num_tokens} tokens)")
        pos = (starts[:, None] + np.arange(length, dtype=np.int64)[None, :]).reshape(-1)
        doc = np.searchsorted(self._doc_start, pos, side="right") - 1
        k = pos - self._doc_start[doc]
        out = np.full(pos.shape, self.eos_id, dtype=np.int64)
        real = k < self._doc_len[doc]
        doc_r = doc[real]
        vpos = self._doc_voff[doc_r] + k[real]
        chunk = self._doc_chunk[doc_r]
        if len(chunk):
            lo, hi = int(chunk.min()), int(chunk.max())
            if lo == hi:
                vals = self._chunks[lo].values[vpos]
            else:
                vals = np.empty(len(vpos), dtype=np.int64)
                for c in np.unique(chunk):
                    sel = chunk == c
                    vals[sel] = self._chunks[int(c)].values[vpos[sel]]
            out[real] = vals
        return out.reshape(len(starts), length)

    # ---- order ---------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        """Window order of an epoch; the two most recent epochs are cached (look-ups of samples
        from the previous epoch, e.g. quarantine, do not evict the current one)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = perm
        return perm

    def window_of(self, sample_index: int) -> int:
        """Window index (stream offset / (L+1)) of a global sample index."""
        if self.num_windows == 0:
            raise DataError("this reader has no samples")
        epoch, position = divmod(int(sample_index), self.num_windows)
        if epoch < 0:
            raise DataError(f"sample_index must be non-negative, got {sample_index}")
        return int(self._permutation(epoch)[position])

    def sample_tokens(self, sample_index: int) -> np.ndarray:
        """The `sequence_length + 1` tokens (int64) of a global sample index from `next_batch`."""
        window = self.window_of(sample_index)
        L1 = self.sequence_length + 1
        return self.read_stream(np.array([window * L1]), L1)[0]

    def sample_documents(self, sample_index: int) -> List[str]:
        """`doc_id`s of the documents a global sample index touches (for quarantine reports)."""
        L1 = self.sequence_length + 1
        start = self.window_of(sample_index) * L1
        first = int(np.searchsorted(self._doc_start, start, side="right") - 1)
        last = int(np.searchsorted(self._doc_start, start + L1 - 1, side="right") - 1)
        names = []
        for d in range(first, last + 1):
            c = int(self._doc_chunk[d])
            names.append(self._chunks[c].doc_ids[d - int(self._chunk_first_doc[c])].as_py())
        return names

    # ---- training iteration --------------------------------------------------------------
    def _check_nonempty(self) -> None:
        if self.batches_per_epoch == 0:
            raise DataError(
                f"split '{self.split}' of {self.data_dir} has {self.num_tokens} tokens = {self.num_windows} samples "
                f"of {self.sequence_length + 1} tokens; one step needs micro_batch_size*world_size = "
                f"{self.micro_batch_size * self.world_size}. Use more data or a shorter sequence_length")

    def next_batch(self) -> Dict[str, torch.Tensor]:
        """This rank's next micro-batch; rolls over to the next epoch automatically."""
        self._check_nonempty()
        B, w = self.micro_batch_size, self.world_size
        if self.consumed + B * w > self.num_windows:
            self.epoch += 1
            self.consumed = 0
        positions = self.consumed + np.arange(B, dtype=np.int64) * w + self.rank
        windows = self._permutation(self.epoch)[positions]
        L1 = self.sequence_length + 1
        tokens = torch.from_numpy(self.read_stream(windows * L1, L1))
        self.consumed += B * w
        self.samples_consumed += B * w
        sample_index = self.epoch * self.num_windows + positions
        if self.trace_file is not None:
            with self.trace_file.open("a") as f:
                f.write(json.dumps({"epoch": self.epoch, "samples": sample_index.tolist()}) + "\n")
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "targets": tokens[:, 1:].contiguous(),
            "sample_index": torch.from_numpy(sample_index),
        }

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # ---- evaluation ----------------------------------------------------------------------
    def eval_windows(self) -> int:
        """Evaluation windows over the whole split: starts every `L` tokens so every stream token but
        the first is a target exactly once; the last window may be partial."""
        return -(-(self.num_tokens - 1) // self.sequence_length)

    def eval_batches_per_rank(self) -> int:
        per_rank = -(-self.eval_windows() // self.world_size)
        return -(-per_rank // self.micro_batch_size)

    def iter_epoch_once(self) -> Iterator[Dict[str, torch.Tensor]]:
        """One deterministic in-order pass for evaluation; does not touch the training position.

        Windows start at `j * L` (j = 0, 1, ...) and hold `L + 1` tokens, so every stream token
        except the first is predicted exactly once over all ranks. Rank r takes windows
        r, r + w, ...; every rank yields the same number of batches (`eval_batches_per_rank()`),
        padding the partial last window and missing windows with `pad_id` and `loss_mask` 0.
        Batch keys: `input_ids`, `targets` (LongTensor [B, L]), `loss_mask` (float32 [B, L], 1 where
        the target counts), `sample_index` (window index, -1 for padding rows)."""
        L, B, w = self.sequence_length, self.micro_batch_size, self.world_size
        n_windows = self.eval_windows()
        for k in range(self.eval_batches_per_rank()):
            j = (k * B + np.arange(B, dtype=np.int64)) * w + self.rank
            valid = j < n_windows
            starts = j * L
            # Target t of window j is stream token starts + 1 + t; it counts if inside the stream.
            n_targets = np.clip(self.num_tokens - 1 - starts, 0, L)
            n_targets[~valid] = 0
            tokens = np.full((B, L + 1), self.pad_id, dtype=np.int64)
            full = valid & (n_targets == L)
            if full.any():
                tokens[full] = self.read_stream(starts[full], L + 1)
            for row in np.nonzero(valid & ~full)[0]:  # at most one partial window per pass
                n = int(n_targets[row]) + 1
                tokens[row, :n] = self.read_stream(starts[row:row + 1], n)[0]
            mask = (np.arange(L)[None, :] < n_targets[:, None]).astype(np.float32)
            t = torch.from_numpy(tokens)
            yield {
                "input_ids": t[:, :-1].contiguous(),
                "targets": t[:, 1:].contiguous(),
                "loss_mask": torch.from_numpy(mask),
                "sample_index": torch.from_numpy(np.where(valid, j, -1)),
            }

    # ---- state ---------------------------------------------------------------------------
    def _identity(self) -> Dict[str, Any]:
        """What fixes the sample order; the rank layout (world size, micro batch) is not part of it."""
        return {"split": self.split, "seed": self.seed, "sequence_length": self.sequence_length,
                "manifest_fingerprint": self.fingerprint}

    def state_dict(self) -> Dict[str, Any]:
        """Small, rank-independent position: the next `next_batch` continues from here, at any layout."""
        state = {"format": STATE_FORMAT, "epoch": self.epoch, "consumed": self.consumed,
                 "samples_consumed": self.samples_consumed,
                 # For the record only: the layout that wrote this state.
                 "micro_batch_size": self.micro_batch_size, "world_size": self.world_size}
        state.update(self._identity())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") not in (1, STATE_FORMAT):
            raise DataError(f"reader state has an unknown format: {state!r:.200}")
        mine = self._identity()
        saved_data = str(state.get("manifest_fingerprint", ""))
        content, _, selection = mine["manifest_fingerprint"].partition(":")  # hash[:documents[a,b)]
        saved_content, _, saved_selection = saved_data.partition(":")
        if saved_data and selection == saved_selection and content != saved_content:
            # The position indexes that data's sample order: over other shards it points at other samples.
            if not self.allow_changed:
                raise DataError(f"the data in {self.manifest.data_dir} ({self.split} split) changed since the checkpoint "
                                f"was written (fingerprint {mine['manifest_fingerprint'][:12]} here, {saved_data[:12]} in "
                                "the checkpoint): the reader's position would point at other samples. Pass "
                                "--data.allow_changed true to resume on the new data anyway, or point --data.data_dir "
                                "at the data it was trained on")
            log.warning("the data in %s changed since the checkpoint (fingerprint %s, was %s); resuming on it because "
                        "data.allow_changed is set", self.manifest.data_dir, mine["manifest_fingerprint"][:12],
                        saved_data[:12])
            mine["manifest_fingerprint"] = saved_data  # the documents range is still compared below
        diffs = [f"{k}: checkpoint {state.get(k)!r} vs now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            raise DataError("cannot resume the data reader from a different data config (" + "; ".join(diffs) +
                            "); the sample order would not continue. Use the original data settings")
        epoch = int(state["epoch"])
        if state["format"] == 1:  # micro-batches per rank, at the layout saved beside it
            consumed = int(state["position"]) * int(state["micro_batch_size"]) * int(state["world_size"])
        else:
            consumed = int(state["consumed"])
        if epoch < 0 or not 0 <= consumed <= self.num_windows:
            raise DataError(f"reader state position {consumed} outside [0, {self.num_windows}] (epoch {epoch})")
        self.epoch, self.consumed = epoch, consumed
        self.samples_consumed = int(state.get("samples_consumed", consumed))

    def describe(self) -> Dict[str, Any]:
        """Counts for logs: documents, tokens, samples, what is dropped."""
        return {"split": self.split, "documents": self.num_documents, "stream_tokens": self.num_tokens,
                "num_windows": self.num_windows, "num_samples": self.num_samples,
                "samples_dropped_per_epoch": self.samples_dropped, "tail_tokens_dropped": self.tokens_dropped_tail,
                "batches_per_epoch": self.batches_per_epoch, "rank": self.rank, "world_size": self.world_size}

    def __repr__(self) -> str:
        return f"PackedReader({json.dumps(self.describe())})"
