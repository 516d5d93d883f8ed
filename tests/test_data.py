"""pipeline.data: manifest checks and the packed, deterministic, resumable, rank-sliced reader."""
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data import DataError, Manifest, PackedReader, load_manifest

L, B = 16, 3


def reference_stream(data_dir, split):
    """The split's token stream built the slow, obvious way: documents in manifest order + EOS."""
    m = load_manifest(data_dir)
    out = []
    for s in m.split(split).shards:
        for doc in pa.ipc.open_file(pa.memory_map(str(data_dir / s.file))).read_all().column("tokens").to_pylist():
            out += doc + [m.tokenizer.eos_id]
    return np.array(out, dtype=np.int64)


def reader(data_dir, **kw):
    args = dict(split="train", sequence_length=L, micro_batch_size=B, seed=5, rank=0, world_size=1)
    args.update(kw)
    return PackedReader(data_dir, **args)


@pytest.fixture()
def data_copy(packed_data_dir, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(packed_data_dir, dst)
    return dst


def test_batches_are_shifted_windows_of_the_stream(packed_data_dir):
    r = reader(packed_data_dir)
    stream = reference_stream(packed_data_dir, "train")
    assert r.num_tokens == len(stream) and r.num_windows == len(stream) // (L + 1)
    assert r.vocab_size == 300 and r.eos_id == 2 and r.tokenizer_path.endswith("tokenizer.model")
    assert r.num_samples == r.batches_per_epoch * B and r.samples_dropped == r.num_windows - r.num_samples
    assert len(r._chunks) > len(load_manifest(packed_data_dir).split("train").shards), "want several chunks per shard"
    for _ in range(r.batches_per_epoch):
        batch = r.next_batch()
        assert batch["input_ids"].shape == (B, L) and batch["targets"].shape == (B, L)
        assert batch["input_ids"].dtype == torch.long and batch["sample_index"].dtype == torch.long
        assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
        for row, g in enumerate(batch["sample_index"].tolist()):
            w = r.window_of(g)
            window = stream[w * (L + 1):(w + 1) * (L + 1)]
            assert batch["input_ids"][row].tolist() == window[:-1].tolist()
            assert batch["targets"][row].tolist() == window[1:].tolist()
            assert r.sample_tokens(g).tolist() == window.tolist()
    assert r.sample_documents(int(batch["sample_index"][0]))


def test_order_is_a_function_of_seed_and_epoch(packed_data_dir):
    a, b, c = reader(packed_data_dir), reader(packed_data_dir), reader(packed_data_dir, seed=6)
    epoch0 = [a.next_batch()["input_ids"] for _ in range(a.batches_per_epoch)]
    assert all(torch.equal(x, b.next_batch()["input_ids"]) for x in epoch0)
    assert not all(torch.equal(x, c.next_batch()["input_ids"]) for x in epoch0)
    first = a.next_batch()
    assert a.epoch == 1 and first["sample_index"][0].item() >= a.num_samples
    epoch1 = [first["input_ids"]] + [a.next_batch()["input_ids"] for _ in range(a.batches_per_epoch - 1)]
    assert not all(torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    # Every epoch is a permutation of windows: each used window appears once.
    assert sorted(torch.cat(epoch0)[:, 0].tolist()) != []  # non-empty
    windows0 = [a.window_of(i) for i in range(a.num_samples)]
    assert len(set(windows0)) == a.num_samples


def test_ranks_are_disjoint_and_cover_the_epoch(packed_data_dir):
    world = 2
    readers = [reader(packed_data_dir, rank=r, world_size=world) for r in range(world)]
    assert len({r.batches_per_epoch for r in readers}) == 1 and readers[0].batches_per_epoch > 0
    seen = []
    for r in readers:
        for _ in range(r.batches_per_epoch):
            seen += r.next_batch()["sample_index"].tolist()
    assert sorted(seen) == list(range(readers[0].num_samples))
    single = reader(packed_data_dir, micro_batch_size=B * world)
    assert single.num_samples == readers[0].num_samples
    assert [single.window_of(i) for i in range(single.num_samples)] == \
           [readers[0].window_of(i) for i in range(single.num_samples)]


@pytest.mark.parametrize("stop_after", [1, "epoch_end"])
def test_resume_continues_with_exactly_the_next_batches(packed_data_dir, stop_after):
    full = reader(packed_data_dir, rank=1, world_size=2)
    k = full.batches_per_epoch if stop_after == "epoch_end" else stop_after
    for _ in range(k):
        full.next_batch()
    state = json.loads(json.dumps(full.state_dict()))  # survives serialisation
    expected = [full.next_batch() for _ in range(full.batches_per_epoch + 2)]  # crosses an epoch boundary
    resumed = reader(packed_data_dir, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert resumed.state_dict() == full.state_dict()
    # The state is rank-independent: rank 0 can load rank 1's state.
    other = reader(packed_data_dir, rank=0, world_size=2)
    other.load_state_dict(state)


def test_resume_refuses_a_different_data_config(packed_data_dir):
    state = reader(packed_data_dir).state_dict()
    for kw, field in ((dict(seed=9), "seed"), (dict(sequence_length=L + 1), "sequence_length")):
        with pytest.raises(DataError, match=field):
            reader(packed_data_dir, **kw).load_state_dict(state)


def test_order_at_a_fixed_layout_is_the_interleaved_one(packed_data_dir):
    """Micro-batch k of rank r holds positions (k*B + b)*w + r of the epoch's permutation, every epoch."""
    w = 2
    r = reader(packed_data_dir, rank=1, world_size=w)
    for epoch in (0, 1):
        perm = np.random.default_rng((5, epoch)).permutation(r.num_windows)
        for k in range(r.batches_per_epoch):
            batch = r.next_batch()
            positions = (k * B + np.arange(B)) * w + 1
            assert batch["sample_index"].tolist() == (epoch * r.num_windows + positions).tolist()
            assert [r.window_of(g) for g in batch["sample_index"].tolist()] == perm[positions].tolist()


def _read(readers, batches):
    ids = []
    for _ in range(batches):
        for r in readers:
            ids += r.next_batch()["sample_index"].tolist()
    return ids


@pytest.mark.parametrize("before, after", [((2, 3), (1, 6)), ((1, 6), (2, 3)), ((2, 3), (3, 2)), ((3, 2), (1, 5))])
def test_resume_at_another_layout_reads_every_sample_of_the_epoch_once(packed_data_dir, before, after):
    """(world size, micro batch) changes between checkpoint and resume: the epoch goes on where it was."""
    (w0, b0), (w1, b1) = before, after
    first = [reader(packed_data_dir, rank=r, world_size=w0, micro_batch_size=b0) for r in range(w0)]
    seen = _read(first, 3)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state["consumed"] == 3 * w0 * b0 and all(r.state_dict() == first[0].state_dict() for r in first)
    second = [reader(packed_data_dir, rank=r, world_size=w1, micro_batch_size=b1) for r in range(w1)]
    for r in second:
        r.load_state_dict(state)
    n = second[0].num_windows
    remaining = (n - state["consumed"]) // (w1 * b1)
    seen += _read(second, remaining)
    assert len(seen) == len(set(seen)), "a sample was read twice"
    assert sorted(seen) == list(range(len(seen))), "a sample was skipped"
    assert n - len(seen) < w1 * b1, "only the tail that cannot fill one more micro-batch is dropped"
    assert second[0].epoch == 0
    following = _read(second, 1)  # the next epoch starts from its beginning
    assert second[0].epoch == 1 and sorted(following) == list(range(n, n + w1 * b1))


def test_a_state_of_the_earlier_format_still_loads(packed_data_dir):
    full = reader(packed_data_dir, rank=0, world_size=2)
    for _ in range(4):
        full.next_batch()
    old = {"format": 1, "epoch": 0, "position": 4, "samples_consumed": 4 * B * 2, "split": "train", "seed": 5,
           "sequence_length": L, "micro_batch_size": B, "world_size": 2, "manifest_fingerprint": full.fingerprint}
    resumed = reader(packed_data_dir, rank=0, world_size=2)
    resumed.load_state_dict(old)
    assert torch.equal(resumed.next_batch()["sample_index"], full.next_batch()["sample_index"])


def test_trace_file_lists_the_samples_read(packed_data_dir, tmp_path):
    r = reader(packed_data_dir, trace_file=tmp_path / "trace" / "rank0.jsonl")
    ids = _read([r], 2)
    lines = [json.loads(line) for line in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert [g for line in lines for g in line["samples"]] == ids and lines[0]["epoch"] == 0


@pytest.mark.parametrize("world", [1, 3])
def test_eval_pass_covers_every_target_once(packed_data_dir, world):
    stream = reference_stream(packed_data_dir, "validation")
    readers = [reader(packed_data_dir, split="validation", rank=r, world_size=world, micro_batch_size=2)
               for r in range(world)]
    predicted = {}
    counts = []
    for r in readers:
        batches = list(r.iter_epoch_once())
        counts.append(len(batches))
        for batch in batches:
            assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])
            for row in range(batch["targets"].shape[0]):
                j = batch["sample_index"][row].item()
                mask = batch["loss_mask"][row].bool()
                if j < 0:
                    assert not mask.any()
                    continue
                for t in torch.nonzero(mask).flatten().tolist():
                    pos = j * L + 1 + t
                    assert pos not in predicted
                    predicted[pos] = batch["targets"][row, t].item()
                    assert batch["input_ids"][row, t].item() == stream[pos - 1]
    assert len(set(counts)) == 1, "every rank must run the same number of eval batches"
    assert sorted(predicted) == list(range(1, len(stream)))
    assert all(predicted[p] == stream[p] for p in predicted)
    assert readers[0].epoch == 0 and readers[0].consumed == 0


def test_corrupted_shard_is_refused_naming_the_file(data_copy):
    shard = data_copy / load_manifest(data_copy).split("train").shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(shard)) + ".*sha256"):
        reader(data_copy)
    reader(data_copy, split="validation")  # the other split is fine
    shard.write_bytes(bytes(data[:-10]))  # size is checked even without checksums
    with pytest.raises(DataError, match=re.escape(str(shard)) + ".*size"):
        reader(data_copy, verify_checksums=False)


