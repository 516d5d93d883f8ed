"""Tokenize documents in parallel worker processes into Arrow IPC shards + `manifest.json`.

    python -m data_prep.tokenize_shards --inputs 'corpus/*.jsonl' --tokenizer tok.model --out_dir data/x

Phase 1 (parallel): each worker takes whole tasks (see `data_prep.sources.plan_tasks`), encodes the
documents with SentencePiece batch encoding and writes a temporary Arrow part file.
Phase 2 (main process): documents are assigned to splits, then the parts are copied, in task order,
into `train-NNNNN.arrow` / `validation-NNNNN.arrow` shards of at most `shard_tokens` tokens (a single
longer document gets a shard of its own). Output bytes do not depend on `num_workers`.

Validation split: a document goes to validation when
`int.from_bytes(sha256(f"{split_seed}:".encode() + key)[:8], "big") / 2**64 < val_fraction`, where
`key` is the document's UTF-8 text (`split_by=content`: exact duplicates always share a split) or its
`doc_id` (`split_by=doc_id`). With >= 2 non-empty documents and val_fraction > 0, the document with
the smallest hash is moved to validation if none landed there (and the largest to train if all
did); the manifest lists such forced documents. Empty documents are not written; they are counted
in the manifest's stats and the summary.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

if __package__ in (None, ""):  # run as `python data_prep/tokenize_shards.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from data_prep.cli import run_cli
from data_prep.sources import InputFile, Task, as_list, expand_inputs, plan_tasks, read_task
from data_prep.train_tokenizer import tokenizer_info
from pipeline.data.manifest import (DOC_ID_COLUMN, FORMAT_VERSION, META_FORMAT, META_SPLIT,
                                    META_TOKENIZER_SHA256, TOKENS_COLUMN, DataError, Manifest, ShardInfo,
                                    SplitInfo, TokenizerInfo, sha256_file, token_dtype_for_vocab)

SPLITS = ("train", "validation")
TOKENIZER_NAME = "tokenizer.model"
_MAX_EMPTY_IDS = 20

# Worker-process state, set by _init_worker.
_W: Dict[str, Any] = {}


def _schema(dtype: str, metadata: Optional[Dict[bytes, bytes]] = None) -> pa.Schema:
    return pa.schema([(TOKENS_COLUMN, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))),
                      (DOC_ID_COLUMN, pa.string())], metadata=metadata)


def _split_hash(key: bytes, split_seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{split_seed}:".encode() + key).digest()[:8], "big")


def _validation_threshold(val_fraction: float) -> int:
    return min(int(val_fraction * 2.0 ** 64), 2 ** 64 - 1)


def holdout_rule(val_fraction: float, split_by: str = "content", split_seed: int = 0):
    """`is_held_out(doc_id, text)`: the hash rule that sends a document to validation, usable before
    tokenization (the tokenizer trainer uses it to see training documents only). Documents forced into
    validation on tiny corpora (no hash fell under the threshold) are not predicted by it."""
    threshold = _validation_threshold(val_fraction)

    def is_held_out(doc_id: str, text: str) -> bool:
        key = (text if split_by == "content" else doc_id).encode("utf-8")
        return _split_hash(key, split_seed) < threshold

    return is_held_out


def _init_worker(model_proto: bytes, dtype: str, part_dir: str, split_by: str, split_seed: int,
                 text_field: str) -> None:
    sp = spm.SentencePieceProcessor()
    sp.load_from_serialized_proto(model_proto)
    _W.update(sp=sp, dtype=dtype, part_dir=part_dir, split_by=split_by, split_seed=split_seed,
              text_field=text_field)


def _tokenize_task(task: Task) -> Dict[str, Any]:
    """Encode one task's documents into a part file; return per-document hashes and token counts."""
    docs, blank = read_task(task, _W["text_field"])
    nonempty = [(doc_id, text) for doc_id, text in docs if text]
    empty_ids = [doc_id for doc_id, text in docs if not text]
    texts = [text for _, text in nonempty]
    ids = _W["sp"].encode(texts, out_type=int, num_threads=1) if texts else []
    tokens = pa.array(ids, type=pa.list_(pa.from_numpy_dtype(np.dtype(_W["dtype"]))))
    counts = np.diff(tokens.offsets.to_numpy()).astype(np.int64)
    if len(counts) and counts.min() == 0:  # text that encodes to nothing cannot happen with byte fallback
        bad = nonempty[int(np.argmin(counts))][0]
        raise DataError(f"{bad}: non-empty document encoded to zero tokens")
    keyed = [(text if _W["split_by"] == "content" else doc_id).encode("utf-8") for doc_id, text in nonempty]
    hashes = np.array([_split_hash(k, _W["split_seed"]) for k in keyed], dtype=np.uint64)
    table = pa.table([tokens, pa.array([d for d, _ in nonempty], type=pa.string())],
                     schema=_schema(_W["dtype"]))
    part = os.path.join(_W["part_dir"], f"part-{task.index:07d}.arrow")
    with pa.OSFile(part, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return {"index": task.index, "part": part, "hashes": hashes, "counts": counts, "empty_ids": empty_ids,
            "blank_lines": blank, "doc_bytes": np.array([len(t.encode("utf-8")) for t in texts], dtype=np.int64)}


class _ShardWriter:
    """Appends rows of one split into shards of at most `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: str, tokenizer_sha256: str, shard_tokens: int,
                 batch_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.schema = _schema(dtype, {META_FORMAT: str(FORMAT_VERSION).encode(), META_SPLIT: split.encode(),
                                      META_TOKENIZER_SHA256: tokenizer_sha256.encode()})
        self.shard_tokens, self.batch_tokens = shard_tokens, batch_tokens
        self.shards: List[ShardInfo] = []
        self._writer = self._sink = None
        self._rows = self._tokens = 0
        self._pending: List[pa.Table] = []
        self._pending_tokens = 0

    def add(self, table: pa.Table, counts: np.ndarray) -> None:
        csum = np.cumsum(counts)
        i, n = 0, len(counts)
        while i < n:
            base = int(csum[i - 1]) if i else 0
            room = self.shard_tokens - self._tokens
            take = int(np.searchsorted(csum, base + room, side="right")) - i
            if take <= 0:
                if self._rows == 0:
                    take = 1  # one document longer than a shard: it gets a shard of its own
                else:
                    self._finish_shard()
                    continue
            added = int(csum[i + take - 1]) - base
            self._pending.append(table.slice(i, take))
            self._pending_tokens += added
            self._rows += take
            self._tokens += added
            if self._pending_tokens >= self.batch_tokens:
                self._flush()
            i += take

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            path = self.out_dir / f"{self.split}-{len(self.shards):05d}.arrow"
            self._sink = pa.OSFile(str(path), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        batch = pa.concat_tables(self._pending).combine_chunks().replace_schema_metadata(self.schema.metadata)
        self._writer.write_table(batch)
        self._pending, self._pending_tokens = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        path = self.out_dir / name
        self.shards.append(ShardInfo(file=name, rows=self._rows, tokens=self._tokens,
                                     bytes=path.stat().st_size, sha256=sha256_file(path)))
        self._writer = self._sink = None
        self._rows = self._tokens = 0

    def close(self) -> List[ShardInfo]:
        self._finish_shard()
        return self.shards


def _assign_splits(hashes: np.ndarray, val_fraction: float) -> Tuple[np.ndarray, Dict[str, int]]:
    is_val = hashes < np.uint64(_validation_threshold(val_fraction))
    forced: Dict[str, int] = {}
    if len(hashes) >= 2 and val_fraction > 0:
        if not is_val.any():
            i = int(np.argmin(hashes))
            is_val[i] = True
            forced["validation"] = i
        elif is_val.all():
            i = int(np.argmax(hashes))
            is_val[i] = False
            forced["train"] = i
    return is_val, forced


def tokenize_files(files: Sequence[InputFile], out_dir: str, tokenizer: str, val_fraction: float = 0.05,
                   num_workers: int = 1, shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
                   record_batch_tokens: int = 1 << 20, split_by: Literal["content", "doc_id"] = "content",
                   split_seed: int = 0, text_field: str = "text", sources: Optional[List[Dict]] = None,
                   tokenizer_extra: Optional[Dict[str, Any]] = None, verbose: bool = True) -> Manifest:
    """Tokenize `files` into `out_dir` (shards, manifest.json, tokenizer.model). Returns the manifest;
    `manifest.extra["stats"]` holds counts and timings."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or record_batch_tokens < 1:
        raise DataError("shard_tokens and record_batch_tokens must be positive")
    if split_by not in ("content", "doc_id"):
        raise DataError(f"split_by must be 'content' or 'doc_id', got {split_by!r}")
    start_time = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The data folder carries its own copy of the tokenizer.
    tok_src = Path(tokenizer)
    info = tokenizer_info(tok_src)
    tok_dst = out / TOKENIZER_NAME
    if not (tok_dst.exists() and tok_dst.resolve() == tok_src.resolve()):
        shutil.copyfile(tok_src, tok_dst)
    dtype = token_dtype_for_vocab(info["vocab_size"])
    tasks = plan_tasks(files, task_bytes)
    input_bytes = sum(t.nbytes if t.kind != "text" else 0 for t in tasks) + sum(
        f.size for f in files if f.kind == "text")

    part_dir = out / f".parts-{os.getpid()}"
    shutil.rmtree(part_dir, ignore_errors=True)
    part_dir.mkdir()
    try:
        init_args = (tok_src.read_bytes(), dtype, str(part_dir), split_by, split_seed, text_field)
        results = _run_tasks(tasks, init_args, num_workers, verbose)
        tokenize_seconds = time.time() - start_time
        manifest = _merge(results, out, info, dtype, val_fraction, shard_tokens, record_batch_tokens,
                          split_by, split_seed)
    finally:
        shutil.rmtree(part_dir, ignore_errors=True)

    tok_entry = {"path": TOKENIZER_NAME, **info, **(tokenizer_extra or {})}
    manifest.tokenizer = TokenizerInfo.from_dict(tok_entry, "tokenizer")
    total_seconds = time.time() - start_time
    manifest.extra["stats"].update(input_files=len(files), input_bytes=input_bytes, tasks=len(tasks))
    manifest.extra["sources"] = sources or [{"name": "inputs", "files": len(files), "bytes": input_bytes}]
    _remove_stale_shards(out, manifest)
    manifest.save(out)
    manifest.data_dir = out
    # Timings go to the caller, not the file (the manifest stays reproducible).
    manifest.timings = {"tokenize_seconds": tokenize_seconds, "total_seconds": total_seconds,
                        "input_bytes": input_bytes, "num_workers": num_workers}
    return manifest


def _run_tasks(tasks: Sequence[Task], init_args, num_workers: int, verbose: bool) -> List[Dict[str, Any]]:
    results: List[Dict[str, Any]] = []
    total = sum(t.nbytes for t in tasks) or 1
    done_bytes, next_report = 0, 0.1

    def progress(task: Task) -> None:
        nonlocal done_bytes, next_report
        done_bytes += task.nbytes
        if verbose and len(tasks) >= 20 and done_bytes / total >= next_report:
            print(f"  tokenized {done_bytes / total:5.0%} ({done_bytes / 1e6:.1f} MB)", file=sys.stderr)
            next_report += 0.1

    if num_workers <= 1 or len(tasks) <= 1:
        _init_worker(*init_args)
        try:
            for task in tasks:
                results.append(_tokenize_task(task))
                progress(task)
        finally:
            _W.clear()
        return results
    # fork where the OS has it: workers need no re-import of the caller's __main__ (which breaks for
    # stdin/notebook callers under spawn); they only run SentencePiece/pyarrow, never torch.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker, initargs=init_args) as pool:
        for task, result in zip(tasks, pool.imap(_tokenize_task, tasks, chunksize=1)):
            results.append(result)
            progress(task)
    return results


def _merge(results: List[Dict[str, Any]], out: Path, info: Dict[str, Any], dtype: str, val_fraction: float,
           shard_tokens: int, batch_tokens: int, split_by: str, split_seed: int) -> Manifest:
    results = sorted(results, key=lambda r: r["index"])
    hashes = np.concatenate([r["hashes"] for r in results]) if results else np.zeros(0, np.uint64)
    is_val, forced = _assign_splits(hashes, val_fraction)
    writers = {name: _ShardWriter(out, name, dtype, info["sha256"], shard_tokens, batch_tokens) for name in SPLITS}
    text_bytes = {name: 0 for name in SPLITS}
    forced_ids: Dict[str, str] = {}
    offset = 0
    for r in results:
        n = len(r["counts"])
        if n == 0:
            continue
        val = is_val[offset:offset + n]
        table = pa.ipc.open_file(pa.memory_map(r["part"], "r")).read_all()
        for name, mask in (("train", ~val), ("validation", val)):
            if mask.any():
                writers[name].add(table.filter(pa.array(mask)), r["counts"][mask])
                text_bytes[name] += int(r["doc_bytes"][mask].sum())
        for name, i in forced.items():
            if offset <= i < offset + n:
                forced_ids[name] = table.column(DOC_ID_COLUMN)[i - offset].as_py()
        offset += n
    # UTF-8 bytes of each split's documents: evaluation's bits per byte compares runs across tokenizers.
    splits = {name: SplitInfo(name=name, shards=writers[name].close(), extra={"text_bytes": text_bytes[name]})
              for name in SPLITS}
    empty_ids = [d for r in results for d in r["empty_ids"]]
    stats = {
        "documents_seen": int(len(hashes) + len(empty_ids)),
        "empty_documents": len(empty_ids),
        "empty_document_ids": empty_ids[:_MAX_EMPTY_IDS],
        "blank_jsonl_lines": int(sum(r["blank_lines"] for r in results)),
        "text_bytes": int(sum(text_bytes.values())),
    }
    split_rule = {
        "method": "sha256",
        "key": split_by,
        "split_seed": split_seed,
        "val_fraction": val_fraction,
        "rule": "validation iff int.from_bytes(sha256(f'{split_seed}:'.encode() + key)[:8], 'big') / 2**64 "
                "< val_fraction; key = UTF-8 text (content) or doc_id",
        "forced": forced_ids,
    }
    tok = TokenizerInfo.from_dict({"path": TOKENIZER_NAME, **info}, "tokenizer")
    return Manifest(tokenizer=tok, splits=splits, token_dtype=dtype,
                    extra={"split_rule": split_rule, "stats": stats})


def _remove_stale_shards(out: Path, manifest: Manifest) -> None:
    """Delete shard files of an earlier run in the same folder that the new manifest does not list."""
    keep = {s.file for sp in manifest.splits.values() for s in sp.shards}
    for name in SPLITS:
        for path in out.glob(f"{name}-*.arrow"):
            if path.name not in keep:
                path.unlink()


def summarize(manifest: Manifest) -> str:
    stats = manifest.extra.get("stats", {})
    lines = []
    for name, sp in manifest.splits.items():
        lines.append(f"  {name:<10} {sp.documents:>8} docs {sp.tokens:>12,} tokens {len(sp.shards):>4} shards")
    lines.append(f"  empty documents: {stats.get('empty_documents', 0)} (not written)"
                 + (f", blank jsonl lines skipped: {stats['blank_jsonl_lines']}" if stats.get("blank_jsonl_lines") else ""))
    forced = manifest.extra.get("split_rule", {}).get("forced")
    if forced:
        lines.append(f"  forced into a split (too few documents for val_fraction): {forced}")
    t = getattr(manifest, "timings", None)
    if t:
        mb = t["input_bytes"] / 1e6
        lines.append(f"  tokenized {mb:.1f} MB in {t['total_seconds']:.2f} s "
                     f"({mb / max(t['total_seconds'], 1e-9):.1f} MB/s, {t['num_workers']} workers)")
    return "\n".join(lines)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tokenize_shards(inputs: Union[List[str], str], out_dir: str, tokenizer: str, val_fraction: float = 0.05,
                    num_workers: int = default_workers(), shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
                    record_batch_tokens: int = 1 << 20, split_by: Literal["content", "doc_id"] = "content",
                    split_seed: int = 0, text_field: str = "text") -> Manifest:
    """Tokenize text files / globs / directories / .jsonl files into Arrow shards and manifest.json.

    Args:
        inputs: A file, glob or directory, or a list '[a,b]' (repeat with --inputs+). .jsonl: one document per line; .parquet: one per row; other files: one document each.
        out_dir: Output folder (shards, manifest.json, a copy of the tokenizer).
        tokenizer: SentencePiece .model file (must have an EOS piece).
        val_fraction: Fraction of documents held out for validation (by document hash).
        num_workers: Tokenizer worker processes (output does not depend on it).
        shard_tokens: Tokens per shard at most (a longer single document gets its own shard).
        task_bytes: Input bytes per work unit.
        record_batch_tokens: Tokens per Arrow record batch inside a shard (about).
        split_by: Hash the document text (`content`) or its `doc_id` to pick its split.
        split_seed: Salt of the split hash.
        text_field: Field of a .jsonl line (column of a .parquet file) holding the text.
    """
    inputs = as_list(inputs)
    files = expand_inputs(inputs)
    manifest = tokenize_files(files, out_dir, tokenizer, val_fraction=val_fraction, num_workers=num_workers,
                              shard_tokens=shard_tokens, task_bytes=task_bytes,
                              record_batch_tokens=record_batch_tokens, split_by=split_by, split_seed=split_seed,
                              text_field=text_field,
                              sources=[{"name": "inputs", "inputs": list(inputs), "files": len(files)}])
    print(f"wrote {Path(out_dir) / 'manifest.json'}\n{summarize(manifest)}")
    return manifest


if __name__ == "__main__":
    run_cli(tokenize_shards)
