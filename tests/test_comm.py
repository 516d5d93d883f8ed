"""Every collective is device-correct: it communicates on the process group's device, whatever the caller holds.

Under NCCL a CPU tensor in a collective is a crash (`No backend type associated with device type cpu`);
gloo accepts it, so these tests run the communicating components under a 1-process group whose
collectives refuse any tensor that is not on the device the helper reports (tests/fake_accelerator.py).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import comm
from pipeline.config import StabilityConfig
from pipeline.data import PackedReader
from pipeline.engine.evaluation import evaluate
from pipeline.engine.stability import BatchGuard, LossScaleWatch
from fake_accelerator import DEVICE, OnAccelerator, strict_collectives

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nccl_like(monkeypatch, tmp_path):
    with strict_collectives(monkeypatch, tmp_path) as device:
        yield device


def test_the_fake_group_refuses_what_nccl_refuses(nccl_like):
    import torch.distributed as dist

    assert comm.device() == DEVICE
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.ones(3))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ones(3).to(DEVICE) + torch.ones(3)


def test_helper_communicates_on_the_group_device_and_returns_where_asked(nccl_like):
    x = torch.arange(4.0)
    summed = comm.all_reduce(x)
    assert summed.device.type == "cpu" and summed.tolist() == [0.0, 1.0, 2.0, 3.0]
    on_device = comm.all_reduce(x, out_device=DEVICE)
    assert isinstance(on_device, OnAccelerator)
    gathered = comm.all_gather(torch.tensor([7, 8]), out_device="cpu")
    assert gathered.shape == (1, 2) and gathered.tolist() == [[7, 8]]
    assert comm.broadcast(torch.tensor([5.0])).tolist() == [5.0]
    assert comm.any_rank(True) and not comm.any_rank(False)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]  # the caller's tensor is untouched


def test_device_follows_the_backend(monkeypatch, tmp_path):
    import torch.distributed as dist

    assert comm.device() == torch.device("cpu")  # no process group: a group of one on the host
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert comm.device() == torch.device("cpu")
        from deepspeed.accelerator import get_accelerator

        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(type(get_accelerator()), "current_device_name", lambda self: "cuda:3")
        assert comm.device() == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()


def test_guard_skips_a_nan_batch_with_the_loss_on_the_accelerator(nccl_like, packed_data_dir, tmp_path):
    """The reader's sample ids are CPU tensors while the loss is on the accelerator (the GPU crash of issue 7)."""
    reader = PackedReader(packed_data_dir, split="train", sequence_length=16, micro_batch_size=2)
    guard = BatchGuard(StabilityConfig(), tmp_path, reader)
    batch = reader.next_batch()
    assert batch["sample_index"].device.type == "cpu"
    assert guard.check(torch.tensor(2.5).to(DEVICE), batch["sample_index"], step=1, attempt=0) is None
    batch = reader.next_batch()
    assert guard.check(torch.tensor(float("nan")).to(DEVICE), batch["sample_index"], step=1, attempt=1) == "nan"
    records = [json.loads(line) for line in guard.path.read_text().splitlines()]
    assert [r["reason"] for r in records] == ["nan"]
    assert records[0]["samples"] == batch["sample_index"].tolist()
    assert guard.counts["nan"] == 1 and guard.accepted == 1


def test_guard_quarantine_and_spikes_on_the_accelerator(nccl_like, packed_data_dir, tmp_path):
    reader = PackedReader(packed_data_dir, split="train", sequence_length=16, micro_batch_size=2)
    guard = BatchGuard(StabilityConfig(skip_loss_spikes=True, spike_window=3, spike_factor=2.0), tmp_path, reader)
    for step in range(1, 4):
        assert guard.check(torch.tensor(1.0).to(DEVICE), reader.next_batch()["sample_index"], step, 0) is None
    assert guard.check(torch.tensor(9.0).to(DEVICE), reader.next_batch()["sample_index"], 4, 0) == "spike"


