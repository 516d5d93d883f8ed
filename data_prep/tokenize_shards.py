"""Tokenize documents in parallel (worker processes on each of the job's MPI ranks) into Arrow IPC
shards + `manifest.json`.

    python -m data_prep.tokenize_shards --inputs 'corpus/*.jsonl' --tokenizer tok.model --out_dir data/x
    mpirun -n 8 python -m data_prep.tokenize_shards ...        # the same, over 8 ranks (and nodes)

Work folder: `<out_dir>/.prep/` holds everything until the end, so an interrupted run restarted with
the same command keeps what is finished (each file verified by its checksum) and a job reading the
old data keeps reading it:

Phase 1 (tokenize): rank 0 plans the tasks (`data_prep.sources.plan_tasks`); task `i` belongs to rank
`i % ranks`, whose workers encode its documents with SentencePiece batch encoding into
`.prep/parts/part-<i>.arrow` plus `part-<i>.npz` (per-document token counts, split hashes, content
digests, what was skipped), each written under a temporary name and renamed when complete.
Phase 2 (shards): every rank reads the parts' counts and computes the same layout: exact duplicates
dropped (`dedupe=exact`: the first copy in task order is kept), documents assigned to splits, and
each split cut, in task order, into `train-NNNNN.arrow` / `validation-NNNNN.arrow` shards of at most
`shard_tokens` tokens (a single longer document gets a shard of its own), record batches of at most
`record_batch_tokens`. Shard `k` (train first) is written by rank `k % ranks` into `.prep/shards/`.
Phase 3 (rank 0): the shards are renamed into `out_dir`, then the manifest is written under a temporary
name and renamed, last; shards of an earlier run that the new manifest does not list are deleted.
Renaming never touches the bytes of a file a running job has memory-mapped (it keeps the old file).
Output bytes depend on neither the number of workers nor the number of ranks.

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
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

if __package__ in (None, ""):  # run as `python data_prep/tokenize_shards.py`
    # the repository root instead of data_prep/, whose inspect.py would shadow the standard library's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import pyarrow as pa
import sentencepiece as spm

from data_prep.cli import run_cli
from data_prep.mpi import CollectiveError, Group, group as mpi_group
from data_prep.progress import Progress
from data_prep.sources import SKIP_REASONS, InputFile, Skipped, Task, as_list, expand_inputs, plan_tasks, read_task
from data_prep.train_tokenizer import tokenizer_info
from pipeline.data.manifest import (DOC_ID_COLUMN, FORMAT_VERSION, META_FORMAT, META_SPLIT,
                                    META_TOKENIZER_SHA256, TOKENS_COLUMN, DataError, Manifest, ShardInfo,
                                    SplitInfo, TokenizerInfo, sha256_file, token_dtype_for_vocab)

SPLITS = ("train", "validation")
TOKENIZER_NAME = "tokenizer.model"
WORK_DIR = ".prep"
DEDUPE = ("none", "exact")
_WORK_FORMAT = 2  # bump when parts or shards change meaning

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
                 text_field: str, strict: bool, dedupe: str) -> None:
    sp = spm.SentencePieceProcessor()
    sp.load_from_serialized_proto(model_proto)
    _W.update(sp=sp, dtype=dtype, part_dir=part_dir, split_by=split_by, split_seed=split_seed,
              text_field=text_field, strict=strict, dedupe=dedupe)


def _write_atomic(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _part_paths(part_dir: os.PathLike | str, index: int) -> Tuple[Path, Path]:
    base = Path(part_dir) / f"part-{index:07d}"
    return base.with_suffix(".arrow"), base.with_suffix(".npz")


def _tokenize_task(task: Task) -> Dict[str, Any]:
    """Encode one task's documents into a part file and its metadata (the metadata last: it marks the
    part complete and holds the part's checksum)."""
    docs, skipped = read_task(task, _W["text_field"], _W["strict"])
    texts = [text for _, text in docs]
    ids = _W["sp"].encode(texts, out_type=int, num_threads=1) if texts else []
    tokens = pa.array(ids, type=pa.list_(pa.from_numpy_dtype(np.dtype(_W["dtype"]))))
    counts = np.diff(tokens.offsets.to_numpy()).astype(np.int64)
    if len(counts) and counts.min() == 0:  # text that encodes to nothing cannot happen with byte fallback
        bad = docs[int(np.argmin(counts))][0]
        raise DataError(f"{bad}: non-empty document encoded to zero tokens")
    encoded = [text.encode("utf-8") for text in texts]
    keys = encoded if _W["split_by"] == "content" else [doc_id.encode("utf-8") for doc_id, _ in docs]
    meta = {
        "hashes": np.array([_split_hash(k, _W["split_seed"]) for k in keys], dtype=np.uint64),
        "counts": counts,
        "doc_bytes": np.array([len(b) for b in encoded], dtype=np.int64),
        "digests": np.frombuffer(b"".join(hashlib.blake2b(b, digest_size=16).digest() for b in encoded), "V16")
        if _W["dedupe"] == "exact" else np.zeros(0, "V16"),
    }
    table = pa.table([tokens, pa.array([d for d, _ in docs], type=pa.string())], schema=_schema(_W["dtype"]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    buffer = sink.getvalue()
    part, meta_path = _part_paths(_W["part_dir"], task.index)
    _write_atomic(part, buffer)
    info = {"sha256": hashlib.sha256(buffer).hexdigest(), "skipped": skipped.to_dict()}
    packed = io.BytesIO()
    np.savez(packed, info=np.array(json.dumps(info)), **meta)
    _write_atomic(meta_path, packed.getvalue())
    return {"index": task.index, "docs": len(docs), "nbytes": task.nbytes}


def _part_done(part_dir: Path, task: Task) -> Optional[int]:
    """Documents of a finished part whose file matches its recorded checksum, else None (redo it)."""
    part, meta_path = _part_paths(part_dir, task.index)
    if not (part.is_file() and meta_path.is_file()):
        return None
    try:
        with np.load(meta_path) as meta:
            info = json.loads(str(meta["info"]))
            docs = len(meta["counts"])
    except (OSError, ValueError, KeyError):
        return None
    return docs if sha256_file(part) == info["sha256"] else None


class _Parts:
    """Every part's metadata, concatenated in task order (what phase 2 plans with)."""

    def __init__(self, part_dir: Path, tasks: Sequence[Task], dedupe: str):
        fields: Dict[str, List[np.ndarray]] = {k: [] for k in ("hashes", "counts", "doc_bytes", "digests")}
        part_of, row_of = [], []
        self.skipped = Skipped()
        for task in tasks:
            _, meta_path = _part_paths(part_dir, task.index)
            with np.load(meta_path) as meta:
                for key in fields:
                    fields[key].append(meta[key])
                n = len(meta["counts"])
                self.skipped.merge(Skipped.from_dict(json.loads(str(meta["info"]))["skipped"]))
            part_of.append(np.full(n, task.index, dtype=np.int64))
            row_of.append(np.arange(n, dtype=np.int64))
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in fields.items()}
        self.hashes = cat["hashes"].astype(np.uint64)
        self.counts, self.doc_bytes = cat["counts"].astype(np.int64), cat["doc_bytes"].astype(np.int64)
        self.part_of = np.concatenate(part_of) if part_of else np.zeros(0, np.int64)
        self.row_of = np.concatenate(row_of) if row_of else np.zeros(0, np.int64)
        self.keep = np.ones(len(self.counts), dtype=bool)
        if dedupe == "exact" and len(self.counts):
            _, first = np.unique(cat["digests"], return_index=True)  # stable: the first copy in task order
            self.keep[:] = False
            self.keep[first] = True
        self.duplicates = int((~self.keep).sum())


def _cuts(counts: np.ndarray, limit: int) -> List[int]:
    """Greedy boundaries of consecutive pieces of at most `limit` tokens (a longer item alone)."""
    csum = np.concatenate([[0], np.cumsum(counts)])
    bounds, i, n = [0], 0, len(counts)
    while i < n:
        i = max(int(np.searchsorted(csum, csum[i] + limit, side="right")) - 1, i + 1)
        bounds.append(i)
    return bounds


def _write_shard(path: Path, schema: pa.Schema, part_dir: Path, part_of: np.ndarray, row_of: np.ndarray,
                 counts: np.ndarray, batch_tokens: int) -> Dict[str, Any]:
    """Copy the given (part, row) documents into one shard, record batches cut by `_cuts`."""
    pieces = []
    for p in np.unique(part_of):
        lo, hi = np.searchsorted(part_of, p, side="left"), np.searchsorted(part_of, p, side="right")
        table = pa.ipc.open_file(pa.memory_map(str(_part_paths(part_dir, int(p))[0]), "r")).read_all()
        pieces.append(table.take(pa.array(row_of[lo:hi])))
    table = pa.concat_tables(pieces).replace_schema_metadata(schema.metadata)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    bounds = _cuts(counts, batch_tokens)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for a, b in zip(bounds, bounds[1:]):
            writer.write_table(table.slice(a, b - a).combine_chunks())
    os.replace(tmp, path)
    return {"file": path.name, "rows": int(len(counts)), "tokens": int(counts.sum()),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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


def _key(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _prepare_work_dir(work: Path, parts_key: str, shards_key: str) -> str:
    """Rank 0: keep the work folder of an interrupted run of the same job, or clear what no longer fits."""
    state_path = work / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    note = ""
    if state.get("parts") != parts_key:
        if state:
            note = "inputs, tokenizer or options changed since the interrupted run: starting over"
        shutil.rmtree(work / "parts", ignore_errors=True)
        shutil.rmtree(work / "shards", ignore_errors=True)
    elif state.get("shards") != shards_key:
        shutil.rmtree(work / "shards", ignore_errors=True)
        note = "resuming the tokenized parts; shard options changed, shards are rewritten"
    else:
        note = "resuming an interrupted run"
    (work / "parts").mkdir(parents=True, exist_ok=True)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    _write_atomic(state_path, json.dumps({"parts": parts_key, "shards": shards_key}).encode())
    return note


def _install_tokenizer(src: Path, out: Path) -> None:
    dst = out / TOKENIZER_NAME
    if dst.exists() and (dst.resolve() == src.resolve() or sha256_file(dst) == sha256_file(src)):
        return
    _write_atomic(dst, src.read_bytes())


def tokenize_files(files: Sequence[InputFile], out_dir: str, tokenizer: str, val_fraction: float = 0.05,
                   num_workers: int = 1, shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
                   record_batch_tokens: int = 1 << 20, split_by: Literal["content", "doc_id"] = "content",
                   split_seed: int = 0, text_field: str = "text", sources: Optional[List[Dict]] = None,
                   tokenizer_extra: Optional[Dict[str, Any]] = None, verbose: bool = True, strict: bool = False,
                   dedupe: str = "none", tasks: Optional[List[Task]] = None, group: Optional[Group] = None,
                   progress_interval_s: float = 30.0) -> Manifest:
    """Tokenize `files` into `out_dir` (shards, manifest.json, tokenizer.model) on every rank of `group`
    (default: the MPI job, or this process alone). Returns the manifest (on every rank);
    `manifest.extra["stats"]` holds the counts, `manifest.timings` the timings."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or record_batch_tokens < 1:
        raise DataError("shard_tokens and record_batch_tokens must be positive")
    if split_by not in ("content", "doc_id"):
        raise DataError(f"split_by must be 'content' or 'doc_id', got {split_by!r}")
    if dedupe not in DEDUPE:
        raise DataError(f"dedupe must be one of {DEDUPE}, got {dedupe!r}")
    group = group or mpi_group()
    say = print if verbose and group.is_root else (lambda *a, **k: None)
    start_time = time.time()
    out = Path(out_dir)
    work = out / WORK_DIR
    tok_src = Path(tokenizer)
    info = tokenizer_info(tok_src)
    dtype = token_dtype_for_vocab(info["vocab_size"])

    def plan() -> Tuple[List[Task], str, str, str]:
        planned = tasks if tasks is not None else plan_tasks(files, task_bytes)
        stats = [(f.path, f.size, os.stat(f.path).st_mtime_ns if os.path.exists(f.path) else 0) for f in files]
        parts_key = _key({"format": _WORK_FORMAT, "tasks": planned, "files": stats, "tokenizer": info["sha256"],
                          "dtype": dtype, "text_field": text_field, "split_by": split_by, "split_seed": split_seed,
                          "dedupe": dedupe})
        shards_key = _key({"parts": parts_key, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                           "record_batch_tokens": record_batch_tokens})
        out.mkdir(parents=True, exist_ok=True)
        return planned, parts_key, shards_key, _prepare_work_dir(work, parts_key, shards_key)

    tasks, parts_key, shards_key, note = group.on_root(plan)
    if note:
        say(f"  {note} ({work})")
    part_dir = work / "parts"
    input_bytes = sum(t.nbytes for t in tasks)

    # ---- phase 1: this rank's tasks, less those finished by an interrupted run ---------------------
    mine = [t for t in tasks if t.index % group.size == group.rank]
    progress = Progress(group, input_bytes, enabled=verbose, interval_s=progress_interval_s)
    kept = 0
    try:
        todo = []
        for task in mine:
            docs = _part_done(part_dir, task)
            if docs is None:
                todo.append(task)
            else:
                kept += 1
                progress.update(task.nbytes, docs)
        init_args = (tok_src.read_bytes(), dtype, str(part_dir), split_by, split_seed, text_field, strict, dedupe)
        _run_tasks(todo, init_args, num_workers, lambda r: progress.update(r["nbytes"], r["docs"]), progress.poll)
    finally:
        progress.close()
    kept = sum(group.allgather(kept))
    if kept:
        say(f"  kept {kept} of {len(tasks)} tokenized parts of the interrupted run (checksums verified)")
    tokenize_seconds = time.time() - start_time

    # ---- phase 2: the same layout on every rank; shard k written by rank k % size ------------------
    parts = _Parts(part_dir, tasks, dedupe)
    kept_idx = np.flatnonzero(parts.keep)
    is_val, forced = _assign_splits(parts.hashes[kept_idx], val_fraction)
    _check_counts(parts, is_val, val_fraction, files)
    specs = []  # (split, shard number, global document indices)
    for name, mask in (("train", ~is_val), ("validation", is_val)):
        idx = kept_idx[mask]
        bounds = _cuts(parts.counts[idx], shard_tokens)
        specs += [(name, j, idx[a:b]) for j, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    shard_dir = work / "shards"
    written = []
    for k, (name, j, idx) in enumerate(specs):
        if k % group.size != group.rank:
            continue
        path = shard_dir / f"{name}-{j:05d}.arrow"
        side = path.with_suffix(".json")
        entry = json.loads(side.read_text()) if side.is_file() and path.is_file() else None
        if entry is None or sha256_file(path) != entry["sha256"]:
            schema = _schema(dtype, {META_FORMAT: str(FORMAT_VERSION).encode(), META_SPLIT: name.encode(),
                                     META_TOKENIZER_SHA256: info["sha256"].encode()})
            entry = _write_shard(path, schema, part_dir, parts.part_of[idx], parts.row_of[idx], parts.counts[idx],
                                 record_batch_tokens)
            _write_atomic(side, json.dumps(entry).encode())
        written.append((k, entry))
    entries = dict(kv for rank_entries in group.allgather(written) for kv in rank_entries)

    # ---- phase 3: rank 0 moves the shards in and writes the manifest last ---------------------------
    splits = {}
    for name, mask in (("train", ~is_val), ("validation", is_val)):
        shards = [ShardInfo.from_dict(entries[k], name) for k, spec in enumerate(specs) if spec[0] == name]
        text_bytes = int(parts.doc_bytes[kept_idx[mask]].sum())
        splits[name] = SplitInfo(name=name, shards=shards, extra={"text_bytes": text_bytes})
    tok_entry = {"path": TOKENIZER_NAME, **info, **(tokenizer_extra or {})}
    manifest = Manifest(tokenizer=TokenizerInfo.from_dict(tok_entry, "tokenizer"), splits=splits, token_dtype=dtype)
    forced_ids = {name: _doc_id(part_dir, parts, int(kept_idx[i])) for name, i in forced.items()}
    manifest.extra["split_rule"] = {
        "method": "sha256",
        "key": split_by,
        "split_seed": split_seed,
        "val_fraction": val_fraction,
        "rule": "validation iff int.from_bytes(sha256(f'{split_seed}:'.encode() + key)[:8], 'big') / 2**64 "
                "< val_fraction; key = UTF-8 text (content) or doc_id",
        "forced": forced_ids,
    }
    manifest.extra["stats"] = _stats(parts, manifest, dedupe, files, tasks, input_bytes)
    manifest.extra["sources"] = sources or [{"name": "inputs", "files": len(files), "bytes": input_bytes}]

    def install() -> None:
        _install_tokenizer(tok_src, out)
        for spec in specs:
            shard = f"{spec[0]}-{spec[1]:05d}.arrow"
            os.replace(shard_dir / shard, out / shard)
        manifest.save(out)
        _remove_stale_shards(out, manifest)
        shutil.rmtree(work, ignore_errors=True)

    group.on_root(install)
    manifest.data_dir = out
    total_seconds = time.time() - start_time
    # Timings go to the caller, not the file (the manifest stays reproducible).
    manifest.timings = {"tokenize_seconds": tokenize_seconds, "total_seconds": total_seconds,
                        "input_bytes": input_bytes, "num_workers": num_workers, "ranks": group.size}
    return manifest


def _doc_id(part_dir: Path, parts: _Parts, i: int) -> str:
    table = pa.ipc.open_file(pa.memory_map(str(_part_paths(part_dir, int(parts.part_of[i]))[0]), "r")).read_all()
    return table.column(DOC_ID_COLUMN)[int(parts.row_of[i])].as_py()


def _check_counts(parts: _Parts, is_val: np.ndarray, val_fraction: float, files: Sequence[InputFile]) -> None:
    """No data folder without documents, or with an empty split that was asked for (same on every rank)."""
    skipped = parts.skipped
    if not len(is_val):
        first = next((locs[0] for locs in skipped.locations.values() if locs), None)
        raise CollectiveError(
            f"no document to write: {len(files)} input files gave {skipped.total} records, all skipped "
            f"({_reasons(skipped)})" + (f"; first: {first}" if first else "") if skipped.total else
            f"no document to write: the {len(files)} input files hold no documents")
    n_val = int(is_val.sum())
    if n_val == 0 and val_fraction > 0:
        raise CollectiveError(f"the validation split would be empty: {len(is_val)} document after skipping and "
                              f"deduplication, and val_fraction={val_fraction} needs at least 2 (one for each "
                              "split); add documents, or pass --val_fraction 0 to write no validation split")
    if n_val == len(is_val):
        raise CollectiveError(f"the training split would be empty: {len(is_val)} document after skipping and "
                              "deduplication went to validation; add documents or lower --val_fraction")


def _reasons(skipped: Skipped) -> str:
    return ", ".join(f"{SKIP_REASONS[r]}: {n}" for r, n in sorted(skipped.counts.items())) or "none"


def _stats(parts: _Parts, manifest: Manifest, dedupe: str, files, tasks, input_bytes: int) -> Dict[str, Any]:
    """Where every record went: read = written + duplicates + skipped (by reason)."""
    written = sum(sp.documents for sp in manifest.splits.values())
    read = len(parts.counts) + parts.skipped.total
    assert read == written + parts.duplicates + parts.skipped.total, "document accounting does not balance"
    return {
        "documents_read": read,
        "documents_written": written,
        "duplicates_removed": parts.duplicates,
        "dedupe": dedupe,
        "skipped": {r: parts.skipped.counts.get(r, 0) for r in SKIP_REASONS},
        "skipped_at": dict(sorted(parts.skipped.locations.items())),
        "blank_jsonl_lines": parts.skipped.blank_lines,
        # older names, kept for readers of earlier manifests
        "documents_seen": read,
        "empty_documents": parts.skipped.counts.get("empty_document", 0),
        "text_bytes": int(sum(sp.extra["text_bytes"] for sp in manifest.splits.values())),
        "input_files": len(files),
        "input_bytes": input_bytes,
        "tasks": len(tasks),
    }


def _run_tasks(tasks: Sequence[Task], init_args, num_workers: int, on_done: Callable[[Dict], None],
               tick: Callable[[], None]) -> None:
    if num_workers <= 1 or len(tasks) <= 1:
        _init_worker(*init_args)
        try:
            for task in tasks:
                on_done(_tokenize_task(task))
        finally:
            _W.clear()
        return
    # fork where the OS has it: workers need no re-import of the caller's __main__ (which breaks for
    # stdin/notebook callers under spawn); they only run SentencePiece/pyarrow, never torch or MPI.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(min(num_workers, len(tasks)), initializer=_init_worker, initargs=init_args) as pool:
        results = pool.imap_unordered(_tokenize_task, tasks, chunksize=1)
        while True:
            try:
                on_done(results.next(timeout=0.5))
            except multiprocessing.TimeoutError:
                tick()
            except StopIteration:
                return


def _remove_stale_shards(out: Path, manifest: Manifest) -> None:
    """Delete shard files of an earlier run in the same folder that the new manifest does not list
    (a job that has one memory-mapped keeps reading it: unlinking leaves its pages alone)."""
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
    if "documents_read" in stats:
        skipped = {r: n for r, n in stats["skipped"].items() if n}
        lines.append(f"  documents read {stats['documents_read']} = written {stats['documents_written']} + "
                     f"duplicates {stats['duplicates_removed']} (dedupe {stats['dedupe']}) + skipped "
                     f"{sum(skipped.values())}" + (f" ({', '.join(f'{r} {n}' for r, n in skipped.items())})"
                                                   if skipped else ""))
        for reason, where in stats.get("skipped_at", {}).items():
            lines.append(f"    {reason}: first at {where[0]}")
        if stats.get("blank_jsonl_lines"):
            lines.append(f"  blank jsonl lines (no document): {stats['blank_jsonl_lines']}")
    forced = manifest.extra.get("split_rule", {}).get("forced")
    if forced:
        lines.append(f"  forced into a split (too few documents for val_fraction): {forced}")
    t = getattr(manifest, "timings", None)
    if t:
        mb = t["input_bytes"] / 1e6
        lines.append(f"  tokenized {mb:.1f} MB in {t['total_seconds']:.2f} s "
                     f"({mb / max(t['total_seconds'], 1e-9):.1f} MB/s, {t.get('ranks', 1)} ranks x "
                     f"{t['num_workers']} workers)")
    return "\n".join(lines)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def tokenize_shards(inputs: Union[List[str], str], out_dir: str, tokenizer: str, val_fraction: float = 0.05,
                    num_workers: int = default_workers(), shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
                    record_batch_tokens: int = 1 << 20, split_by: Literal["content", "doc_id"] = "content",
                    split_seed: int = 0, text_field: str = "text", strict: bool = False,
                    dedupe: Literal["none", "exact"] = "none", progress_interval_s: float = 30.0) -> Manifest:
    """Tokenize text files / globs / directories / .jsonl / .parquet files into Arrow shards and manifest.json.

    Args:
        inputs: A file, glob or directory, or a list '[a,b]' (repeat with --inputs+). .jsonl: one document per line; .parquet: one per row; other files: one document each.
        out_dir: Output folder (shards, manifest.json, a copy of the tokenizer).
        tokenizer: SentencePiece .model file (must have an EOS piece).
        val_fraction: Fraction of documents held out for validation (by document hash).
        num_workers: Tokenizer worker processes per rank (output does not depend on it).
        shard_tokens: Tokens per shard at most (a longer single document gets its own shard).
        task_bytes: Input bytes per work unit.
        record_batch_tokens: Tokens per Arrow record batch inside a shard (at most; a longer document alone).
        split_by: Hash the document text (`content`) or its `doc_id` to pick its split.
        split_seed: Salt of the split hash.
        text_field: Field of a .jsonl line (column of a .parquet file) holding the text.
        strict: Any bad input (invalid UTF-8, empty document, malformed JSON line, missing text field, unreadable file) is an error naming its location, instead of being skipped and counted.
        dedupe: `exact`: drop exact duplicate documents (by content hash, across all ranks; the first copy in input order stays).
        progress_interval_s: Seconds between progress lines when stderr is not a terminal (a bar when it is).
    """
    group = mpi_group()
    inputs = as_list(inputs)
    files = group.on_root(lambda: expand_inputs(inputs))
    manifest = tokenize_files(files, out_dir, tokenizer, val_fraction=val_fraction, num_workers=num_workers,
                              shard_tokens=shard_tokens, task_bytes=task_bytes,
                              record_batch_tokens=record_batch_tokens, split_by=split_by, split_seed=split_seed,
                              text_field=text_field, strict=strict, dedupe=dedupe, group=group,
                              progress_interval_s=progress_interval_s,
                              sources=[{"name": "inputs", "inputs": list(inputs), "files": len(files)}])
    if group.is_root:
        print(f"wrote {Path(out_dir) / 'manifest.json'}\n{summarize(manifest)}")
    return manifest


if __name__ == "__main__":
    run_cli(tokenize_shards)
