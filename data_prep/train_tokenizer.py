"""Train a SentencePiece tokenizer (BPE or unigram) on text, deterministically.

    python -m data_prep.train_tokenizer --inputs 'corpus/*.txt' --output tok/tokenizer.model --vocab_size 8000

Fixed ids: unk=0, bos=1, eos=2, pad=3 (EOS joins documents in the token stream). `byte_fallback`
makes every string encodable; the identity normalisation, kept whitespace runs and no dummy prefix
make decode(encode(text)) == text, which matters for source code. "\\n" is a piece of its own.
The result depends only on the input, the options, `seed` and `num_threads` (SentencePiece's
trainer gives different models for different thread counts, so the count is fixed, not "all cores").
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Sequence, Union

if __package__ in (None, ""):  # run as `python data_prep/train_tokenizer.py`
    # the repository root instead of data_prep/, whose inspect.py would shadow the standard library's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import sentencepiece as spm

from data_prep.cli import run_cli
from data_prep.sources import Task, expand_inputs, iter_sentences, plan_tasks
from pipeline.data.manifest import DataError, sha256_file

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def tokenizer_info(model_path: os.PathLike | str) -> Dict[str, Any]:
    """Vocab size, special ids and sha256 of a SentencePiece model; refuses a model without EOS."""
    path = Path(model_path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path}: not a SentencePiece model ({err})") from None
    info = {"type": "sentencepiece", "sha256": sha256_file(path), "vocab_size": int(sp.get_piece_size()),
            "eos_id": int(sp.eos_id()), "bos_id": int(sp.bos_id()), "pad_id": int(sp.pad_id()),
            "unk_id": int(sp.unk_id())}
    if info["eos_id"] < 0:
        raise DataError(f"{path}: tokenizer has no EOS piece (documents are joined with EOS); "
                        "train one with eos_id set, e.g. with data_prep.train_tokenizer")
    return info


def sample_tasks(tasks: Sequence[Task], max_bytes: int) -> List[Task]:
    """Evenly spaced tasks holding about `max_bytes` (all of them when `max_bytes` is 0 or covers all),
    in input order: a deterministic sample of the whole input for tokenizer training."""
    total = sum(t.nbytes for t in tasks)
    if not max_bytes or total <= max_bytes or len(tasks) <= 1:
        return list(tasks)
    n = min(len(tasks), max(1, -(-len(tasks) * max_bytes // total)))
    picks = sorted({round(i * (len(tasks) - 1) / max(n - 1, 1)) for i in range(n)})
    return [tasks[i] for i in picks]


def train_on_tasks(tasks: Sequence[Task], output: str, vocab_size: int = 8000,
                   model_type: Literal["bpe", "unigram"] = "bpe", character_coverage: float = 1.0,
                   input_sentence_size: int = 1_000_000, max_sentence_length: int = 16384,
                   max_train_bytes: int = 0, seed: int = 0, num_threads: int = 1,
                   split_digits: bool = True, text_field: str = "text", verbose: bool = False,
                   skip_document=None, strict: bool = False) -> Dict[str, Any]:
    """Train on the documents of `tasks` (less those `skip_document(doc_id, text)` rejects); writes
    `output` (a .model file). Returns the training options. With `max_train_bytes`, the documents come
    from tasks spread evenly over the whole input (`sample_tasks`), not from its first files."""
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small: 256 byte pieces + 4 special ids + text pieces")
    options = dict(vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
                   input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
                   max_sentence_length=max_sentence_length, byte_fallback=True, split_digits=split_digits,
                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                   add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
                   unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, num_threads=num_threads)
    spm.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    start = time.time()
    # SentencePiece swallows an exception raised inside the sentence iterator and reports "too little
    # text" instead; keep the real one (a bad input file, named with its line) and raise that.
    failure: List[BaseException] = []

    def sentences():
        try:
            yield from iter_sentences(sample_tasks(tasks, max_train_bytes), text_field, max_train_bytes,
                                      skip_document, strict)
        except Exception as err:
            failure.append(err)
            raise

    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=buffer,
                                       minloglevel=0 if verbose else 2, **options)
    except RuntimeError as err:
        if failure:
            raise failure[0] from None
        raise DataError(f"SentencePiece training failed: {err} (too little text for vocab_size={vocab_size}?)") from None
    if failure:
        raise failure[0]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    options.pop("user_defined_symbols")
    options.update(seed=seed, max_train_bytes=max_train_bytes, user_defined_symbols=["\\n"],
                   seconds=round(time.time() - start, 3))
    return options


def train_tokenizer(inputs: Union[List[str], str], output: str = "tokenizer.model", vocab_size: int = 8000,
                    model_type: Literal["bpe", "unigram"] = "bpe", character_coverage: float = 1.0,
                    input_sentence_size: int = 1_000_000, max_sentence_length: int = 16384,
                    max_train_bytes: int = 0, seed: int = 0, num_threads: int = 1, split_digits: bool = True,
                    text_field: str = "text", verbose: bool = False) -> Dict[str, Any]:
    """Train a SentencePiece model on text files / globs / directories / .jsonl files.

    Args:
        inputs: A file, glob or directory, or a list '[a,b]' (repeat with --inputs+). .jsonl: one document per line; .parquet: one per row; other files: one document each.
        output: Path of the .model file to write.
        vocab_size: Vocabulary size (includes 256 byte-fallback pieces and 4 special ids).
        model_type: `bpe` or `unigram`.
        character_coverage: Fraction of characters covered by pieces; the rest use byte fallback.
        input_sentence_size: At most this many lines (sampled with `seed`) are used for training (0: all).
        max_sentence_length: Longer lines (bytes) are skipped by the trainer.
        max_train_bytes: Stop reading documents after this many characters (0: read all).
        seed: Seed of SentencePiece's line sampling.
        num_threads: Trainer threads; fixed because the model depends on it.
        split_digits: Split numbers into single digits.
        text_field: Field of a .jsonl line (column of a .parquet file) holding the text.
        verbose: Show SentencePiece's training log.
    """
    tasks = plan_tasks(expand_inputs(inputs))
    options = train_on_tasks(tasks, output, vocab_size=vocab_size, model_type=model_type,
                             character_coverage=character_coverage, input_sentence_size=input_sentence_size,
                             max_sentence_length=max_sentence_length, max_train_bytes=max_train_bytes, seed=seed,
                             num_threads=num_threads, split_digits=split_digits, text_field=text_field,
                             verbose=verbose)
    info = tokenizer_info(output)
    print(f"wrote {output}: vocab {info['vocab_size']}, eos {info['eos_id']}, sha256 {info['sha256'][:16]}..., "
          f"{options['seconds']:.1f} s")
    return {**info, "path": str(output), "trained": options}


if __name__ == "__main__":
    run_cli(train_tokenizer)
