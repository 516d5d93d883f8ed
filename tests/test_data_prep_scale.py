"""data_prep at scale: MPI ranks x workers give the same bytes, a killed prep resumes to the same bytes,
bad input is counted by reason (or refused with --strict), exact duplicates are removed, a rewrite
never pulls the data from under a running reader, and `data_prep.inspect` shows a folder."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from conftest import write_tiny_corpus
from data_prep.sources import expand_inputs, plan_tasks
from data_prep.tokenize_shards import tokenize_files
from data_prep.train_tokenizer import train_on_tasks
from launch_env import kill_processes_with_env, wait_until
from pipeline.data import DataError, load_manifest, manifest_hash

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
needs_mpi = pytest.mark.skipif(MPIRUN is None, reason="needs mpirun (the mpich wheel of requirements.txt)")


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def prep(out: Path, *args: str, ranks: int = 1, workers: int = 1, check: bool = True, **popen):
    cmd = [sys.executable, "-m", "data_prep.prepare", "--out_dir", str(out), "--num_workers", str(workers),
           "--progress_interval_s", "0", *args]
    if ranks > 1:
        cmd = [MPIRUN, "-n", str(ranks), *cmd]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, **popen)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def folder_bytes(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def write_messy_corpus(root: Path) -> Path:
    """A clean tiny corpus plus one of each kind of bad input and two exact duplicates."""
    write_tiny_corpus(root, n_files=8, seed=3)
    (root / "copy-of-doc01.txt").write_bytes((root / "doc01.txt").read_bytes())       # duplicate 1
    (root / "empty.txt").write_bytes(b"")                                            # empty document
    (root / "latin1.txt").write_bytes(b"ok line\ncaf\xe9 au lait\n")                   # invalid UTF-8
    first = json.loads((root / "more.jsonl").read_text().splitlines()[0])["text"]
    (root / "bad.jsonl").write_bytes(b"\n".join([
        json.dumps({"text": "a fine line of text"}).encode(),
        b'{"text": "caf\xe9"}',                                                          # invalid UTF-8
        b'{"text": "unterminated',                                                      # malformed JSON
        json.dumps({"body": "no text field"}).encode(),                                  # missing field
        json.dumps({"text": ""}).encode(),                                               # empty document
        b"",                                                                            # blank line (no record)
        json.dumps({"text": first}).encode(),                                            # duplicate 2
    ]) + b"\n")
    (root / "broken.parquet").write_bytes(b"this is not parquet")                       # unreadable file
    return root


EXPECTED_SKIPPED = {"invalid_utf8": 2, "empty_document": 3, "malformed_json": 1, "missing_text_field": 1,
                    "unreadable_file": 1}  # empty_document: empty.txt, bad.jsonl:5 and the tiny corpus' more.jsonl:7


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    return write_messy_corpus(tmp_path_factory.mktemp("messy") / "in")


PREP_ARGS = ("--vocab_size", "300", "--task_bytes", "900", "--shard_tokens", "1200", "--val_fraction", "0.2",
             "--dedupe", "exact", "--tokenizer_max_bytes", "6000")


@needs_mpi
def test_any_ranks_and_workers_give_the_same_bytes(messy, tmp_path):
    outs = {}
    for ranks, workers in ((1, 1), (1, 2), (2, 1), (2, 2)):
        out = tmp_path / f"r{ranks}w{workers}"
        done = prep(out, "--inputs", str(messy), *PREP_ARGS, ranks=ranks, workers=workers)
        assert f"{ranks} ranks x {workers} workers" in done.stdout
        assert not (out / ".prep").exists(), "the work folder is removed after success"
        outs[(ranks, workers)] = folder_bytes(out)
    reference = outs[(1, 1)]
    assert sum(name.endswith(".arrow") for name in reference) >= 4
    for layout, files in outs.items():
        assert files == reference, f"{layout} differs from 1x1"
    # Duplicates and bad input are counted identically at every layout (the manifests are equal bytes).
    stats = load_manifest(tmp_path / "r2w2").extra["stats"]
    assert stats["skipped"] == EXPECTED_SKIPPED and stats["duplicates_removed"] == 2
    assert stats["documents_read"] == stats["documents_written"] + 2 + sum(EXPECTED_SKIPPED.values())


def test_bad_input_is_counted_by_reason_with_locations_or_refused_with_strict(messy, tmp_path, data_tokenizer):
    m = tokenize_files(expand_inputs([str(messy)]), str(tmp_path / "out"), str(data_tokenizer), val_fraction=0.2,
                       task_bytes=900, verbose=False)
    stats = m.extra["stats"]
    assert stats["skipped"] == EXPECTED_SKIPPED and stats["duplicates_removed"] == 0 and stats["dedupe"] == "none"
    assert stats["blank_jsonl_lines"] == 1
    assert stats["documents_read"] == stats["documents_written"] + sum(EXPECTED_SKIPPED.values())
    at = stats["skipped_at"]
    assert at["malformed_json"] == [f"{messy / 'bad.jsonl'}:3: invalid JSON at column 10 (Unterminated string "
                                    "starting at)"]
    assert at["missing_text_field"] == [f"{messy / 'bad.jsonl'}:4: JSON line has no 'text' field"]
    assert [w.split(": ")[0] for w in at["invalid_utf8"]] == [f"{messy / 'bad.jsonl'}:2", f"{messy / 'latin1.txt'}:2"]
    assert at["unreadable_file"][0].startswith(f"{messy / 'broken.parquet'}: not a readable Parquet file")
    assert at["empty_document"][0] == f"{messy / 'bad.jsonl'}:5: empty document"
    written = {d for split in m.splits.values() for s in split.shards
               for d in pa.ipc.open_file(pa.memory_map(str(m.shard_path(s)))).read_all().column("doc_id").to_pylist()}
    assert f"{messy / 'bad.jsonl'}:1" in written and f"{messy / 'bad.jsonl'}:2" not in written
    # --strict: the first bad record in input order is the error
    with pytest.raises(DataError, match=re.escape(f"{messy / 'bad.jsonl'}:2: not valid UTF-8") + ".*--strict"):
        tokenize_files(expand_inputs([str(messy)]), str(tmp_path / "strict"), str(data_tokenizer), strict=True,
                       verbose=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_exact_duplicates_keep_the_first_copy(messy, tmp_path, data_tokenizer):
    m = tokenize_files(expand_inputs([str(messy)]), str(tmp_path / "out"), str(data_tokenizer), val_fraction=0.2,
                       dedupe="exact", verbose=False)
    ids = {d for split in m.splits.values() for s in split.shards
           for d in pa.ipc.open_file(pa.memory_map(str(m.shard_path(s)))).read_all().column("doc_id").to_pylist()}
    assert m.extra["stats"]["duplicates_removed"] == 2
    # input order is sorted: bad.jsonl < copy-of-doc01.txt < doc01.txt < more.jsonl
    assert f"{messy / 'copy-of-doc01.txt'}" in ids and f"{messy / 'doc01.txt'}" not in ids
    assert f"{messy / 'bad.jsonl'}:7" in ids and f"{messy / 'more.jsonl'}:1" not in ids


def test_no_documents_or_an_empty_split_is_one_clear_error(tmp_path, data_tokenizer):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text('{"text": ""}\n{"oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no document to write: 1 input files gave 2 records, all skipped "
                                        r"\(empty document: 1, malformed JSON line: 1\); first: .*x\.jsonl:1"):
        tokenize_files(expand_inputs([str(tmp_path / "a")]), str(tmp_path / "o"), str(data_tokenizer), verbose=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "one.txt").write_text("just one document", encoding="utf-8")
    with pytest.raises(DataError, match=r"split would be empty: 1 document"):
        tokenize_files(expand_inputs([str(tmp_path / "b")]), str(tmp_path / "o"), str(data_tokenizer), verbose=False)
    assert not (tmp_path / "o" / "manifest.json").exists()
    # asked for: no validation split at all
    m = tokenize_files(expand_inputs([str(tmp_path / "b")]), str(tmp_path / "o"), str(data_tokenizer),
                       val_fraction=0.0, verbose=False)
    assert m.split("train").documents == 1 and m.split("validation").documents == 0


def test_tokenizer_training_names_the_undecodable_file(tmp_path, data_corpus):
    (tmp_path / "in").mkdir()
    shutil.copy(data_corpus / "doc00.txt", tmp_path / "in" / "a.txt")
    (tmp_path / "in" / "b.txt").write_bytes(b"fine\nnot \xff fine\n")
    tasks = plan_tasks(expand_inputs([str(tmp_path / "in")]))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'in' / 'b.txt'}:2: not valid UTF-8")):
        train_on_tasks(tasks, str(tmp_path / "t.model"), vocab_size=300, strict=True)
    train_on_tasks(tasks, str(tmp_path / "t.model"), vocab_size=300)  # without --strict it is skipped


def _rank_process(marker: str, rank: int):
    """The pid of MPI rank `rank` of the job whose processes carry `marker` in their environment."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ and f"PMI_RANK={rank}".encode() in environ and b"data_prep.prepare" in cmdline:
            return int(proc.name)
    return None


