"""One command from raw text to a ready data folder: train (or take) a tokenizer, then tokenize.

    python -m data_prep.prepare --source python-stdlib --out_dir data/demo --vocab_size 4000
    python -m data_prep.prepare --inputs 'corpus/*.jsonl' --tokenizer tok.model --out_dir data/x

`--source python-stdlib` is an embedded offline corpus: the running Python's own standard-library
`.py` files (no tests/IDLE/site-packages), sorted, capped at `--max_bytes`. It differs between
Python versions; the manifest's `sources` records the version.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Literal, Optional, Union

if __package__ in (None, ""):  # run as `python data_prep/prepare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.cli import run_cli
from data_prep.sources import plan_tasks, resolve_files
from data_prep.tokenize_shards import TOKENIZER_NAME, default_workers, holdout_rule, summarize, tokenize_files
from data_prep.train_tokenizer import train_on_tasks
from pipeline.data.manifest import Manifest


def prepare(out_dir: str = "data/demo", inputs: Union[List[str], str, None] = None,
            source: Optional[Literal["python-stdlib"]] = None, max_bytes: int = 8_000_000,
            tokenizer: Optional[str] = None, vocab_size: int = 8000,
            model_type: Literal["bpe", "unigram"] = "bpe", character_coverage: float = 1.0,
            input_sentence_size: int = 1_000_000, tokenizer_max_bytes: int = 0, tokenizer_seed: int = 0,
            tokenizer_threads: int = 1, val_fraction: float = 0.05, num_workers: int = default_workers(),
            shard_tokens: int = 1 << 26, task_bytes: int = 1 << 20,
            split_by: Literal["content", "doc_id"] = "content", split_seed: int = 0,
            text_field: str = "text") -> Manifest:
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
        tokenizer_max_bytes: Read at most this many characters for tokenizer training (0: all).
        tokenizer_seed: Seed of the tokenizer trainer's sampling.
        tokenizer_threads: Tokenizer trainer threads (fixed: the model depends on it).
        val_fraction: Fraction of documents held out for validation (by document hash).
        num_workers: Tokenizer worker processes (output does not depend on it).
        shard_tokens: Tokens per shard at most.
        task_bytes: Input bytes per work unit.
        split_by: Hash the document text (`content`) or its `doc_id` to pick its split.
        split_seed: Salt of the split hash.
        text_field: Field of a .jsonl line (column of a .parquet file) holding the text.
    """
    start = time.time()
    files, described = resolve_files(inputs, source, max_bytes)
    n_bytes = sum(f.size for f in files)
    print(f"prepare: {len(files)} input files, {n_bytes / 1e6:.1f} MB -> {out_dir}")
    tokenizer_extra = None
    if tokenizer is None:
        t0 = time.time()
        model_path = Path(out_dir) / TOKENIZER_NAME
        options = train_on_tasks(plan_tasks(files, task_bytes), str(model_path), vocab_size=vocab_size,
                                 model_type=model_type, character_coverage=character_coverage,
                                 input_sentence_size=input_sentence_size, max_train_bytes=tokenizer_max_bytes,
                                 seed=tokenizer_seed, num_threads=tokenizer_threads, text_field=text_field,
                                 # validation text stays unseen, by the tokenizer too
                                 skip_document=holdout_rule(val_fraction, split_by, split_seed))
        options.pop("seconds", None)
        options["documents"] = "train split only (validation documents are held out by the split rule)"
        tokenizer_extra = {"trained": options}
        tokenizer = str(model_path)
        print(f"  trained {model_type} tokenizer, vocab {vocab_size}, in {time.time() - t0:.2f} s")
    manifest = tokenize_files(files, out_dir, tokenizer, val_fraction=val_fraction, num_workers=num_workers,
                              shard_tokens=shard_tokens, task_bytes=task_bytes, split_by=split_by,
                              split_seed=split_seed, text_field=text_field, sources=described,
                              tokenizer_extra=tokenizer_extra)
    print(summarize(manifest))
    total = time.time() - start
    print(f"  total {total:.2f} s ({n_bytes / 1e6 / max(total, 1e-9):.1f} MB/s overall); "
          f"manifest: {Path(out_dir) / 'manifest.json'}")
    return manifest


if __name__ == "__main__":
    run_cli(prepare)
