"""One command from raw text to a ready data folder: train (or take) a tokenizer, then tokenize.

    python -m data_prep.prepare --source python-stdlib --out_dir data/demo --vocab_size 4000
    python -m data_prep.prepare --inputs 'corpus/*.jsonl' --tokenizer tok.model --out_dir data/x

Across ranks and nodes (MPI, see `data_prep/tokenize_shards.py` for who does what; the output is the
same bytes for any number of ranks and workers):

    mpirun -n 16 python -m data_prep.prepare --inputs '/shared/corpus/*.jsonl' --out_dir /shared/data/x
    sbatch --nodes=4 --ntasks-per-node=8 launch/slurm/prepare.sbatch --inputs ... --out_dir ...

Rank 0 lists the inputs, plans the work and trains the tokenizer (on a deterministic sample when
`--tokenizer_max_bytes` is set) into `<out_dir>/.prep/`, from where every rank reads it. An
interrupted run restarted with the same command keeps the tokenizer and every finished part.

`--source python-stdlib` is an embedded offline corpus: the running Python's own standard-library
`.py` files (no tests/IDLE/site-packages), sorted, capped at `--max_bytes`. It differs between
Python versions; the manifest's `sources` records the version.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Literal, Optional, Union

if __package__ in (None, ""):  # run as `python data_prep/prepare.py`
    # the repository root instead of data_prep/, whose inspect.py would shadow the standard library's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from data_prep.cli import run_cli
from data_prep.mpi import group as mpi_group
from data_prep.sources import plan_tasks, resolve_files
from data_prep.tokenize_shards import (TOKENIZER_NAME, WORK_DIR, default_workers, holdout_rule, summarize,
                                       tokenize_files)
from data_prep.train_tokenizer import train_on_tasks
from pipeline.data.manifest import Manifest, sha256_file


def prepare(out_dir: str = "data/demo", inputs: Union[List[str], str, None] = None,
            source: Optional[Literal["python-stdlib"]] = None, max_bytes: int = 8_000_000,
            tokenizer: Optional[str] = None, vocab_size: int = 8000,
            model_type: Literal["bpe", "unigram"] = "bpe", character_coverage: float = 1.0,
            input_sentence_size: int = 1_000_000, tokenizer_max_bytes: int = 0, tokenizer_seed: int = 0,
            tokenizer_threads: int = 1, val_fraction: float = 0.05, num_workers: int = default_workers(),
            shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
            split_by: Literal["content", "doc_id"] = "content", split_seed: int = 0,
            text_field: str = "text", strict: bool = False, dedupe: Literal["none", "exact"] = "none",
            progress_interval_s: float = 30.0) -> Manifest:
    """Train a SentencePiece tokenizer (unless --tokenizer is given) and tokenize into Arrow shards.

    Args:
        out_dir: Output data folder (manifest.json, shards, tokenizer.model).
        inputs: A file, glob or directory, or a list '[a,b]' (repeat with --inputs+). .jsonl: one document per line; .parquet: one per row; other files: one document each.
        source: Embedded offline corpus: `python-stdlib` (this Python's standard-library sources).
        max_bytes: Cap on the bytes taken from --source (0: no cap).
        tokenizer: Existing SentencePiece .model to use instead of training one.
        vocab_size: Vocabulary size of the trained tokenizer.
        model_type: `bpe` or `unigram`.
        character_coverage: Character coverage of the trained tokenizer (rest: byte fallback).
        input_sentence_size: Lines sampled for tokenizer training (0: all).
        tokenizer_max_bytes: Train the tokenizer on about this many characters, from input spread evenly over all files (0: all).
        tokenizer_seed: Seed of the tokenizer trainer's sampling.
        tokenizer_threads: Tokenizer trainer threads (fixed: the model depends on it).
        val_fraction: Fraction of documents held out for validation (by document hash).
        num_workers: Tokenizer worker processes per rank (output does not depend on it).
        shard_tokens: Tokens per shard at most.
        task_bytes: Input bytes per work unit.
        split_by: Hash the document text (`content`) or its `doc_id` to pick its split.
        split_seed: Salt of the split hash.
        text_field: Field of a .jsonl line (column of a .parquet file) holding the text.
        strict: Any bad input (invalid UTF-8, empty document, malformed JSON line, missing text field, unreadable file) is an error naming its location, instead of being skipped and counted.
        dedupe: `exact`: drop exact duplicate documents (by content hash, across all ranks; the first copy in input order stays).
        progress_interval_s: Seconds between progress lines when stderr is not a terminal (a bar when it is).
    """
    start = time.time()
    group = mpi_group()
    say = print if group.is_root else (lambda *a, **k: None)

    def plan():
        files, described = resolve_files(inputs, source, max_bytes)
        return files, described, plan_tasks(files, task_bytes)

    files, described, tasks = group.on_root(plan)
    n_bytes = sum(f.size for f in files)
    say(f"prepare: {len(files)} input files, {n_bytes / 1e6:.1f} MB, {len(tasks)} tasks -> {out_dir}"
        + (f" on {group.size} ranks x {num_workers} workers" if group.size > 1 else ""))
    tokenizer_extra = None
    if tokenizer is None:
        t0 = time.time()
        work = Path(out_dir) / WORK_DIR
        model_path = work / TOKENIZER_NAME

        def train():
            options = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                           input_sentence_size=input_sentence_size, max_train_bytes=tokenizer_max_bytes,
                           seed=tokenizer_seed, num_threads=tokenizer_threads, text_field=text_field)
            # An interrupted run's tokenizer is kept when it was trained on the same input with the same options.
            key = json.dumps({"options": options, "split": [val_fraction, split_by, split_seed],
                              "tasks": [str(t) for t in tasks]}, sort_keys=True)
            side = work / "tokenizer.json"
            if model_path.is_file() and side.is_file():
                done = json.loads(side.read_text())
                if done["key"] == key and done["sha256"] == sha256_file(model_path):
                    return done["options"], True
            trained = train_on_tasks(tasks, str(model_path), strict=strict,
                                     # validation text stays unseen, by the tokenizer too
                                     skip_document=holdout_rule(val_fraction, split_by, split_seed), **options)
            trained.pop("seconds", None)
            tmp = side.with_name(side.name + ".tmp")
            tmp.write_text(json.dumps({"key": key, "sha256": sha256_file(model_path), "options": trained}))
            tmp.replace(side)
            return trained, False

        options, kept = group.on_root(train)
        options["documents"] = "train split only (validation documents are held out by the split rule)"
        tokenizer_extra = {"trained": options}
        tokenizer = str(model_path)
        how = "kept the interrupted run's" if kept else "trained"
        say(f"  {how} {model_type} tokenizer, vocab {vocab_size}, in {time.time() - t0:.2f} s")
    manifest = tokenize_files(files, out_dir, tokenizer, val_fraction=val_fraction, num_workers=num_workers,
                              shard_tokens=shard_tokens, task_bytes=task_bytes, split_by=split_by,
                              split_seed=split_seed, text_field=text_field, sources=described,
                              tokenizer_extra=tokenizer_extra, strict=strict, dedupe=dedupe, tasks=tasks,
                              group=group, progress_interval_s=progress_interval_s)
    say(summarize(manifest))
    total = time.time() - start
    say(f"  total {total:.2f} s ({n_bytes / 1e6 / max(total, 1e-9):.1f} MB/s overall); "
        f"manifest: {Path(out_dir) / 'manifest.json'}")
    return manifest

if __name__ == "__main__":
    run_cli(prepare)
