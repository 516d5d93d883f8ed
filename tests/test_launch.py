"""Scale-out launch, for real on CPU: mpirun, two `--no_ssh` node launchers, a hostfile over a local sshd,
SLURM batch scripts on a one-host SLURM cluster (2 tasks, 2 nodes, preemption + requeue), resuming at
another world size, and falling back from a damaged checkpoint.

Every run trains the tiny preset for 6 steps at a global batch of 8 samples, so each launch path must
reproduce the losses of one reference run of the deepspeed launcher with 2 ranks: that proves the
ranks found each other (a lone rank would train on half the data and lose differently).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from dsrun import ROOT, free_port, tiny_data, train_losses  # noqa: F401  (tiny_data is a fixture)
from pipeline.metrics import read_metrics
from launch_env import LocalSshd, SlurmCluster, ensure_packages, kill_processes_with_env, require_root, wait_until

STEPS = 6
TIMEOUT = 300  # per launch; a hang fails the test instead of stalling CI
VENV_BIN = str(Path(sys.executable).parent)


def run_args(data_dir: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--deepspeed_config", str(ROOT / "ds_configs/cpu.json"), "--config", str(ROOT / "launch/presets/tiny.yaml"),
            "--data.data_dir", str(data_dir), "--train.out_dir", str(run_dir), "--train.max_steps", str(STEPS),
            "--train.checkpoint_interval", "3", "--train.eval_interval", "100", "--train.eval_batches", "1",
            "--train.log_interval", "1", "--data.trace_samples", "true", *overrides]


def launch_env(**extra: str) -> dict:
    # The venv first on PATH: the deepspeed launcher, mpirun, and the same `ninja` for the JIT-built ops
    # (another ninja would rebuild them).
    return dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1", **extra)


def new_marker() -> str:
    """An environment entry that tags every process of one launch, wherever it runs (see `launch`)."""
    return f"PIPELINE_LAUNCH_TEST={uuid.uuid4().hex}"


def launch(*cmds: list[str], expect_rc: int = 0, timeout: float = TIMEOUT, marker: str | None = None,
           **env: str) -> list[str]:
    """Start the commands together, wait for all, check their exit codes; return their outputs.

    When one fails the others are not waited for; whatever they leave behind (ranks of a killed
    launcher, ssh sessions) is killed by its marker, so a hang or a failure never leaves processes running.
    """
    marker = marker or new_marker()
    name, value = marker.split("=", 1)
    logs = [tempfile.TemporaryFile(mode="w+") for _ in cmds]  # files, not pipes: nobody blocks on a full pipe
    processes = [subprocess.Popen(cmd, cwd=ROOT, env=launch_env(**{name: value}, **env), text=True, stdout=log,
                                  stderr=subprocess.STDOUT) for cmd, log in zip(cmds, logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, expect_rc) for p in processes):
                break
            time.sleep(0.2)
    finally:
        kill_processes_with_env(marker)
        for process in processes:
            process.wait(timeout=30)
    outputs = []
    for process, log in zip(processes, logs):
        log.seek(0)
        outputs.append(log.read())
        assert process.returncode == expect_rc, (f"rc={process.returncode} (expected {expect_rc}; -9: killed after a "
                                                 f"failure or {timeout:.0f} s)\n{outputs[-1][-6000:]}")
    return outputs


def deepspeed(num_procs: int, *args: str, expect_rc: int = 0) -> str:
    return launch([str(Path(VENV_BIN) / "deepspeed"), "--num_gpus", str(num_procs), "--master_port", str(free_port()),
                   str(ROOT / "launch/train.py"), *args], expect_rc=expect_rc)[0]


def traced_samples(run_dir: Path) -> list[int]:
    """Every global sample id the run's ranks read (data.trace_samples), over all its restarts."""
    ids = []
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        ids += [i for line in path.read_text().splitlines() for i in json.loads(line)["samples"]]
    return ids


def assert_same_losses(run_dir: Path, reference: Path, steps=range(1, STEPS + 1), rel: float = 1e-5) -> None:
    got, want = train_losses(run_dir), train_losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=rel), (step, got[step], want[step])


