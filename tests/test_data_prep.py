"""data_prep: tokenizer training, parallel tokenization into Arrow shards, manifest, splits, errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import sentencepiece as spm

from data_prep.sources import expand_inputs, plan_tasks, read_task
from data_prep.tokenize_shards import tokenize_files
from data_prep.train_tokenizer import tokenizer_info, train_on_tasks
from pipeline.data import DataError, load_manifest
from pipeline.data.manifest import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def shard_rows(data_dir: Path, split: str):
    m = load_manifest(data_dir)
    rows = []
    for s in m.split(split).shards:
        table = pa.ipc.open_file(pa.memory_map(str(data_dir / s.file))).read_all()
        rows += list(zip(table.column("doc_id").to_pylist(), table.column("tokens").to_pylist()))
    return rows


def all_documents(corpus: Path):
    docs = []
    for task in plan_tasks(expand_inputs([str(corpus)])):
        docs += read_task(task)[0]
    return docs


def test_manifest_counts_checksums_and_tokens(packed_data_dir, data_corpus, data_tokenizer):
    m = load_manifest(packed_data_dir)
    assert m.format == 1 and m.token_dtype == "uint16"
    assert m.tokenizer.sha256 == sha256_file(data_tokenizer) == sha256_file(packed_data_dir / "tokenizer.model")
    assert m.tokenizer.vocab_size == 300 and m.tokenizer.eos_id == 2 and m.tokenizer.pad_id == 3
    assert len(m.split("train").shards) >= 2, "the fixture should produce several shards"
    for split in m.splits.values():
        for s in split.shards:
            path = packed_data_dir / s.file
            assert s.sha256 == sha256_file(path) and s.bytes == path.stat().st_size
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            assert table.num_rows == s.rows
            assert sum(len(t) for t in table.column("tokens").to_pylist()) == s.tokens
            assert s.tokens <= 1500 or s.rows == 1
    # Every non-empty document is written once, with exactly the tokenizer's encoding.
    sp = spm.SentencePieceProcessor(model_file=str(data_tokenizer))
    docs = all_documents(data_corpus)
    expected = {doc_id: sp.encode(text) for doc_id, text in docs if text}
    written = dict(shard_rows(packed_data_dir, "train") + shard_rows(packed_data_dir, "validation"))
    assert written == expected
    stats = m.extra["stats"]
    assert stats["empty_documents"] == 1 and stats["documents_read"] == len(docs) + 1
    assert stats["skipped_at"] == {"empty_document": [f"{Path(data_corpus) / 'more.jsonl'}:7: empty document"]}
    assert m.split("train").documents + m.split("validation").documents == len(expected) == stats["documents_written"]


def test_validation_is_held_out_by_document(packed_data_dir):
    train = {d for d, _ in shard_rows(packed_data_dir, "train")}
    val = {d for d, _ in shard_rows(packed_data_dir, "validation")}
    assert val and train and not train & val


def test_at_least_one_validation_document(tmp_path, data_tokenizer):
    for i in range(2):
        (tmp_path / f"d{i}.txt").write_text(f"document number {i} is here.", encoding="utf-8")
    m = tokenize_files(expand_inputs([str(tmp_path / "*.txt")]), str(tmp_path / "out"), str(data_tokenizer),
                       val_fraction=0.001, verbose=False)
    assert m.split("validation").documents == 1 and m.split("train").documents == 1
    assert set(m.extra["split_rule"]["forced"]) == {"validation"}


def test_parallel_workers_give_byte_identical_output(data_corpus, data_tokenizer, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        tokenize_files(expand_inputs([str(data_corpus)]), str(out), str(data_tokenizer), val_fraction=0.2,
                       num_workers=workers, shard_tokens=1500, task_bytes=700, record_batch_tokens=400,
                       verbose=False)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir())
    assert len([f for f in files if f.endswith(".arrow")]) >= 3
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.parametrize("line, message", [
    ('{"txt": "no text field"}', "has no 'text' field"),
    ('{"text": "ok", ', "invalid JSON"),
    ('{"text": 3}', "must be a string"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, data_tokenizer, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n' + line + '\n{"text": "also fine"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: ") + ".*" + re.escape(message)):
        tokenize_files(expand_inputs([str(bad)]), str(tmp_path / "out"), str(data_tokenizer), verbose=False,
                       strict=True)


def test_undecodable_input_names_file_and_line(tmp_path, data_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{bad}:2: not valid UTF-8")):
        tokenize_files(expand_inputs([str(bad)]), str(tmp_path / "out"), str(data_tokenizer), verbose=False,
                       strict=True)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(DataError, match=re.escape(f"{txt}:2: not valid UTF-8")):
        tokenize_files(expand_inputs([str(txt)]), str(tmp_path / "out"), str(data_tokenizer), verbose=False,
                       num_workers=2, strict=True)


def test_jsonl_chunks_keep_line_numbers(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)), encoding="utf-8")
    tasks = plan_tasks(expand_inputs([str(path)]), task_bytes=64)
    assert len(tasks) > 5
    ids = [doc_id for t in tasks for doc_id, _ in read_task(t)[0]]
    assert ids == [f"{path}:{i + 1}" for i in range(50)]


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nope.txt: input file not found"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_tokenizer_is_deterministic_and_round_trips(data_corpus, tmp_path):
    tasks = plan_tasks(expand_inputs([str(data_corpus)]))
    a, b = tmp_path / "a.model", tmp_path / "b.model"
    train_on_tasks(tasks, str(a), vocab_size=300, seed=7)
    train_on_tasks(tasks, str(b), vocab_size=300, seed=7)
    assert a.read_bytes() == b.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a))
    text = "def f(x):\n\tif x:  # café ∑ 日本\n        return  x\r\n"
    assert sp.decode(sp.encode(text)) == text


def test_tokenizer_without_eos_is_refused(data_corpus, tmp_path, data_tokenizer):
    model = tmp_path / "noeos.model"
    text = (data_corpus / "doc00.txt").read_text().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=300, byte_fallback=True, eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="no EOS"):
        tokenizer_info(model)


def test_cli_scripts_run_and_report_errors(data_corpus, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "data_prep/prepare.py", "--inputs", str(data_corpus),
                           "--out_dir", str(out), "--vocab_size", "300", "--num_workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "validation" in done.stdout
    assert load_manifest(out).split("validation").documents >= 1
    bad = subprocess.run([sys.executable, "-m", "data_prep.tokenize_shards", "--inputs", str(tmp_path / "x.txt"),
                          "--out_dir", str(out), "--tokenizer", str(out / "tokenizer.model")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "x.txt: input file not found" in bad.stderr


def test_stdlib_source_is_capped_and_sorted():
    from data_prep.sources import python_stdlib_files

    files, info = python_stdlib_files(max_bytes=200_000)
    assert 0 < info["bytes"] <= 200_000 and len(files) == info["files"]
    names = [f.name for f in files]
    assert names == sorted(names) and all(n.startswith("python-stdlib/") and n.endswith(".py") for n in names)
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)


def test_tokenizer_trainer_never_sees_validation_documents(data_corpus, tmp_path, data_tokenizer):
    from data_prep.sources import iter_sentences
    from data_prep.tokenize_shards import holdout_rule

    rule = holdout_rule(val_fraction=0.4)
    tasks = plan_tasks(expand_inputs(str(data_corpus)))
    docs = [doc for task in tasks for doc in read_task(task)[0] if doc[1]]
    held_out = [text for doc_id, text in docs if rule(doc_id, text)]
    assert 0 < len(held_out) < len(docs)
    seen = set(iter_sentences(tasks, skip_document=rule))
    kept = {line for doc_id, text in docs if not rule(doc_id, text) for line in text.split("\n") if line}
    assert seen == kept
    # the rule is the one the shard writer applies: held-out documents are exactly the validation split
    manifest = tokenize_files(expand_inputs(str(data_corpus)), str(tmp_path / "out"), data_tokenizer,
                              val_fraction=0.4)
    assert manifest.splits["validation"].documents == len(held_out)


def write_parquet(path: Path, texts, row_group_size: int = 3, column: str = "content") -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def test_parquet_input_is_one_document_per_row(data_corpus, data_tokenizer, tmp_path):
    texts = [text for _, text in all_documents(data_corpus) if text]
    (tmp_path / "in").mkdir()
    source = write_parquet(tmp_path / "in" / "corpus.parquet", texts)
    files = expand_inputs([str(tmp_path / "in")])  # a folder picks up .parquet files
    assert [f.kind for f in files] == ["parquet"]
    tasks = plan_tasks(files, task_bytes=1500)
    assert len(tasks) > 1 and [t.first_line for t in tasks][0] == 0  # cut by row groups
    docs = [doc for task in tasks for doc in read_task(task, text_field="content")[0]]
    assert [text for _, text in docs] == texts
    assert [doc_id for doc_id, _ in docs] == [f"{files[0].name}:{row}" for row in range(len(texts))]
    # The CLI names the column with --text_field; every row becomes a document of the data folder.
    out = tmp_path / "data"
    done = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--inputs", str(source), "--tokenizer",
                           str(data_tokenizer), "--text_field", "content", "--out_dir", str(out),
                           "--val_fraction", "0.2", "--task_bytes", "1500"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = dict(shard_rows(out, "train") + shard_rows(out, "validation"))
    sp = spm.SentencePieceProcessor(model_file=str(data_tokenizer))
    assert written == {doc_id: sp.encode(text) for doc_id, text in docs}


def test_parquet_errors_name_the_file_and_the_row(tmp_path):
    bad_column = write_parquet(tmp_path / "a.parquet", ["x", "y"], column="body")
    with pytest.raises(DataError, match=r"a\.parquet: Parquet file has no column 'text' \(columns: body, id\)"):
        read_task(plan_tasks(expand_inputs([str(bad_column)]))[0])
    nulls = write_parquet(tmp_path / "b.parquet", ["x", "y", None, "z"], row_group_size=2)
    tasks = plan_tasks(expand_inputs([str(nulls)]), task_bytes=1)
    read_task(tasks[0], text_field="content", strict=True)
    with pytest.raises(DataError, match=r"b\.parquet: row 2: column 'content' is null"):
        read_task(tasks[1], text_field="content", strict=True)
    docs, skipped = read_task(tasks[1], text_field="content")
    assert [d for d, _ in docs] == [f"{nulls}:3"] and skipped.counts == {"missing_text_field": 1}
    numbers = tmp_path / "c.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(DataError, match=r"c\.parquet: column 'text' holds int64, not text"):
        read_task(plan_tasks(expand_inputs([str(numbers)]))[0])
    broken = tmp_path / "d.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        read_task(plan_tasks(expand_inputs([str(broken)]))[0], strict=True)
