"""Shared fixtures for the data tests: a tiny deterministic corpus and its tokenizer."""
import random
from pathlib import Path

import pytest

WORDS = ("the of and to in is was for on with as by at from that this are be it an or which has not "
         "liquid spike mamba neuron state token shard epoch").split()


def write_tiny_corpus(root: Path, n_files: int = 10, seed: int = 0) -> Path:
    """A few small text files and a jsonl file (with one empty document) of pseudo-random sentences."""
    rng = random.Random(seed)

    def text() -> str:
        return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "."
                         for _ in range(rng.randint(3, 30)))

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (root / f"doc{i:02d}.txt").write_text(text(), encoding="utf-8")
    import json
    lines = [json.dumps({"text": text(), "id": i}) for i in range(6)] + [json.dumps({"text": ""})]
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def data_corpus(tmp_path_factory) -> Path:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="session")
def data_tokenizer(data_corpus, tmp_path_factory) -> Path:
    from data_prep.sources import expand_inputs, plan_tasks
    from data_prep.train_tokenizer import train_on_tasks

    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    train_on_tasks(plan_tasks(expand_inputs([str(data_corpus)])), str(path), vocab_size=300)
    return path


@pytest.fixture(scope="session")
def packed_data_dir(data_corpus, data_tokenizer, tmp_path_factory) -> Path:
    """Several shards, several record batches per shard, both splits."""
    from data_prep.tokenize_shards import tokenize_files
    from data_prep.sources import expand_inputs

    out = tmp_path_factory.mktemp("packed") / "data"
    tokenize_files(expand_inputs([str(data_corpus)]), str(out), str(data_tokenizer), val_fraction=0.2,
                   num_workers=1, shard_tokens=1500, task_bytes=700, record_batch_tokens=400, verbose=False)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Model tests use toy tensors, where threads only add contention."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