def test_evaluation_reduces_on_the_accelerator(nccl_like, packed_data_dir):
    reader = PackedReader(packed_data_dir, split="validation", sequence_length=16, micro_batch_size=2)
    vocab = reader.vocab_size
    table = torch.log_softmax(torch.randn(vocab, vocab), dim=-1).to(DEVICE)

    class Engine:
        device = DEVICE
        module = torch.nn.Module()

        def __call__(self, input_ids):
            assert isinstance(input_ids, OnAccelerator), "the batch must be moved to the engine's device"
            return table[input_ids]

        def eval(self):
            pass

        def train(self):
            pass

    result = evaluate(Engine(), reader.iter_epoch_once())
    assert result["tokens"] > 0 and 0 < result["loss"] < 50 and 0 <= result["accuracy"] <= 1


def test_loss_scale_watch_on_the_accelerator(nccl_like):
    scaler = SimpleNamespace(dynamic=True, cur_scale=1024.0, cur_hysteresis=2, min_scale=1.0, delayed_shift=2,
                             raise_error_at_min_scale=True)
    engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scaler=scaler), was_step_applied=lambda: False)
    watch = LossScaleWatch(engine, StabilityConfig(), {"fp16": {"enabled": True}})
    watch.before_step()
    scaler.cur_hysteresis = 1
    event = watch.after_step(3)
    assert event["scale_before"] == 1024.0 and event["hysteresis_left"] == 1
    watch.load_state_dict(watch.state_dict())


# Collectives of torch.distributed; `get_rank`, `get_world_size`, `is_initialized` and friends are fine anywhere.
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "monitored_barrier",
               "gather_object", "scatter_object_list"}


def _collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed", "deepspeed.comm", "ds_comm"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.func.attr}")
    return found


def test_no_collective_outside_the_helper():
    helper = ROOT / "pipeline" / "comm.py"
    offenders = [hit for folder in ("pipeline", "launch", "data_prep", "bench") for path in sorted((ROOT / folder).rglob("*.py"))
                 if path != helper for hit in _collective_calls(path)]
    assert not offenders, "collectives must go through pipeline/comm.py:\n" + "\n".join(offenders)
    assert _collective_calls(helper), "the scan found nothing in the helper itself: it is broken"


# ---- failing together, and a lost peer (faults issue, item 5) -------------------------------------

def _two_rank_worker(rank: int, port: int, timeout_s: float, scenario: str, out: str) -> None:
    import os
    import time
    from datetime import timedelta

    import torch.distributed as dist

    from pipeline.data import DataError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=timeout_s))
    result = {}
    try:
        if scenario == "fails_alone":
            with comm.fail_together(DataError):
                if rank == 0:  # the one rank that hashes the shards finds a bad one
                    raise DataError("data/train-00001.arrow does not match its checksum")
        elif scenario == "peer_hangs":
            if rank == 1:
                time.sleep(timeout_s * 4)  # alive but silent: a hung rank or an unreachable node
            comm.all_reduce(torch.ones(1))
    except Exception as err:
        result = {"type": type(err).__name__, "message": str(err), "lost_peer": comm.lost_peer(err)}
    result["seconds"] = time.monotonic()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # no teardown: the peer may be gone


def _run_two_ranks(tmp_path, scenario: str, timeout_s: float = 5.0) -> dict:
    import time

    import torch.multiprocessing as mp

    start = time.monotonic()
    mp.start_processes(_two_rank_worker, args=(comm.free_port(), timeout_s, scenario, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    return {rank: {**json.loads((tmp_path / f"rank{rank}.json").read_text()), "start": start} for rank in (0, 1)}


def test_a_check_failing_on_one_rank_ends_every_rank_with_its_sentence(tmp_path):
    results = _run_two_ranks(tmp_path, "fails_alone")
    assert results[0]["type"] == results[1]["type"] == "DataError"
    assert results[0]["message"] == "data/train-00001.arrow does not match its checksum"
    assert results[1]["message"] == "rank 0: data/train-00001.arrow does not match its checksum"


def test_a_hung_peer_ends_the_waiting_rank_within_the_collective_timeout(tmp_path):
    results = _run_two_ranks(tmp_path, "peer_hangs", timeout_s=5.0)
    waited = results[0]["seconds"] - results[0]["start"]
    assert results[0]["lost_peer"] and "train.collective_timeout_s" in results[0]["lost_peer"], results[0]
    assert waited < 5.0 + 30, f"rank 0 waited {waited:.0f} s"


def test_other_errors_are_not_taken_for_a_lost_peer():
    assert comm.lost_peer(ValueError("shapes do not match")) is None
