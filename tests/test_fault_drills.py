"""Fault drills: real 2-rank DeepSpeed jobs on CPU, hit the way clusters hit them.

- chaos resume: the whole job SIGKILLed (a node loss) at seeded random steps, resumed each time;
- lost rank: one rank of two `--no_ssh` node launchers SIGKILLed; the other exits 76 within the timeout;
- whole group signalled: `kill -TERM -PGID` of the launcher; a checkpoint of the current step;
- rollback: an explicit resume from an older checkpoint, then `resume auto` stays on the new trajectory;
- prep during training: data_prep rewrites the data folder under a running job.

Each drill states what a user may rely on after that fault (README "Checkpoints and resume").
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from dsrun import ROOT, free_port, tiny_data, train_losses  # noqa: F401  (tiny_data is a fixture)
from launch_env import kill_processes_with_env, processes_with_env, wait_until
from test_launch import VENV_BIN, deepspeed, launch, launch_env, new_marker, run_args, traced_samples

DEEPSPEED = str(Path(VENV_BIN) / "deepspeed")
PER_STEP = 8  # samples per step: 2 ranks x micro batch 4


def drill_args(data_dir: Path, run_dir: Path, steps: int, *overrides: str) -> list[str]:
    """Deterministic (a resume reproduces the losses bit for bit), every step logged and traced."""
    return run_args(data_dir, run_dir, "--train.max_steps", str(steps), "--train.deterministic", "true",
                    "--train.report", "false", *overrides)


class Job:
    """A launcher in a session of its own (its ranks share its process group), not waited for:
    the drills signal it mid-run. Everything it started carries `marker` in its environment."""

    def __init__(self, cmd: list[str], marker: str | None = None):
        self.marker = marker or new_marker()
        name, value = self.marker.split("=", 1)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(**{name: value}), text=True, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.output[-6000:]}") from None

    def ranks(self) -> list[psutil.Process]:
        """The training processes (the launchers' children that run launch/train.py)."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if any(arg.endswith("launch/train.py") for arg in cmdline) and "deepspeed.launcher.launch" not in cmdline:
                found.append(child)
        return found

    def alive(self) -> list[int]:
        """Its processes still running, wherever they were re-parented to."""
        return processes_with_env(self.marker)

    def close(self) -> None:
        """Kill whatever is left (a failed drill must not leave ranks training)."""
        kill_processes_with_env(self.marker)
        self.process.wait(30)


def remove_shm_buffers(port: int) -> None:
    """A SIGKILLed rank never runs its exit hooks: remove DeepSpeed's 69 MB /dev/shm buffers by hand."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def metrics_records(run_dir: Path, offset: int = 0) -> list[dict]:
    """Train records of metrics.jsonl from byte `offset` on (complete lines only: a run may be writing)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode()
    records = [json.loads(line) for line in text.split("\n")[:-1]]
    return [r for r in records if r["kind"] == "train"]


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def wait_for_step(job: Job, run_dir: Path, step: int, offset: int = 0, timeout: float = 180) -> int:
    """Wait until this launch of the job (metrics.jsonl past `offset`) has logged `step`; returns the step logged."""
    wait_until(lambda: job.process.poll() is not None or any(r["step"] >= step for r in metrics_records(run_dir, offset)),
               timeout, f"step {step} in {run_dir}/metrics.jsonl", interval=0.1)
    assert job.process.poll() is None, f"the job ended before step {step}:\n{job.output[-6000:]}"
    return max(r["step"] for r in metrics_records(run_dir, offset))


def intact_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name[4:]) for p in (run_dir / "checkpoints").glob("step*/checksums.json"))


def fp32_weights(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)


def trace_lines(run_dir: Path) -> dict[int, list[list[int]]]:
    """Per rank, the sample ids of each micro-batch it read (data.trace_samples), in order."""
    return {int(p.stem[4:]): [json.loads(line)["samples"] for line in p.read_text().splitlines()]
            for p in sorted((run_dir / "samples").glob("rank*.jsonl"))}