def assert_every_sample_once(run_dir: Path, per_step: int = 8) -> None:
    ids = traced_samples(run_dir)
    assert len(ids) == len(set(ids)), "a sample was read twice"
    assert sorted(ids) == list(range(STEPS * per_step)), "a sample was skipped"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> Path:
    """The deepspeed launcher on one node, 2 ranks x micro batch 4: the losses every path must reproduce."""
    run_dir = tmp_path_factory.mktemp("launch") / "reference"
    deepspeed(2, *run_args(tiny_data, run_dir))
    assert_every_sample_once(run_dir)
    return run_dir


# ---- launch paths ----------------------------------------------------------------------------

@pytest.mark.launch
def test_mpirun_two_jobs_on_one_host_at_once(tiny_data, reference, tmp_path):
    """`mpirun -n 2` twice at the same time: ranks from mpi4py, each job on the port its rank 0 chose."""
    mpirun = shutil.which("mpirun", path=VENV_BIN + os.pathsep + os.environ["PATH"])
    assert mpirun, "mpirun (the mpich wheel of requirements.txt) is not installed"
    runs = [tmp_path / "a", tmp_path / "b"]
    launch(*([mpirun, "-n", "2", sys.executable, str(ROOT / "launch/train.py"), *run_args(tiny_data, run_dir)]
             for run_dir in runs))
    for run_dir in runs:
        assert "ZeRO-2 on 2 ranks" in (run_dir / "training.log").read_text()
        assert_same_losses(run_dir, reference)


@pytest.mark.launch
def test_two_no_ssh_node_launchers(tiny_data, reference, tmp_path):
    """`deepspeed --no_ssh --node_rank i` started on each of two "nodes" (both on this host)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run_dir, port = tmp_path / "run", str(free_port())
    launch(*([str(Path(VENV_BIN) / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
              "--master_addr", "127.0.0.1", "--master_port", port, str(ROOT / "launch/train.py"),
              *run_args(tiny_data, run_dir)] for rank in (0, 1)))
    assert_same_losses(run_dir, reference)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    require_root("a local sshd that lets root in")
    ensure_packages()
    server = LocalSshd(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.launch
def test_hostfile_run_over_local_sshd(tiny_data, reference, sshd, tmp_path):
    """The deepspeed launcher's pdsh backend reaches two hostfile entries (both this host) over ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # DeepSpeed's own way to set the remote ranks' environment (`.deepspeed_env`, here under another name).
    env_file = tmp_path / "deepspeed_env"
    marker = new_marker()  # also in the remote ranks' environment, to find them if they hang
    remote = {"PATH": VENV_BIN + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1",
              marker.split("=")[0]: marker.split("=")[1]}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        remote["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    env_file.write_text("".join(f"{k}={v}\n" for k, v in remote.items()))
    run_dir = tmp_path / "run"
    out = launch([str(Path(VENV_BIN) / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh",
                  "--ssh_port", str(sshd.port), "--no_ssh_check", "--master_addr", "127.0.0.1",
                  "--master_port", str(free_port()), str(ROOT / "launch/train.py"), *run_args(tiny_data, run_dir)],
                 marker=marker, DS_ENV_FILE=str(env_file), PDSH_SSH_ARGS_APPEND=sshd.ssh_options)[0]
    assert "localhost: " in out and "127.0.0.1: " in out, "both hosts' output comes back through pdsh"
    assert_same_losses(run_dir, reference)


# ---- another world size, damaged checkpoints ----------------------------------------------------

@pytest.fixture(scope="module")
def stopped_at_two_ranks(tiny_data, tmp_path_factory) -> Path:
    """2 ranks x micro batch 4, checkpoints after steps 2 and 3, then stopped."""
    run_dir = tmp_path_factory.mktemp("launch") / "two_ranks"
    deepspeed(2, *run_args(tiny_data, run_dir, "--train.checkpoint_interval", "2", "--train.exit_after_steps", "3"))
    return run_dir


@pytest.mark.launch
def test_resume_at_one_rank_from_two(tiny_data, reference, stopped_at_two_ranks, tmp_path):
    """Same global batch (1 rank x 8): model, Adam moments, LR schedule and data position carry over,
    so the losses are those of the uninterrupted 2-rank run."""
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_two_ranks, run_dir)
    deepspeed(1, *run_args(tiny_data, run_dir, "--train.micro_batch_size", "8", "--train.resume", "auto"))
    log = (run_dir / "training.log").read_text()
    assert "written by 2 ranks, this run has 1: converting it to DeepSpeed's universal checkpoint" in log
    assert "resumed from" in log and "step00000003 at step 3" in log
    assert_same_losses(run_dir, reference)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir, "train")}
    want = {r["step"]: r["lr"] for r in read_metrics(reference, "train")}
    assert lrs == pytest.approx(want), "the LR schedule continues"
    assert_every_sample_once(run_dir)


