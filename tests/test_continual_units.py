"""Continual learning, in one process: config, task plan, LR schedule, blending, the document-range reader,
the replay reservoir, the stream's rank layout, EWC's Fisher, the task matrix and its metrics."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from continual_corpora import prepare_languages
from pipeline.config import ConfigError, ContinualConfig, TaskSpec, TrainConfig
from pipeline.continual.ewc import EWC, fisher_diagonal
from pipeline.continual.matrix import TaskMatrix, transfer_metrics
from pipeline.continual.replay import ReplayBuffer
from pipeline.continual.schedule import TaskSchedule, plan_tasks
from pipeline.engine.lr import lr_multiplier
from pipeline.continual.stream import TaskStream, blend_ids
from pipeline.data import DataError, PackedReader, load_manifest
from pipeline.data.blend import SourceKey, SourcePool, WeightedRoundRobin
from pipeline.run_config import parse_run_config

ROOT = Path(__file__).resolve().parent.parent
L = 16


@pytest.fixture(scope="module")
def languages(tmp_path_factory):
    return prepare_languages(tmp_path_factory.mktemp("languages"), names=("alpha", "beta", "gamma"), documents=60)


def tasks_arg(*specs: str) -> list[str]:
    return ["--continual.tasks", "[" + ", ".join(specs) + "]"]


# ---- config ----------------------------------------------------------------------------------

def test_continual_section_parses_from_yaml(tmp_path):
    preset = tmp_path / "cl.yaml"
    preset.write_text("continual:\n  tasks:\n    - {name: code, data_dir: data/code, steps: 20}\n"
                      "    - {name: prose, data_dirs: [a, b], weights: [0.7, 0.3], tokens: 5000, lr: 3.0e-4}\n"
                      "  rewarm_steps: 5\n  replay_ratio: 0.25\n  ewc_lambda: 2.0\n  ewc_gamma: 0.9\n"
                      "train:\n  max_steps: 0\n")
    cfg = parse_run_config(["--config", str(ROOT / "launch/presets/tiny.yaml"), "--config", str(preset)])
    c = cfg.continual
    assert c.enabled and [t.name for t in c.tasks] == ["code", "prose"]
    assert c.tasks[1].weights == [0.7, 0.3] and c.tasks[1].tokens == 5000 and c.tasks[1].lr == 3e-4
    assert (c.rewarm_steps, c.replay_ratio, c.ewc_lambda, c.ewc_gamma) == (5, 0.25, 2.0, 0.9)
    assert cfg.to_dict()["continual"]["tasks"][0]["data_dir"] == "data/code"
    assert not parse_run_config([]).continual.enabled


@pytest.mark.parametrize("args, field", [
    (tasks_arg("{name: a, data_dir: x, steps: 3}", "{name: b, data_dir: y}"), r"continual\.tasks\[1\]\.steps"),
    (tasks_arg("{name: a, data_dir: x, steps: 3, tokens: 9}"), r"continual\.tasks\[0\]\.steps"),
    (tasks_arg("{name: a, data_dir: x, data_dirs: [y], steps: 3}"), r"continual\.tasks\[0\]\.data_dir"),
    (tasks_arg("{name: a, steps: 3}"), r"continual\.tasks\[0\]\.data_dir"),
    (tasks_arg("{name: a, data_dirs: [x, y], weights: [1], steps: 3}"), r"continual\.tasks\[0\]\.weights"),
    (tasks_arg("{name: a, data_dirs: [x, y], weights: [1, 0], steps: 3}"), r"continual\.tasks\[0\]\.weights"),
    (tasks_arg("{name: a, data_dir: x, steps: 3}", "{name: a, data_dir: y, steps: 3}"), r"continual\.tasks\[1\]\.name"),
    (tasks_arg("{name: init, data_dir: x, steps: 3}"), r"continual\.tasks\[0\]\.name"),
    (tasks_arg("{name: a, data_dir: x, steps: 3, lr: 0}"), r"continual\.tasks\[0\]\.lr"),
    (["--continual.num_tasks", "1"], r"continual\.num_tasks"),
    (tasks_arg("{name: a, data_dir: x, steps: 3}") + ["--continual.num_tasks", "2"], r"continual\.num_tasks"),
    (["--continual.num_tasks", "3", "--train.max_steps", "2"], r"train\.max_steps"),
    (["--continual.replay_ratio", "1.0"], r"continual\.replay_ratio"),
    (["--continual.ewc_gamma", "1.5"], r"continual\.ewc_gamma"),
    (["--continual.ewc_lambda", "-1"], r"continual\.ewc_lambda"),
    (["--train.max_steps", "0"], r"train\.max_steps"),  # without a schedule, 0 steps is no run
])
def test_invalid_continual_settings_name_the_field(args, field):
    with pytest.raises(ConfigError, match=field):
        parse_run_config(args)


def plan(languages, tasks, max_steps=0, micro_batch=4, accumulation=1, world=2, **continual):
    cfg = ContinualConfig(tasks=[TaskSpec(**t) for t in tasks], **continual)
    train = TrainConfig(max_steps=max_steps, lr=0.01, warmup_steps=5)
    return plan_tasks(cfg, train, str(languages["alpha"]), L, micro_batch, accumulation, world)


def test_plan_steps_tokens_lr_and_rewarm(languages):
    a, b = str(languages["alpha"]), str(languages["beta"])
    tasks = plan(languages, [dict(name="a", data_dir=a, steps=3), dict(name="b", data_dir=b, tokens=1000, lr=0.002)],
                 replay_ratio=0.25)
    assert [(t.start, t.steps, t.end) for t in tasks] == [(0, 3, 3), (3, 11, 14)]  # 1000 / ((4-1)*2*16) -> 11
    assert [t.replay_per_micro_batch for t in tasks] == [0, 1]
    assert [t.lr for t in tasks] == [0.01, 0.002] and [t.rewarm for t in tasks] == [3, 5]  # capped at the length
    assert plan(languages, [dict(name="a", data_dir=a, steps=3)], max_steps=3)[0].steps == 3
    with pytest.raises(ConfigError, match=r"train\.max_steps \(5\) must be 0 or the sum .* = 3"):
        plan(languages, [dict(name="a", data_dir=a, steps=3)], max_steps=5)
    with pytest.raises(ConfigError, match="continual.replay_ratio=0.1 .* rounds to 0"):
        plan(languages, [dict(name="a", data_dir=a, steps=3)], replay_ratio=0.1)
    with pytest.raises(DataError, match="-missing/manifest.json: no manifest"):
        SourcePool(L, 0).check_one_tokenizer([a, a + "-missing"])


def test_num_tasks_splits_one_folder_by_document_ranges(languages):
    tasks = plan(languages, [], max_steps=10, num_tasks=3)
    assert [t.name for t in tasks] == ["part1", "part2", "part3"] and [t.steps for t in tasks] == [4, 3, 3]
    manifest = load_manifest(languages["alpha"])
    for split, attr in (("train", "documents"), ("validation", "val_documents")):
        ranges = [getattr(t.sources[0], attr) for t in tasks]
        assert ranges[0][0] == 0 and ranges[-1][1] == manifest.split(split).documents
        assert all(r[1] == n[0] for r, n in zip(ranges, ranges[1:])), "contiguous, no gap, no overlap"
    with pytest.raises(DataError, match="too few to split"):
        plan(languages, [], max_steps=1000, num_tasks=500)


def test_the_tasks_must_share_one_tokenizer(languages, packed_data_dir):
    pool = SourcePool(L, 0)
    with pytest.raises(DataError, match=re.escape(str(packed_data_dir)) + ".*different tokenizers|"
                                        "different tokenizers.*" + re.escape(str(packed_data_dir))):
        pool.check_one_tokenizer([str(languages["alpha"]), str(languages["beta"]), str(packed_data_dir)])
    pool.check_one_tokenizer([str(languages["alpha"]), str(languages["beta"])])


# ---- LR schedule and boundary hooks -----------------------------------------------------------

def test_lr_rewarms_at_every_task_and_never_starts_at_zero(languages):
    a, b = str(languages["alpha"]), str(languages["beta"])
    tasks = plan(languages, [dict(name="a", data_dir=a, steps=10), dict(name="b", data_dir=b, steps=10, lr=0.005)],
                 rewarm_steps=4)
    f = lr_multiplier(tasks, base_lr=0.01, min_lr_ratio=0.1)
    lrs = [0.01 * f(s) for s in range(20)]
    assert lrs[0] == pytest.approx(0.01 / 4) and lrs[3] == pytest.approx(0.01)  # warm-up to the peak
    assert lrs[9] < lrs[4] and lrs[9] >= 0.001  # cosine towards lr * min_lr_ratio
    assert lrs[10] == pytest.approx(0.005 / 4) and lrs[13] == pytest.approx(0.005)  # re-warm to the task's lr
    assert min(lrs) > 0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    from pipeline.engine.lr import build_lr_scheduler

    scheduler = build_lr_scheduler(TrainConfig(lr=0.01, min_lr_ratio=0.1), tasks)(optimizer)
    assert scheduler.get_last_lr()[0] == pytest.approx(lrs[0])  # the first step trains at lr/rewarm
    assert "lr_lambdas" not in scheduler.state_dict() or scheduler.state_dict()["lr_lambdas"] == [None]


def test_the_lr_follows_task_boundaries_through_steps_the_fp16_scaler_skipped(languages):
    """DeepSpeed steps its scheduler only for applied updates; tasks switch on global_steps, which counts
    skipped ones. With overflows at steps 2 and 3, task b must still re-warm from its own first step."""
    from pipeline.engine.lr import build_lr_scheduler

    a, b = str(languages["alpha"]), str(languages["beta"])
    tasks = plan(languages, [dict(name="a", data_dir=a, steps=6), dict(name="b", data_dir=b, steps=6, lr=0.005)],
                 rewarm_steps=3)
    f = lr_multiplier(tasks, base_lr=0.01, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = build_lr_scheduler(TrainConfig(lr=0.01, min_lr_ratio=0.1), tasks)(optimizer)
    trained_with = []
    for step in range(1, 13):  # the update that makes `step`
        trained_with.append(scheduler.get_last_lr()[0])
        if step not in (2, 3):  # DeepSpeed: an overflow leaves the scheduler where it was
            scheduler.step()
        scheduler.catch_up(step)  # what the continual callback does after every step
    assert trained_with == pytest.approx([0.01 * f(step - 1) for step in range(1, 13)])
    assert trained_with[6] == pytest.approx(0.005 / 3), "task b's first update is its re-warm's first"


def test_a_new_task_starts_a_new_loss_spike_baseline(tmp_path):
    from pipeline.config import StabilityConfig
    from pipeline.engine.stability import BatchGuard

    class Windows:
        def window_of(self, sample):
            return sample

        def sample_documents(self, sample):
            return [f"doc{sample}"]

    guard = BatchGuard(StabilityConfig(skip_loss_spikes=True, spike_window=4, spike_factor=2.0,
                                       max_consecutive_skips=0), tmp_path, Windows())
    check = lambda loss, sample: guard.check(torch.tensor(loss), torch.tensor([sample]), 1, 0)
    for sample in range(4):
        assert check(1.0, sample) is None
    assert check(5.0, 4) == "spike", "within a task, a jump is a spike"
    guard.on_task_start(None)
    assert [check(5.0, s) for s in range(10, 15)] == [None] * 5, "the new domain's normal loss is not a spike"


class Recorder:
    def __init__(self, events):
        self.events = events

    def on_task_start(self, task):
        self.events.append(("start", task.name))

    def on_task_end(self, task):
        self.events.append(("end", task.name))


def test_boundary_hooks_fire_once_in_order_and_resume_without_refiring(languages):
    a = str(languages["alpha"])
    tasks = plan(languages, [dict(name=n, data_dir=a, steps=2) for n in "xyz"])
    events = []
    schedule = TaskSchedule(tasks)
    schedule.subscribe(Recorder(events))
    schedule.begin()
    for step in range(1, 4):
        schedule.after_step(step)
    assert events == [("start", "x"), ("end", "x"), ("start", "y")] and schedule.current.name == "y"
    state = schedule.state_dict()
    events2 = []
    resumed = TaskSchedule(tasks)
    resumed.subscribe(Recorder(events2))
    resumed.load_state_dict(state)
    resumed.begin()  # a resumed run: no second start of the first task
    for step in range(4, 7):
        resumed.after_step(step)
    assert events2 == [("end", "y"), ("start", "z"), ("end", "z")]
    assert [resumed.task_for_step(s).name for s in (0, 1, 2, 3, 6)] == ["x", "x", "x", "y", "z"]
    other = TaskSchedule(plan(languages, [dict(name=n, data_dir=a, steps=3) for n in "xyz"]))
    with pytest.raises(ConfigError, match="task plan"):
        other.load_state_dict(state)


# ---- blending and sources ---------------------------------------------------------------------

def test_weighted_round_robin_is_exact_and_deterministic():
    robin = WeightedRoundRobin([0.7, 0.3])
    entries, counts = robin.assign(np.zeros(2, dtype=np.int64), 10_000)
    assert counts.tolist() == [7000, 3000] and np.bincount(entries).tolist() == [7000, 3000]
    for prefix in (10, 333, 4321):  # every prefix within one sample of its share
        share = np.bincount(entries[:prefix], minlength=2) / prefix
        assert abs(share[0] - 0.7) * prefix <= 1
    # Assigning in chunks (micro-steps) gives the same sequence as in one go.
    chunks, c = [], np.zeros(2, dtype=np.int64)
    for n in (8, 8, 3, 981):
        e, c = robin.assign(c, n)
        chunks.append(e)
    assert np.concatenate(chunks).tolist() == entries[:1000].tolist()
    three = WeightedRoundRobin([5, 3, 2]).assign(np.zeros(3, dtype=np.int64), 10_000)[1]
    assert np.abs(three / 10_000 - [0.5, 0.3, 0.2]).max() < 0.01


def test_source_ids_encode_the_folder_and_read_the_right_tokens(languages):
    pool = SourcePool(L, 7)
    a = pool.add(SourceKey(str(languages["alpha"])))
    b = pool.add(SourceKey(str(languages["beta"])))
    assert (a, b) == (1, 2) and pool.add(SourceKey(str(languages["beta"]))) == b  # opened once
    consumed = {a: 0, b: 0}
    ids, counts = blend_ids(pool, [a, b], WeightedRoundRobin([1, 3]), np.zeros(2, dtype=np.int64), consumed, 40)
    assert consumed == {a: 10, b: 30} and len(set(ids.tolist())) == 40
    codes, ns = pool.decode(ids)
    plain = {a: PackedReader(languages["alpha"], sequence_length=L, seed=7),
             b: PackedReader(languages["beta"], sequence_length=L, seed=7)}
    tokens = pool.read(ids)
    for row, (code, n) in enumerate(zip(codes.tolist(), ns.tolist())):
        assert tokens[row].tolist() == plain[code].sample_tokens(n).tolist()
        assert pool.window_of(int(ids[row])) >> 40 == code
    docs = pool.sample_documents(int(ids[0]))
    assert docs and all(d.startswith(str(languages[{1: "alpha", 2: "beta"}[int(codes[0])]])) for d in docs)


def test_document_range_reader_reads_exactly_its_documents(languages):
    full = PackedReader(languages["alpha"], sequence_length=L, seed=0)
    part = PackedReader(languages["alpha"], sequence_length=L, seed=0, documents=(3, 9))
    assert part.num_documents == 6 and part.fingerprint != full.fingerprint
    start, end = full._doc_start[3], full._doc_start[9]
    assert part.num_tokens == end - start
    assert part.read_stream(np.array([0]), part.num_tokens)[0].tolist() == \
        full.read_stream(np.array([start]), end - start)[0].tolist()
    names = {d for s in range(part.num_windows) for d in part.sample_documents(s)}
    first = {d for s in range(full.num_windows) if full.window_of(s) * (L + 1) < start
             for d in full.sample_documents(s)}
    assert names and len(names) <= 6 and not (names & (first - names))
    with pytest.raises(DataError, match=r"document range \[5, 99\)"):
        PackedReader(languages["alpha"], sequence_length=L, documents=(5, 99))
    with pytest.raises(DataError, match="different data config"):
        part.load_state_dict(full.state_dict())


# ---- replay -----------------------------------------------------------------------------------

def test_reservoir_is_uniform_identical_and_resumable():
    picks = np.zeros(1000)
    for seed in range(200):
        buffer = ReplayBuffer(50, seed)
        for chunk in np.split(np.arange(1000), 25):
            buffer.observe(chunk)
        buffer.on_task_end(None)
        picks[buffer.ids] += 1
    # Uniform: every tenth of the stream gets a tenth of the slots (200 buffers x 50 = 10000 slots).
    tenths = picks.reshape(10, 100).sum(1)
    assert np.abs(tenths - 1000).max() < 150, tenths
    a, b = ReplayBuffer(50, 1), ReplayBuffer(50, 1)
    for chunk in np.split(np.arange(600), 6):
        a.observe(chunk)
        b.observe(chunk)
    assert a.pending.tolist() == b.pending.tolist()
    c = ReplayBuffer(50, 1)
    c.load_state_dict(a.state_dict())
    a.observe(np.arange(600, 700)); c.observe(np.arange(600, 700))
    assert a.pending.tolist() == c.pending.tolist()


def test_merge_keeps_tasks_in_proportion_and_purge_drops_quarantined():
    buffer = ReplayBuffer(100, 0)
    buffer.observe(np.arange(0, 300))  # task 1: 300 samples
    buffer.on_task_end(None)
    buffer.observe(np.arange(1000, 1100))  # task 2: 100 samples
    buffer.on_task_end(None)
    assert len(buffer) == 100 and buffer.seen == 400
    from_first = int((buffer.ids < 1000).sum())
    assert 60 <= from_first <= 90  # hypergeometric around 75
    bad = set(buffer.ids[:5].tolist())
    dropped = buffer.purge(bad, lambda ids: ids)  # identity "windows"
    assert dropped == 5 and not bad & set(buffer.ids.tolist())
    assert buffer.purge(bad, lambda ids: ids) == 0  # the quarantine did not grow: nothing to do
    draws = buffer.draw(7, np.random.default_rng(0))
    assert len(draws) == 7 and set(draws.tolist()) <= set(buffer.ids.tolist())


def make_streams(languages, replay_ratio=0.5, world=2, micro_batch=4, quarantine=()):
    a, b = str(languages["alpha"]), str(languages["beta"])
    tasks = plan(languages, [dict(name="a", data_dir=a, steps=4), dict(name="b", data_dirs=[b, a], weights=[3, 1],
                                                                     steps=4)],
                 micro_batch=micro_batch, world=world, replay_ratio=replay_ratio)
    streams = []
    for rank in range(world):
        pool = SourcePool(L, 3)
        stream = TaskStream(pool, tasks, ReplayBuffer(64, 3), micro_batch, rank, world, seed=3)
        stream.attach_quarantine(set(quarantine))
        schedule = TaskSchedule(tasks)
        for listener in (stream.replay, stream):
            schedule.subscribe(listener)
        schedule.begin()
        streams.append((stream, schedule))
    return streams


def run_steps(streams, first, last):
    out = {rank: [] for rank in range(len(streams))}
    for step in range(first, last + 1):
        for rank, (stream, schedule) in enumerate(streams):
            out[rank].append(stream.next_batch())
            stream.end_step()
            schedule.after_step(step)
    return out


def test_stream_ranks_share_the_task_order_and_replay_differently(languages):
    streams = make_streams(languages)
    batches = run_steps(streams, 1, 8)
    (s0, _), (s1, _) = streams
    # Task 1: the ranks interleave the first 4 x 4 x 2 samples of alpha, nothing replayed.
    ids = [b["sample_index"] for r in (0, 1) for b in batches[r][:4]]
    assert sorted(torch.cat(ids).tolist()) == SourcePool.encode(1, np.arange(32)).tolist()
    # Task 2: 2 fresh (beta 3 : alpha 1, alpha continuing after its 32) + 2 replayed per micro-batch.
    fresh = torch.cat([b["sample_index"][:2] for r in (0, 1) for b in batches[r][4:]])
    codes, ns = SourcePool.decode(fresh.numpy())
    assert np.bincount(codes, minlength=3)[1:].tolist() == [4, 12] and ns[codes == 1].min() == 32
    replayed = [b["sample_index"][2:] for b in batches[0][4:]] + [b["sample_index"][2:] for b in batches[1][4:]]
    first_task = set(SourcePool.encode(1, np.arange(32)).tolist())
    assert all(set(r.tolist()) <= first_task for r in replayed)
    assert not all(torch.equal(x, y) for x, y in zip(replayed[:4], replayed[4:])), "ranks draw different samples"
    assert s0.replay.ids.tolist() == s1.replay.ids.tolist(), "every rank holds the same reservoir"
    assert len(s0.replay) == 32 + 16 and s0.replay.seen == 48  # after task 2 ended: both tasks' samples


def test_stream_resumes_exactly_and_never_replays_quarantined(languages):
    reference = run_steps(make_streams(languages, world=1), 1, 8)[0]
    resumed = make_streams(languages, world=1)
    run_steps(resumed, 1, 6)
    stream, schedule = resumed[0]
    states = (stream.state_dict(), stream.replay.state_dict(), schedule.state_dict())
    fresh = make_streams(languages, world=1)
    fresh[0][0].load_state_dict(states[0]); fresh[0][0].replay.load_state_dict(states[1])
    fresh[0][1].load_state_dict(states[2])
    tail = run_steps(fresh, 7, 8)[0]
    for want, got in zip(reference[6:], tail):
        assert torch.equal(want["sample_index"], got["sample_index"])
        assert torch.equal(want["input_ids"], got["input_ids"])
    # Quarantine three windows of task 1: they leave the reservoir and are never drawn.
    pool = stream.pool
    bad = {pool.window_of(int(i)) for i in SourcePool.encode(1, np.arange(3))}
    guarded = make_streams(languages, world=1, quarantine=bad)
    batches = run_steps(guarded, 1, 8)[0]
    replayed = torch.cat([b["sample_index"][2:] for b in batches[4:]]).tolist()
    assert not {pool.window_of(i) for i in replayed} & bad
    assert not {pool.window_of(int(i)) for i in guarded[0][0].replay.ids} & bad


# ---- EWC ----------------------------------------------------------------------------------------

class TinyLM(torch.nn.Module):
    def __init__(self, vocab=11, width=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_fisher_is_the_mean_of_per_sample_squared_gradients():
    torch.manual_seed(0)
    model = TinyLM()
    batches = [{"input_ids": torch.randint(0, 11, (3, 5)), "targets": torch.randint(0, 11, (3, 5)),
                "sample_index": torch.arange(3) + 3 * k} for k in range(2)]
    params = list(model.parameters())
    sums, used, left_out = fisher_diagonal(model, params, batches, "cpu", skip_sample=lambda s: s == 4)
    assert (used, left_out) == (5, 1)
    expected = [torch.zeros_like(p) for p in params]
    for batch in batches:
        for b in range(3):
            if int(batch["sample_index"][b]) == 4:
                continue
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(batch["input_ids"][b:b + 1])[0], batch["targets"][b])
            loss.backward()
            for e, p in zip(expected, params):
                e += p.grad.square()
    for s, e in zip(sums, expected):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-7)
    assert all(p.grad is not None for p in params)  # our own backward above; fisher_diagonal sets none
    # A scaled loss (fp16 path) gives the same Fisher once unscaled.
    scaled, _, _ = fisher_diagonal(model, params, batches, "cpu", loss_scale=1024.0, skip_sample=lambda s: s == 4)
    for s, e in zip(scaled, expected):
        torch.testing.assert_close(s, e, rtol=1e-4, atol=1e-7)


def test_ewc_penalty_is_zero_at_the_anchor_normalised_and_decays_online():
    torch.manual_seed(0)
    model = TinyLM()
    def batches(task, count):
        return [{"input_ids": torch.randint(0, 11, (4, 5)), "targets": torch.randint(0, 11, (4, 5)),
                 "sample_index": torch.arange(4)}]
    engine = type("Engine", (), {"module": model, "device": torch.device("cpu"), "optimizer": None})()
    ewc = EWC(strength=2.0, gamma=0.5, fisher_batches=1, batches_for=batches, num_tasks=3)
    ewc.attach(engine)
    assert ewc.penalty() is None
    task = type("T", (), {"index": 0, "name": "a"})()
    ewc.on_task_end(task)
    mean = torch.cat([f.flatten() for f in ewc.fisher]).mean()
    assert float(mean) == pytest.approx(1.0, rel=1e-5)
    assert float(ewc.penalty().detach()) == 0.0  # no jump at the boundary
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = 0.5 * 2.0 * sum(float((f * 0.01).sum()) for f in ewc.fisher)
    assert float(ewc.penalty().detach()) == pytest.approx(expected, rel=1e-4)
    first = [f.clone() for f in ewc.fisher]
    task.index = 1
    ewc.on_task_end(task)
    new_mean = torch.cat([f.flatten() for f in ewc.fisher]).mean()
    assert float(new_mean) == pytest.approx(0.5 * 1.0 + 1.0, rel=1e-5)  # gamma * F + F_new, each of mean 1
    assert not all(torch.equal(a, b) for a, b in zip(first, ewc.fisher))
    state = ewc.state_dict()
    other = EWC(2.0, 0.5, 1, batches, 3)
    other.attach(engine)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.fisher, ewc.fisher)) and other.tasks == 2
    task.index = 2  # the last task: nothing left to protect it from
    ewc.on_task_end(task)
    assert ewc.tasks == 2


# ---- task matrix -------------------------------------------------------------------------------

def test_forgetting_bwt_fwt_follow_the_stated_definitions():
    R = [[5.0, 5.0, 5.0],   # before training
         [2.0, 4.5, 5.2],   # after task 1
         [2.6, 2.0, 4.0],   # after task 2
         [3.0, 2.5, 1.5]]   # after task 3
    m = transfer_metrics(R, 3)
    assert m["forgetting"][:2] == pytest.approx([1.0, 0.5]) and m["forgetting"][2] is None
    assert m["bwt"] == pytest.approx(((2.0 - 3.0) + (2.0 - 2.5)) / 2)  # < 0: forgetting
    assert m["fwt"] == pytest.approx(((5.0 - 4.5) + (5.0 - 4.0)) / 2)  # > 0: earlier tasks helped
    assert m["mean_seen_loss"] == pytest.approx((3.0 + 2.5 + 1.5) / 3)
    partial = transfer_metrics(R[:2], 3)
    assert partial["forgetting"] == [None, None, None] and partial["bwt"] is None
    assert partial["fwt"] == pytest.approx(0.5)


def test_matrix_files_and_records(tmp_path):
    records = []

    class Sink:
        def write(self, kind, step, values):
            records.append({"kind": kind, "step": step, **values})

    losses = iter([5.0, 5.1, 2.0, 4.0, 3.0, 2.2])
    matrix = TaskMatrix(["code", "prose"], tmp_path, 0,
                        lambda j: {"loss": (v := next(losses)), "perplexity": math.exp(v), "accuracy": 0.1,
                                   "tokens": 10})
    matrix.metrics = Sink()
    matrix.evaluate_row("init", 0)
    matrix.on_task_end(type("T", (), {"name": "code", "end": 10})())
    matrix.on_task_end(type("T", (), {"name": "prose", "end": 20})())
    data = json.loads((tmp_path / "task_matrix.json").read_text())
    assert data["tasks"] == ["code", "prose"] and data["rows"] == ["init", "code", "prose"]
    assert data["loss"] == [[5.0, 5.1], [2.0, 4.0], [3.0, 2.2]] and data["matrix"] == data["loss"]
    assert data["perplexity"][1][0] == pytest.approx(math.exp(2.0))
    assert data["forgetting"] == [pytest.approx(1.0), None] and data["bwt"] == pytest.approx(-1.0)
    assert data["fwt"] == pytest.approx(5.1 - 4.0) and data["steps"] == [0, 10, 20]
    assert (tmp_path / "task_matrix.csv").read_text().splitlines()[2] == "code,10,2.000000,4.000000"
    assert (tmp_path / "task_matrix.png").stat().st_size > 1000
    evals = [r for r in records if r["kind"] == "task_eval"]
    assert len(evals) == 6 and {"after_task", "task", "loss", "perplexity"} <= set(evals[0])
    assert [(r["after_task"], r["task"]) for r in evals[2:4]] == [("code", "code"), ("code", "prose")]
    restored = TaskMatrix(["code", "prose"], tmp_path, 1, None)
    restored.load_state_dict(matrix.state_dict())
    assert restored.to_dict() == matrix.to_dict()


# ---- the old trainer's options -----------------------------------------------------------------

OLD_FLAGS = {  # old flag -> the new key (or keys) the README's migration table must name
    "--continual-learning": "continual.tasks",
    "--num-tasks": "continual.num_tasks",
    "--consolidation-strength": "continual.ewc_lambda",
    "--use-replay": "continual.replay_ratio",
    "--replay-buffer-size": "continual.replay_buffer_size",
    "--replay-strategy": "continual.replay_buffer_size",
}


def test_every_old_continual_flag_has_a_key_and_a_migration_row():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    for flag, key in OLD_FLAGS.items():
        row = next((r for r in rows if r.startswith(f"| `{flag}`")), None)
        assert row is not None, f"README has no migration row for {flag}"
        assert f"`{key}" in row, (flag, row)
        section, field = key.split(".")
        assert field in ContinualConfig.__dataclass_fields__, key
    # The keys the rows name are real: a run config with all of them parses.
    cfg = parse_run_config(["--continual.num_tasks", "4", "--continual.ewc_lambda", "1000",
                            "--continual.replay_ratio", "0.25", "--continual.replay_buffer_size", "1000"])
    assert (cfg.continual.num_tasks, cfg.continual.ewc_lambda, cfg.continual.replay_buffer_size) == (4, 1000, 1000)


def test_stream_traces_the_samples_it_reads(languages, tmp_path):
    a = str(languages["alpha"])
    tasks = plan(languages, [dict(name="a", data_dir=a, steps=2)], world=1)
    stream = TaskStream(SourcePool(L, 0), tasks, ReplayBuffer(8, 0), 4, 0, 1, seed=0,
                        trace_file=tmp_path / "samples" / "rank0.jsonl")
    batches = [stream.next_batch() for _ in range(3)]
    lines = [json.loads(line) for line in (tmp_path / "samples" / "rank0.jsonl").read_text().splitlines()]
    assert [line["samples"] for line in lines] == [b["sample_index"].tolist() for b in batches]
    assert {line["task"] for line in lines} == {"a"} and all(line["replayed"] == 0 for line in lines)


def test_ewc_reduces_its_fisher_on_the_process_groups_device(monkeypatch, tmp_path):
    """Under NCCL the Fisher's all-reduce must run on the accelerator (tests/fake_accelerator.py)."""
    from fake_accelerator import strict_collectives

    torch.manual_seed(0)
    model = TinyLM()
    def batches(task, count):
        return [{"input_ids": torch.randint(0, 11, (2, 5)), "targets": torch.randint(0, 11, (2, 5)),
                 "sample_index": torch.arange(2)}]
    engine = type("Engine", (), {"module": model, "device": torch.device("cpu"), "optimizer": None})()
    reference = EWC(1.0, 1.0, 1, batches, 2)
    reference.attach(engine)
    task = type("T", (), {"index": 0, "name": "a"})()
    torch.manual_seed(1)
    reference.on_task_end(task)
    with strict_collectives(monkeypatch, tmp_path):
        ewc = EWC(1.0, 1.0, 1, batches, 2)
        ewc.attach(engine)
        torch.manual_seed(1)
        ewc.on_task_end(task)
    assert all(torch.equal(a, b) for a, b in zip(ewc.fisher, reference.fisher))
    assert all(f.device.type == "cpu" for f in ewc.fisher)  # handed back where the engine keeps them