def steps_of(ids) -> set[int]:
    return {i // PER_STEP + 1 for i in ids}


# ---- chaos resume --------------------------------------------------------------------------------

CHAOS_STEPS = 16
CHAOS_SEED = 3  # which steps the job is killed at: random, but the same in every run of the test


@pytest.mark.launch
def test_chaos_resume_after_repeated_sigkill_of_the_whole_job(tiny_data, tmp_path):
    """The whole job SIGKILLed at seeded random steps (torchft's fail_at idea, here a node loss: the
    launcher's process group) and resumed with `--train.resume auto` each time: the final weights equal
    an uninterrupted run's, every logged loss equals it, and only the steps after each kill's last
    checkpoint are read again."""
    args = lambda run_dir: drill_args(tiny_data, run_dir, CHAOS_STEPS, "--train.checkpoint_interval", "3",  # noqa: E731
                                      "--train.resume", "auto")
    reference = tmp_path / "reference"
    deepspeed(2, *args(reference))

    run_dir = tmp_path / "chaos"
    # After the first checkpoint, and steps enough before the end for the kill to land first.
    kills = sorted(random.Random(CHAOS_SEED).sample(range(4, CHAOS_STEPS - 5), 2))
    segments = []  # per kill: (step resumed from, newest intact checkpoint at the kill, trace lines per rank)
    resumed = 0
    for kill_at in kills:
        port = free_port()
        offset = size(run_dir / "metrics.jsonl")
        before = {rank: len(lines) for rank, lines in trace_lines(run_dir).items()}
        job = Job([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "launch/train.py"), *args(run_dir)])
        try:
            wait_for_step(job, run_dir, max(kill_at, resumed + 1), offset)
            os.killpg(job.process.pid, signal.SIGKILL)  # launcher, its launch.py and both ranks at once
            assert job.wait(30) == -signal.SIGKILL
        finally:
            job.close()
            remove_shm_buffers(port)
        read = {rank: lines[before.get(rank, 0):] for rank, lines in trace_lines(run_dir).items()}
        segments.append((resumed, intact_steps(run_dir)[-1], read))
        resumed = intact_steps(run_dir)[-1]
    deepspeed(2, *args(run_dir))

    log = (run_dir / "training.log").read_text()
    for _, checkpoint, _ in segments:  # each restart took the newest checkpoint the kill left intact
        assert f"resumed from {run_dir / 'checkpoints' / f'step{checkpoint:08d}'} at step {checkpoint}" in log
    # Every loss ever logged, before a kill or after, is the uninterrupted run's of that step, bit for bit.
    want = train_losses(reference)
    records = metrics_records(run_dir)
    assert sorted({r["step"] for r in records}) == list(range(1, CHAOS_STEPS + 1))
    for record in records:
        assert record["loss"] == want[record["step"]], (record["step"], record["loss"], want[record["step"]])
    # Model and optimizer carried over exactly: the same fp32 weights at the end.
    got, ref = fp32_weights(run_dir, f"step{CHAOS_STEPS:08d}"), fp32_weights(reference, f"step{CHAOS_STEPS:08d}")
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    # Samples: every one read; a sample read again lies in a step after the checkpoint its restart came
    # from, up to where that rank had read before the kill.
    counts = Counter(traced_samples(run_dir))
    assert sorted(counts) == list(range(CHAOS_STEPS * PER_STEP)), "a sample was skipped"
    expected = Counter(range(CHAOS_STEPS * PER_STEP))
    for start, checkpoint, read in segments:
        for rank, lines in read.items():
            ids = [i for line in lines for i in line]
            steps = sorted(steps_of(ids))
            assert steps == list(range(start + 1, steps[-1] + 1)) and len(ids) == len(set(ids)), (rank, steps)
            assert steps[-1] >= checkpoint, "the checkpoint is of a step this launch read"
            expected.update(i for i in ids if i // PER_STEP + 1 > checkpoint)
    assert counts == expected, "a sample outside the redone steps was read twice"


# ---- lost rank -----------------------------------------------------------------------------------

COLLECTIVE_TIMEOUT_S = 20


def node_launchers(tmp_path: Path, run_dir: Path, *args: str) -> list[list[str]]:
    """`deepspeed --no_ssh --node_rank i` for two one-rank "nodes" on this host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    return [[DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr",
             "127.0.0.1", "--master_port", port, str(ROOT / "launch/train.py"), *args] for rank in (0, 1)]


@pytest.mark.launch
def test_lost_rank_ends_the_other_within_the_collective_timeout_and_the_run_resumes(tiny_data, tmp_path):
    run_dir, steps = tmp_path / "run", 16
    args = drill_args(tiny_data, run_dir, steps, "--train.checkpoint_interval", "3", "--train.resume", "auto",
                      "--train.collective_timeout_s", str(COLLECTIVE_TIMEOUT_S))
    marker = new_marker()  # both launchers: one cleanup
    jobs = [Job(cmd, marker) for cmd in node_launchers(tmp_path, run_dir, *args)]
    try:
        wait_for_step(jobs[0], run_dir, 5)
        (victim,) = jobs[1].ranks()
        victim.kill()
        killed = time.monotonic()
        rc = jobs[0].wait(COLLECTIVE_TIMEOUT_S + 60)
        elapsed = time.monotonic() - killed
    finally:
        for job in jobs:
            job.close()
    out = jobs[0].output
    assert rc == 76, f"rc={rc}\n{out[-6000:]}"
    assert "lost contact with another rank" in out and "Exit code 76" in out
    assert "lost contact with another rank" in (run_dir / "training.log").read_text()
    assert elapsed < COLLECTIVE_TIMEOUT_S + 15, f"the surviving node took {elapsed:.0f} s to give up"
    stopped = intact_steps(run_dir)[-1]

    # The same commands again (what a requeue runs): the run continues from the newest checkpoint.
    outs = launch(*node_launchers(tmp_path, run_dir, *args))
    log = (run_dir / "training.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in log, outs[0][-3000:]
    assert sorted(r["step"] for r in metrics_records(run_dir))[-1] == steps
    assert f"done at step {steps}" in log


# ---- whole group signalled -----------------------------------------------------------------------

@pytest.mark.launch
def test_sigterm_to_the_launchers_process_group_checkpoints_the_current_step(tiny_data, tmp_path):
    """`kill -TERM -PGID` (a terminal's Ctrl-C, SLURM, Kubernetes signal the whole group): each rank gets
    SIGTERM from the signal and again from DeepSpeed's launcher; one checkpoint, of the step in progress."""
    run_dir, steps = tmp_path / "run", 60
    args = drill_args(tiny_data, run_dir, steps, "--train.checkpoint_interval", "1000", "--train.resume", "auto")
    port = free_port()
    job = Job([DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), str(ROOT / "launch/train.py"), *args])
    try:
        wait_for_step(job, run_dir, 4)
        os.killpg(job.process.pid, signal.SIGTERM)
        rc = job.wait(60)
        # DeepSpeed's launch.py gives its ranks 30 s each before SIGKILL: the checkpoint is written by then.
        wait_until(lambda: not job.alive(), 90, "the ranks to exit")
    finally:
        job.close()
        remove_shm_buffers(port)
    log = (run_dir / "training.log").read_text()
    found = re.search(r"preempted \(SIGTERM\) after step (\d+): checkpoint saved; exit code 75", log)
    assert found, log[-3000:]
    stopped = int(found.group(1))
    assert intact_steps(run_dir) == [stopped], "one checkpoint, of the step the signal arrived in"
    # DeepSpeed 0.19.8's `deepspeed` (runner.py) has no signal handler for a one-node run: the group's
    # SIGTERM ends it at once. Its launch.py forwards the signal to the ranks (their second, ignored),
    # waits for them and exits 1, not with their 75. A requeue must go by the checkpoint, not this code
    # (launch/slurm/job.sh passes the ranks' 75 on; so does `deepspeed` when only the ranks are signalled).
    assert rc == -signal.SIGTERM, f"the launcher's exit code changed ({rc}): update README and this drill"

    deepspeed(2, *args)
    log = (run_dir / "training.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'} at step {stopped}" in log
    ids = traced_samples(run_dir)
    assert len(ids) == len(set(ids)) and sorted(ids) == list(range(steps * PER_STEP)), \
        "the checkpoint was of the step in progress: nothing redone, nothing skipped"


# ---- rollback ------------------------------------------------------------------------------------

@pytest.mark.launch
def test_rollback_then_resume_auto_stays_on_the_new_trajectory(tiny_data, tmp_path):
    """Train to 10 keeping every checkpoint; roll back to step 4 with keep_checkpoints 2 and train on:
    the checkpoints from the future of step 4 are set aside whole, the new ones are kept, and
    `--train.resume auto` continues the new trajectory."""
    run_dir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = lambda *more: drill_args(tiny_data, run_dir, 10, "--train.checkpoint_interval", "2", *more)  # noqa: E731
    deepspeed(2, *args("--train.keep_checkpoints", "0"))
    first = train_losses(run_dir)
    assert intact_steps(run_dir) == [2, 4, 6, 8, 10]

    older = tmp_path / "step4-copy"  # outside the run folder: a resume from it is explicit, like `best`
    shutil.copytree(checkpoints / "step00000004", older)
    deepspeed(2, *args("--train.keep_checkpoints", "2", "--train.resume", str(older), "--train.exit_after_steps", "3"))
    log = (run_dir / "training.log").read_text()
    assert f"resumed from {older} at step 4" in log
    assert intact_steps(run_dir) == [6, 7], "the new trajectory's checkpoints are kept, the older pruned"
    for step in (6, 8, 10):  # the abandoned trajectory: set aside, whole, never deleted
        assert (checkpoints / f"abandoned-step{step:08d}" / "checksums.json").is_file(), step
    assert (checkpoints / "latest").read_text().strip() == "step00000007"

    deepspeed(2, *args("--train.keep_checkpoints", "2", "--train.resume", "auto", "--train.exit_after_steps", "2"))
    log = (run_dir / "training.log").read_text()
    assert f"resumed from {checkpoints / 'step00000007'} at step 7" in log
    assert intact_steps(run_dir) == [8, 9]
    assert sorted(p.name for p in checkpoints.glob("abandoned-*")) == [f"abandoned-step{s:08d}" for s in (6, 8, 10)]
    # Deterministic: from the same checkpoint the new trajectory retraces the first, step for step.
    again = train_losses(run_dir)
    assert [again[s] for s in range(5, 10)] == [first[s] for s in range(5, 10)]


# ---- prep during training ------------------------------------------------------------------------

@pytest.mark.launch
def test_data_prep_rewriting_the_data_of_a_running_job(tiny_data, tmp_path):
    """The job keeps reading the shards it mapped (data_prep writes new files and renames them in); a
    resume onto the rewritten folder is refused in one sentence, and allowed when asked for."""
    data_dir, run_dir, steps = tmp_path / "data", tmp_path / "run", 1000  # ended by SIGUSR1
    shutil.copytree(tiny_data, data_dir)
    args = drill_args(data_dir, run_dir, steps, "--train.checkpoint_interval", "1000", "--train.resume", "auto")
    job = Job([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "launch/train.py"), *args])
    try:
        wait_for_step(job, run_dir, 2)
        prep = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--source", "python-stdlib", "--out_dir",
                               str(data_dir), "--vocab_size", "400", "--max_bytes", "400000", "--val_fraction", "0.2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert prep.returncode == 0, prep.stderr[-3000:]
        after_prep = wait_for_step(job, run_dir, 0)
        reached = wait_for_step(job, run_dir, after_prep + 3)  # reading on after the rewrite
        for rank in job.ranks():  # the preemption signal, to the ranks only: checkpoint, exit 75
            rank.send_signal(signal.SIGUSR1)
        rc = job.wait(120)
    finally:
        job.close()
    assert rc == 75, f"rc={rc} (a rank killed by SIGBUS: -7 / 135)\n{job.output[-6000:]}"
    stopped = intact_steps(run_dir)[-1]
    assert stopped >= reached

    refused = deepspeed(2, *args, "--train.max_steps", str(stopped + 2), expect_rc=2)
    sentences = [line for line in refused.splitlines() if "changed since the checkpoint" in line]
    assert sentences and "--data.allow_changed true" in sentences[0], refused[-3000:]
    assert "Traceback" not in refused

    deepspeed(2, *args, "--train.max_steps", str(stopped + 2), "--data.allow_changed", "true")
    log = (run_dir / "training.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'}" in log
    assert "resuming on it because data.allow_changed is set" in log
    assert f"done at step {stopped + 2}" in log
