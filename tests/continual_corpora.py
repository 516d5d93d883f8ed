"""Tiny, clearly different corpora for continual-learning tests: pseudo-languages with disjoint alphabets.

Each language has its own lexicon (words from its own letters) with Zipf-like word frequencies and a
fixed word-to-word preference, so a small model learns it within a few dozen steps, and learning one
language pushes probability away from the others' tokens: forgetting is large and easy to measure.
All folders are tokenized with one shared tokenizer, as a continual schedule requires.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Sequence

ALPHABETS = {
    "alpha": ("ptkmn", "aiu"),   # consonants, vowels
    "beta": ("bdgvz", "eo"),
    "gamma": ("fhlrsw", "y"),
}


def language_text(name: str, documents: int, seed: int = 0) -> list[str]:
    """A language `name` (an alphabet of ALPHABETS), or `name/dialect`: the same words as `name` with their
    own frequencies and word order (tasks that share a vocabulary and differ in what follows what)."""
    language, _, dialect = name.partition("/")
    consonants, vowels = ALPHABETS[language]
    rng = random.Random(f"{language}:{seed}")
    lexicon = sorted({"".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3)))
                      for _ in range(60)})
    if dialect:
        rng = random.Random(f"{name}:{seed}")
        lexicon = rng.sample(lexicon, len(lexicon))  # another frequency order
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    follow = {word: rng.sample(lexicon, 3) for word in lexicon}  # each word prefers three successors
    docs = []
    for _ in range(documents):
        lines = []
        for _ in range(rng.randint(8, 16)):
            word = rng.choices(lexicon, weights)[0]
            words = [word]
            for _ in range(rng.randint(4, 10)):
                word = rng.choice(follow[word]) if rng.random() < 0.7 else rng.choices(lexicon, weights)[0]
                words.append(word)
            lines.append(" ".join(words) + ".")
        docs.append("\n".join(lines) + "\n")
    return docs


def write_language(folder: Path, name: str, documents: int = 40, seed: int = 0, parquet: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    docs = language_text(name, documents, seed)
    name = name.replace("/", "-")
    if parquet:  # the same documents as one Parquet file with a `content` column
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": docs, "id": list(range(len(docs)))}), folder / f"{name}.parquet",
                       row_group_size=7)
    else:
        for i, text in enumerate(docs):
            (folder / f"{name}{i:03d}.txt").write_text(text, encoding="utf-8")
    return folder


def prepare_languages(root: Path, names: Sequence[str] = ("alpha", "beta", "gamma"), documents: int = 150,
                      vocab_size: int = 512) -> Dict[str, Path]:
    """One tokenizer trained on all of `names`, then one tokenized data folder per name (`/` becomes `-`)."""
    from data_prep.sources import expand_inputs, plan_tasks
    from data_prep.tokenize_shards import tokenize_files
    from data_prep.train_tokenizer import train_on_tasks

    folder = lambda name: name.replace("/", "-")  # noqa: E731
    raw = {name: write_language(root / "raw" / folder(name), name, documents) for name in names}
    tokenizer = root / "shared.model"
    files = expand_inputs([str(raw[name]) for name in names])
    train_on_tasks(plan_tasks(files), str(tokenizer), vocab_size=vocab_size)
    out = {}
    for name in names:
        out[name] = root / folder(name)
        tokenize_files(expand_inputs([str(raw[name])]), str(out[name]), str(tokenizer), val_fraction=0.2,
                       num_workers=1, verbose=False)
    return out