@needs_mpi
def test_killed_prep_resumes_with_the_same_bytes(tmp_path, data_tokenizer):
    corpus = tmp_path / "big.jsonl"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    corpus.write_text("".join(json.dumps({"text": f"{i}: {text[i % 500:]}"}) + "\n" for i in range(150)),
                      encoding="utf-8")
    args = ("--inputs", str(corpus), "--tokenizer", str(data_tokenizer), "--task_bytes", "40000",
            "--shard_tokens", "200000", "--val_fraction", "0.1")
    reference = tmp_path / "reference"
    prep(reference, *args)
    out = tmp_path / "out"
    marker = f"DATA_PREP_TEST={uuid.uuid4().hex}"
    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "data_prep.prepare", "--out_dir", str(out), "--num_workers",
           "1", "--progress_interval_s", "0", *args]
    job = subprocess.Popen(cmd, cwd=ROOT, env=env(**dict([marker.split("=")])), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parts = out / ".prep" / "parts"
    try:
        wait_until(lambda: len(list(parts.glob("*.npz"))) >= 4 if parts.is_dir() else False, 120, "4 finished parts",
                   interval=0.01)
        os.kill(_rank_process(marker, 1), signal.SIGKILL)  # one rank dies: the job must end, not hang
        log = job.communicate(timeout=60)[0]
    finally:
        kill_processes_with_env(marker)
    assert job.returncode != 0, log
    finished = sorted(parts.glob("*.npz"))
    total = len(plan_tasks(expand_inputs([str(corpus)]), 40000))
    assert 4 <= len(finished) < total, f"the kill came too late to test a resume ({len(finished)} of {total})"
    assert not (out / "manifest.json").exists()
    damaged = finished[0].with_suffix(".arrow")
    damaged.write_bytes(damaged.read_bytes()[:100])  # a part cut short must be redone, not trusted
    done = prep(out, *args, ranks=2)
    assert f"kept {len(finished) - 1} of {total} tokenized parts" in done.stdout, done.stdout
    assert folder_bytes(out) == folder_bytes(reference)


def test_rewrite_keeps_a_running_reader_on_the_old_data(tmp_path, data_tokenizer):
    """Issue 17 (6): data_prep used to open shards with "wb" over files a job had memory-mapped (SIGBUS)."""
    old_in, new_in = write_tiny_corpus(tmp_path / "old", seed=1), write_tiny_corpus(tmp_path / "new", seed=2, n_files=4)
    data = tmp_path / "data"
    args = ("--tokenizer", str(data_tokenizer), "--shard_tokens", "1500", "--val_fraction", "0.2")
    prep(data, "--inputs", str(old_in), *args)
    old_hash = manifest_hash(data)
    reader = subprocess.Popen([sys.executable, "-c", (
        "import sys\n"
        "from pipeline.data.reader import PackedReader\n"
        f"r = PackedReader({str(data)!r}, 'train', sequence_length=16, seed=1)\n"
        "first = [r.sample_tokens(i).tolist() for i in range(r.num_windows)]\n"
        "print('ready', r.num_windows, flush=True)\n"
        "sys.stdin.readline()\n"
        "again = [r.sample_tokens(i).tolist() for i in range(r.num_windows)]\n"
        "print('same' if again == first else 'changed', flush=True)\n")],
        cwd=ROOT, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().startswith("ready"), reader.stderr.read()
        prep(data, "--inputs", str(new_in), *args)  # rewrite the folder under the reader
        out, err = reader.communicate("go\n", timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0 and out.strip() == "same", f"rc {reader.returncode} (-7 is SIGBUS): {out} {err}"
    new = load_manifest(data)
    assert manifest_hash(new) != old_hash and new.extra["sources"][0]["inputs"] == [str(new_in)]
    listed = {s.file for sp in new.splits.values() for s in sp.shards}
    assert {p.name for p in data.glob("*.arrow")} == listed, "stale shards of the old run are gone"


def test_manifest_hash_identifies_the_content(packed_data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(packed_data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sources"] = [{"name": "moved"}]  # a description, not data: same hash
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_hash(copy) == manifest_hash(packed_data_dir) == manifest_hash(load_manifest(packed_data_dir))
    manifest["splits"]["validation"]["shards"][-1]["sha256"] = "0" * 64  # one shard's bytes differ
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_hash(copy) != manifest_hash(packed_data_dir)


def test_inspect_shows_summary_histogram_and_a_packed_sample(packed_data_dir, tmp_path):
    from pipeline.data.reader import PackedReader

    png = tmp_path / "lengths.png"
    done = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(packed_data_dir), "--sample", "3",
                           "--split", "validation", "--sequence_length", "16", "--seed", "5", "--png", str(png)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    m = load_manifest(packed_data_dir)
    assert f"manifest_hash {manifest_hash(m)[:16]}" in out and m.tokenizer.sha256[:16] in out
    assert re.search(r"empty_document\s+1\s+first: .*more\.jsonl:7", out)
    rows = re.findall(r"^\s+\[\s*(\d+),\s*(\d+)\)\s+([\d,]+)\s+([\d,]+)", out, re.M)
    assert sum(int(r[2].replace(",", "")) for r in rows) == m.split("train").documents
    assert sum(int(r[3].replace(",", "")) for r in rows) == m.split("validation").documents
    assert png.stat().st_size > 1000
    reader = PackedReader(packed_data_dir, "validation", sequence_length=16, seed=5)
    tokens = reader.sample_tokens(3).tolist()
    assert f"tokens: {tokens}" in out
    sp = spm.SentencePieceProcessor(model_file=str(packed_data_dir / "tokenizer.model"))
    first_run = tokens[:tokens.index(2)] if 2 in tokens else tokens
    assert "text:\n" + sp.decode(first_run) in out


def test_folders_written_before_the_accounting_still_load(packed_data_dir, tmp_path):
    from pipeline.data.reader import PackedReader

    old = tmp_path / "old"
    shutil.copytree(packed_data_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["stats"] = {"documents_seen": 16, "empty_documents": 1, "empty_document_ids": ["x:7"]}
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert PackedReader(old, "train", sequence_length=16).num_windows > 0
    done = subprocess.run([sys.executable, "-m", "data_prep.inspect", str(old), "--png", str(tmp_path / "h.png")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "before per-reason accounting" in done.stdout, done.stderr


@needs_mpi
def test_a_failing_rank_ends_the_job_with_its_message(messy, tmp_path, data_tokenizer):
    # One rank's own error (--strict meets bad input): that rank's message, exit 2, no hang.
    done = prep(tmp_path / "a", "--inputs", str(messy), *PREP_ARGS, "--strict", "true", ranks=2, check=False)
    assert done.returncode == 2, done.stderr
    assert re.search(r"error: rank [01]: \S+: .*--strict", done.stderr), done.stderr
    # An error every rank reaches together (nothing to write) is printed once.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    done = prep(tmp_path / "b", "--inputs", str(tmp_path / "empty"), "--tokenizer", str(data_tokenizer), ranks=2,
                check=False)
    assert done.returncode == 2 and done.stderr.count("error: no document to write") == 1, done.stderr
    assert "error: rank" not in done.stderr


@needs_mpi
def test_benchmark_runs_and_reports_its_ratio_and_rank_times():
    done = subprocess.run([sys.executable, "bench/bench_data_prep.py", "--mb", "0.3", "--ranks", "1", "2",
                           "--repeats", "1", "--vocab_size", "400"], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"ratio \d+\.\d\d \((PASS|FAIL) >= 0\.8\)", done.stdout)
    assert re.search(r"2 ranks: +\d+\.\d\d s .* output identical", done.stdout)
    assert "projection to 64 ranks" in done.stdout and "Assumes:" in done.stdout