@pytest.mark.launch
def test_resume_at_two_ranks_from_one(tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    deepspeed(1, *run_args(tiny_data, run_dir, "--train.micro_batch_size", "8", "--train.exit_after_steps", "3"))
    deepspeed(2, *run_args(tiny_data, run_dir, "--train.resume", "auto"))
    log = (run_dir / "training.log").read_text()
    assert "written by 1 ranks, this run has 2" in log and "resumed from" in log
    assert_same_losses(run_dir, reference, rel=1e-4)  # 1 rank x 8 vs 2 x 4: the same sums, rounded apart
    assert_every_sample_once(run_dir)


@pytest.mark.launch
def test_resume_at_another_world_size_keeps_the_fp16_loss_scaler(tiny_data, tmp_path):
    """Two overflows in a row halve the scale to 512 before the checkpoint; a fresh scaler would restart at 1024."""
    run_dir = tmp_path / "run"
    fp16 = ("--deepspeed_config", str(ROOT / "ds_configs/fp16_stable.json"), "--train.allow_cpu_fp16", "true")
    deepspeed(2, *run_args(tiny_data, run_dir, *fp16, "--stability.drill_inf_grad_steps", "[2,3]",
                           "--train.exit_after_steps", "3"))
    deepspeed(1, *run_args(tiny_data, run_dir, *fp16, "--train.micro_batch_size", "8", "--train.resume", "auto"))
    records = {r["step"]: r for r in read_metrics(run_dir, "train")}
    assert records[3]["loss_scale"] == 512 and records[4]["loss_scale"] == 512
    assert records[STEPS]["skipped_overflow"] == 2, "the overflow count carries over too"
    assert records[4]["lr"] == records[3]["lr"], "skipped steps did not advance the schedule, before or after"
    assert "converting it to DeepSpeed's universal checkpoint" in (run_dir / "training.log").read_text()
    assert_every_sample_once(run_dir)


@pytest.mark.launch
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_data, reference, stopped_at_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(stopped_at_two_ranks, run_dir)
    damaged = run_dir / "checkpoints" / "step00000003" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a save cut short
    deepspeed(2, *run_args(tiny_data, run_dir, "--train.resume", "auto"))
    log = (run_dir / "training.log").read_text()
    assert f"{damaged} has 1000 bytes" in log and "truncated" in log
    assert "resumed from" in log and "step00000002 at step 2" in log
    assert (run_dir / "checkpoints" / "corrupt-step00000003").is_dir(), "kept for inspection"
    assert_same_losses(run_dir, reference, rel=0)  # same world size: the resume is exact
    # Step 3 was read twice (before the damage and again after the fallback), nothing else.
    ids = traced_samples(run_dir)
    assert sorted(set(ids)) == list(range(STEPS * 8)) and len(ids) == (STEPS + 1) * 8


# ---- SLURM -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_root("a SLURM cluster (munged, slurmctld, slurmd)")
    ensure_packages()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def submit(cluster: SlurmCluster, script: str, run_dir: Path, *args: str, sbatch=()) -> tuple[int, Path]:
    log = run_dir.parent / f"{run_dir.name}-slurm.out"
    job = cluster.sbatch(f"--output={log}", *sbatch, str(ROOT / "launch/slurm" / script), *args,
                         env=launch_env(PYTHON=sys.executable), cwd=ROOT)
    return job, log


def finished(cluster: SlurmCluster, job: int, log: Path, timeout: float = TIMEOUT) -> dict:
    info = cluster.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    text = log.read_text() if log.is_file() else "(no job log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-6000:]}"
    return info


def training_started(cluster: SlurmCluster, job: int, log: Path, metrics: Path, timeout: float = TIMEOUT) -> None:
    """Wait for step 2 in metrics.jsonl; a job that ends first fails at once with its log."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
    wait_until(lambda: (metrics.is_file() and '"step": 2,' in metrics.read_text())
               or cluster.job(job).get("JobState") in ended, timeout, f"job {job} to train (log: {log})")
    info = cluster.job(job)
    assert info.get("JobState") not in ended, f"job ended before training: {info}\n{log.read_text()[-4000:]}"


@pytest.mark.launch
def test_slurm_single_node_two_tasks(slurm, tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit(slurm, "single_node.sbatch", run_dir, *run_args(tiny_data, run_dir))
    finished(slurm, job, log)
    assert f"job {job} run 1: 2 ranks on" in log.read_text()
    assert_same_losses(run_dir, reference)


@pytest.mark.launch
def test_slurm_two_nodes(slurm, tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit(slurm, "multi_node.sbatch", run_dir, *run_args(tiny_data, run_dir),
                      sbatch=("--nodes=2", "--ntasks-per-node=1"))
    info = finished(slurm, job, log)
    assert info["NumNodes"] == "2" and f"job {job} run 1: 2 ranks on n[1-2]" in log.read_text()
    assert_same_losses(run_dir, reference)


@pytest.mark.launch
def test_slurm_preempted_job_is_requeued_and_resumes(slurm, tiny_data, tmp_path):
    """SIGUSR1 to the ranks (as `--signal=USR1@...` before the time limit): checkpoint, exit 75,
    `scontrol requeue`, and the requeued job resumes and finishes."""
    run_dir, steps = tmp_path / "run", 60
    job, log = submit(slurm, "single_node.sbatch", run_dir,
                      *run_args(tiny_data, run_dir, "--train.max_steps", str(steps), "--train.checkpoint_interval", "1000"))
    metrics = run_dir / "metrics.jsonl"
    training_started(slurm, job, log, metrics)
    slurm.run("scancel", "--signal=USR1", str(job))
    # SLURM holds a requeued job for two minutes before it may start again; the test lets it go as soon
    # as slurmd can take it.
    info = slurm.wait_for_state(job, {"PENDING", "COMPLETED", "FAILED"}, 120)
    assert info["JobState"] == "PENDING", f"the job finished before the signal took effect: {info}"
    refused = slurm.release_requeued(job, started=lambda: f"job {job} run " in log.read_text().split("requeueing", 1)[-1])
    info = finished(slurm, job, log)
    assert info["Restarts"] == str(1 + refused)
    text = log.read_text()
    assert "exit code 75" in text or "Exited with exit code 75" in text
    assert f"job {job}: preempted, checkpoint saved; requeueing" in text and f"job {job} run 2:" in text
    train_log = (run_dir / "training.log").read_text()
    assert "preempted (SIGUSR1) after step" in train_log and "resumed from" in train_log
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))
    ids = traced_samples(run_dir)
    assert len(ids) == len(set(ids)) == steps * 8, "no sample read twice or skipped across the requeue"


@pytest.mark.launch
def test_slurm_plain_scancel_checkpoints_the_current_step_and_the_job_resumes(slurm, tiny_data, tmp_path):
    """A plain `scancel` (what a time limit or a preemption without --signal does too): SIGTERM to the
    batch shell and to every task, SIGKILL KillWait (10 s here) later. The ranks checkpoint the step they
    are in and exit 75; the batch shell survives to see it and asks for a requeue."""
    import re

    run_dir, steps = tmp_path / "run", 60
    job, log = submit(slurm, "single_node.sbatch", run_dir,
                      *run_args(tiny_data, run_dir, "--train.max_steps", str(steps), "--train.checkpoint_interval", "1000"))
    training_started(slurm, job, log, run_dir / "metrics.jsonl")
    slurm.run("scancel", str(job))
    info = slurm.wait_for_state(job, {"PENDING", "COMPLETED", "FAILED", "CANCELLED"}, 120)
    wait_until(lambda: not slurm.job_processes(job), 60, f"job {job}'s processes to end")
    text, train_log = log.read_text(), (run_dir / "training.log").read_text()
    assert f"job {job}: SIGTERM received" in text, text[-3000:]
    found = re.search(r"preempted \(SIGTERM\) after step (\d+)", train_log)
    assert found, train_log[-3000:]
    stopped = int(found.group(1))
    assert (run_dir / "checkpoints" / f"step{stopped:08d}" / "checksums.json").is_file()
    assert f"job {job}: preempted, checkpoint saved; requeueing" in text, "exit 75 reached the batch shell"
    if info["JobState"] == "PENDING":  # SLURM took the requeue
        slurm.release_requeued(job, started=lambda: f"job {job} run " in log.read_text().split("requeueing", 1)[-1])
        finished(slurm, job, log)
    else:  # a cancelled job stays cancelled: resubmitting the same command resumes it
        job, log = submit(slurm, "single_node.sbatch", run_dir,
                          *run_args(tiny_data, run_dir, "--train.max_steps", str(steps), "--train.checkpoint_interval", "1000"))
        finished(slurm, job, log)
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:08d}'}" in (run_dir / "training.log").read_text()
    assert sorted(train_losses(run_dir)) == list(range(1, steps + 1))
    ids = traced_samples(run_dir)
    assert len(ids) == len(set(ids)) == steps * 8, "the checkpoint was of the step in progress: nothing redone"


# ---- pieces of the launch paths, without launching -----------------------------------------------

def test_sbatch_scripts_document_their_options():
    every = sorted((ROOT / "launch/slurm").glob("*.sbatch"))
    assert {p.name for p in every} == {"single_node.sbatch", "multi_node.sbatch", "prepare.sbatch"}
    for script in [*every, ROOT / "launch/slurm/job.sh"]:
        assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0, script
    scripts = [p for p in every if p.name != "prepare.sbatch"]  # training; data prep's has its own test
    for script in scripts:
        header = script.read_text()
        for option in ("--gpus-per-node", "--cpus-per-task", "--time", "--signal", "--requeue", "--output"):
            assert f"#   {option}" in header, (script.name, option)


def test_srun_task_environment_becomes_the_torch_one(monkeypatch):
    from pipeline import comm

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "6")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x2),1")
    monkeypatch.setenv("SLURM_NODEID", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not comm._env_from_slurm(), "without the batch script's MASTER_ADDR it is left to MPI discovery"
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "15123")
    assert comm._env_from_slurm()
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["5", "6", "1", "1"]


def test_preemption_signal_is_noted_a_repeat_is_one_request_and_a_third_kills(monkeypatch):
    from pipeline.engine.preemption import Preemption

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        preemption = Preemption(["SIGUSR1", "SIGUSR2"])
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # a real delivery
        preemption._on_signal(signal.SIGUSR2, None)  # another signal does not interrupt the checkpoint
        assert preemption.requested() and preemption.received == "SIGUSR1"
        sent = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append(sig))
        preemption._on_signal(signal.SIGUSR1, None)  # again: a group signal forwarded by the launcher
        assert sent == [] and preemption.received == "SIGUSR1"
        preemption._on_signal(signal.SIGUSR1, None)  # a third time: the sender insists
        assert sent == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_without_root_missing_packages_are_a_skip_that_says_what_to_install(monkeypatch):
    import launch_env

    monkeypatch.setattr(launch_env, "which", lambda binary: None)
    monkeypatch.setattr(launch_env, "_installed", False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="run the tests as root.*apt-get install .*slurm-wlm"):
        ensure_packages()


def test_checkpoint_choice_and_preemption_vote_communicate_on_the_group_device(monkeypatch, tmp_path):
    """Under NCCL the broadcast of rank 0's checkpoint choice and the preemption vote must not send CPU tensors."""
    from fake_accelerator import strict_collectives
    from pipeline import comm
    from pipeline.engine.preemption import Preemption

    with strict_collectives(monkeypatch, tmp_path):
        plan = {"folder": "/runs/a/checkpoints/step00000003", "rejected": [["step00000004", "truncated"]]}
        assert comm.broadcast_object(plan) == plan and comm.broadcast_object(None) is None
        saved = signal.getsignal(signal.SIGUSR2)
        try:
            preemption = Preemption(["SIGUSR2"])
            assert not preemption.requested()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert preemption.requested()
        finally:
            signal.signal(signal.SIGUSR2, saved)
