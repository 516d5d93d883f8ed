"""launch/slurm/prepare.sbatch on the real one-host SLURM cluster of the launch tests (tests/launch_env.py):
two nodes, one MPI rank each (srun --mpi=pmi2), the same bytes as one process."""
import os
import sys
from pathlib import Path

import pytest

from launch_env import slurm_cluster
from test_data_prep_scale import PREP_ARGS, folder_bytes, prep, write_messy_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    yield from slurm_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.mark.launch
def test_prepare_sbatch_on_two_nodes_gives_the_same_bytes(slurm, tmp_path):
    corpus = write_messy_corpus(tmp_path / "in")
    reference = tmp_path / "reference"
    prep(reference, "--inputs", str(corpus), *PREP_ARGS)
    out, log = tmp_path / "out", tmp_path / "prep-slurm.out"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    job = slurm.sbatch(f"--output={log}", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                       str(ROOT / "launch/slurm/prepare.sbatch"), "--inputs", str(corpus), "--out_dir", str(out),
                       *PREP_ARGS, env=env, cwd=ROOT)
    info = slurm.wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 300)
    text = log.read_text() if log.is_file() else "(no job log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert f"job {job} prep run 1: 2 ranks x 1 workers on n[1-2]" in text
    assert "2 ranks x 1 workers" in text.split("prepare:")[-1]
    assert folder_bytes(out) == folder_bytes(reference)
