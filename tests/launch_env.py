"""Real launch environments for tests/test_launch.py: Debian packages, a local sshd, a one-host SLURM cluster.

Everything here runs as the test's own children on private ports and paths under a temporary folder,
and is stopped by the fixtures that start it, also when a test fails. As root, missing Debian packages
are installed with apt-get (so `make test` on a fresh CI machine runs every launch test); without root
the tests that need them are skipped, saying which packages to install.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from pipeline.comm import free_port

# binary -> Debian package that provides it
PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge",
            "mungekey": "munge", "sshd": "openssh-server", "ssh": "openssh-client", "pdsh": "pdsh"}
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_installed = False


def which(binary: str) -> Optional[str]:
    return shutil.which(binary, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)


def ensure_packages() -> None:
    """Install the Debian packages of PACKAGES that are missing (once per session), or skip without root."""
    global _installed
    missing = sorted({package for binary, package in PACKAGES.items() if which(binary) is None})
    if not missing or _installed:
        return
    if os.geteuid() != 0:
        pytest.skip(f"needs the Debian packages {' '.join(missing)}: run the tests as root (they install "
                    f"them with apt-get) or `apt-get install {' '.join(missing)}`")
    if which("apt-get") is None:
        pytest.skip(f"needs {' '.join(missing)} and there is no apt-get to install them with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120",
                 *missing]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if out.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed (rc {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    _installed = True
    still = [b for b in PACKAGES if which(b) is None]
    assert not still, f"installed {missing}, yet {still} are not on PATH"


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (the tests start it as root on private ports)")


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout`; the process was started by us (its own session)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def processes_with_env(entry: str) -> list[int]:
    """Pids of the processes whose environment holds `entry` (NAME=value), this one excepted."""
    marker, pids = entry.encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) != os.getpid() and marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            pass  # gone already, or not ours to read
    return pids


def kill_processes_with_env(entry: str) -> int:
    """SIGKILL every process whose environment holds `entry` (NAME=value): what a test started, wherever
    it ended up (re-parented launcher children, ssh sessions, SLURM steps). Returns how many."""
    killed = 0
    for pid in processes_with_env(entry):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass  # gone already
    return killed


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class LocalSshd:
    """An sshd on 127.0.0.1:<free port> that lets root in with a key of its own; touches no ~/.ssh."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.key = root / "id_ed25519"
        self.process: Optional[subprocess.Popen] = None

    @property
    def ssh_options(self) -> str:
        """For PDSH_SSH_ARGS_APPEND / ssh: our key, no known_hosts, never a password prompt."""
        return (f"-i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes "
                "-o LogLevel=ERROR")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for key in (self.root / "host_ed25519", self.key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        (self.root / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        config = self.root / "sshd_config"
        config.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host_ed25519'}\n"
                          f"AuthorizedKeysFile {self.root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                          f"UsePAM no\nStrictModes no\nPidFile {self.root / 'sshd.pid'}\n")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        self.process = subprocess.Popen([which("sshd"), "-D", "-e", "-f", str(config)], start_new_session=True,
                                        stdout=open(self.root / "sshd.log", "w"), stderr=subprocess.STDOUT)
        wait_until(lambda: _port_open(self.port) or self.process.poll() is not None, 15, "sshd to listen")
        if self.process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class SlurmCluster:
    """munged, slurmctld and one slurmd per node, all on this host (NodeHostname=localhost, own ports).

    ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups or systemd needed.
    `env` (SLURM_CONF) is what sbatch, squeue, scontrol and scancel need to talk to this cluster.
    """

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2):
        self.root = root
        self.nodes = nodes
        self.cpus = cpus_per_node
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"),
                        PATH=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)

    def _daemon(self, *cmd: str, log: str) -> subprocess.Popen:
        process = subprocess.Popen(list(cmd), start_new_session=True, env=self.env,
                                   stdout=open(self.root / log, "w"), stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def start(self) -> None:
        root = self.root
        (root / "state").mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(exist_ok=True)
        os.chmod(root, 0o755)  # munge wants its socket's folder reachable by every user
        subprocess.run([which("mungekey"), "-c", "-f", "-k", str(root / "munge.key")], check=True, timeout=30)
        socket_path = root / "munge.socket"
        self._daemon(which("munged"), "-F", "-f", f"--socket={socket_path}", f"--key-file={root / 'munge.key'}",
                     f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                     f"--seed-file={root / 'munged.seed'}", log="munged.out")
        wait_until(socket_path.exists, 15, "munged's socket")
        ctld_port = free_port()
        node_ports = {node: free_port() for node in self.nodes}
        host = socket.gethostname().split(".")[0]  # slurmctld checks it runs on SlurmctldHost
        # A random first job id: MASTER_PORT is derived from the job id, and this cluster may share the
        # host with another one (or with an earlier session's leftovers).
        lines = [
            "ClusterName=pipelinetest", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
            "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}/%n", f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root}/slurmd.%n.pid", f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root}/slurmd.%n.log", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2",
            "SlurmdParameters=config_overrides", "MinJobAge=3600", "KillWait=10", "InactiveLimit=0",
            f"FirstJobId={random.randint(1000, 30000)}",
            *(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} State=UNKNOWN"
              for node, port in node_ports.items()),
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
        ]
        (root / "slurm.conf").write_text("\n".join(lines) + "\n")
        self._daemon(which("slurmctld"), "-D", "-i", "-f", str(root / "slurm.conf"), log="slurmctld.out")
        for node in self.nodes:
            self._daemon(which("slurmd"), "-D", "-N", node, "-f", str(root / "slurm.conf"), log=f"slurmd.{node}.out")
        wait_until(self._all_idle, 60, "every node to be idle (see slurmctld.log / slurmd.*.log)", interval=0.5)

    def _all_idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"a SLURM daemon exited: {process.args}; logs in {self.root}")
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return set(states) == set(self.nodes) and all(s == "idle" for s in states.values())

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and out.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")
        return out.stdout

    def sbatch(self, *args: str, env: dict, cwd: Path) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30,
                             env={**env, "SLURM_CONF": self.env["SLURM_CONF"], "PATH": self.env["PATH"]}, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_for_state(self, job_id: int, states: set[str], timeout: float) -> dict:
        info: dict = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info.get("JobState") in states

        wait_until(reached, timeout, f"job {job_id} to reach {states}", interval=0.5)
        return info

    def job_processes(self, job_id: int) -> list[int]:
        """Pids of a job's instance still on this host: its slurmstepds ("slurmstepd: [JOB.batch]",
        "[JOB.0]") and whatever carries SLURM_JOB_ID=JOB of this cluster in its environment."""
        step_tag, job_env = f"[{job_id}.".encode(), f"SLURM_JOB_ID={job_id}".encode()
        conf = f"SLURM_CONF={self.env['SLURM_CONF']}".encode()
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone already
            if (cmdline.startswith(b"slurmstepd") and step_tag in cmdline) or (job_env in environ and conf in environ):
                pids.append(int(proc.name))
        return pids

    def release_requeued(self, job_id: int, started: Callable[[], bool], timeout: float = 120,
                         attempts: int = 3) -> int:
        """Start a requeued job now instead of after SLURM's two-minute hold; returns how many launches
        slurmd refused before `started()` (the new instance's first sign of life) became true.

        slurmd revokes the old instance's credential when it kills it, and refuses a launch whose
        credential is not newer, in whole seconds, than that revocation ("Job credential revoked",
        "already killed, do not launch batch job"); slurmctld then ends the job instead of starting it.
        SLURM's own hold exists for this. Here: wait until the old instance has left the host, then past
        the next second, then release; a refused launch is requeued and released again."""
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY"}
        for refused in range(attempts):
            wait_until(lambda: not self.job_processes(job_id), timeout, f"the last instance of job {job_id} to leave")
            time.sleep(2.0)
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            wait_until(lambda: started() or self.job(job_id).get("JobState") in ended, timeout,
                       f"job {job_id} to start again")
            if started():
                return refused
            self.run("scontrol", "requeue", str(job_id))
            self.wait_for_state(job_id, {"PENDING"}, timeout)
        raise RuntimeError(f"slurmd refused job {job_id} {attempts} times: {self.job(job_id)}")

    def stop(self) -> None:
        """Cancel every job (their ranks checkpoint and exit), then stop the daemons, newest first."""
        try:
            self.run("scancel", "--user", "root", check=False)
            wait_until(lambda: not self.run("squeue", "-h", check=False).strip(), 30, "jobs to end")
        except Exception:  # a half-started cluster has nothing to cancel; the daemons still go
            pass
        for process in reversed(self.processes):
            stop_process(process)
        # slurmstepd and the job's tasks outlive slurmd by design; whatever carries this cluster's
        # SLURM_CONF in its environment is ours.
        kill_processes_with_env(f"SLURM_CONF={self.env['SLURM_CONF']}")


def slurm_cluster(root: Path):
    """A started SlurmCluster for a pytest fixture to yield (root only; skips otherwise), stopped after."""
    require_root("a SLURM cluster (munged, slurmctld, slurmd)")
    ensure_packages()
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