def test_tokenizer_mismatch_is_refused(data_copy):
    good = load_manifest(data_copy).tokenizer.sha256
    reader(data_copy, expected_tokenizer_sha256=good)
    with pytest.raises(DataError, match="tokenizer"):
        reader(data_copy, expected_tokenizer_sha256="0" * 64)
    # The shards remember their tokenizer: a manifest pointing at another tokenizer is refused by file.
    raw = json.loads((data_copy / "manifest.json").read_text())
    raw["tokenizer"]["sha256"] = "f" * 64
    (data_copy / "manifest.json").write_text(json.dumps(raw))
    (data_copy / "tokenizer.model").unlink()
    first = data_copy / raw["splits"]["train"]["shards"][0]["file"]
    with pytest.raises(DataError, match=re.escape(str(first)) + ".*tokenizer"):
        reader(data_copy)


def test_replaced_tokenizer_file_is_refused(data_copy):
    (data_copy / "tokenizer.model").write_bytes(b"not the tokenizer")
    with pytest.raises(DataError, match="tokenizer.model.*does not match"):
        reader(data_copy)


def test_manifest_validation_and_round_trip(packed_data_dir, tmp_path):
    raw = json.loads((packed_data_dir / "manifest.json").read_text())
    raw["blends"] = {"future": True}
    m = Manifest.from_dict(raw)
    assert m.to_dict()["blends"] == {"future": True}
    assert m.to_dict()["splits"] == raw["splits"]
    with pytest.raises(DataError, match="format 2"):
        Manifest.from_dict({**raw, "format": 2})
    bad = json.loads(json.dumps(raw))
    bad["splits"]["train"]["shards"][0]["file"] = "../escape.arrow"
    with pytest.raises(DataError, match="inside the data folder"):
        Manifest.from_dict(bad)
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(tmp_path)
    with pytest.raises(DataError, match="no split 'test'"):
        reader(packed_data_dir, split="test")


def test_too_little_data_is_a_clear_error(packed_data_dir):
    r = reader(packed_data_dir, split="validation", sequence_length=4096)
    with pytest.raises(DataError, match="samples"):
        r.next_batch()
