"""Train the hybrid liquid/spiking/Mamba language model with DeepSpeed ZeRO-2.

    deepspeed launch/train.py --deepspeed_config ds_configs/fp16_stable.json --config launch/presets/small.yaml
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu.json --config launch/presets/tiny.yaml \
        --train.max_steps 50 --train.resume auto

The loop is `pipeline.trainer.Trainer` (train_step, evaluate, fit) with the callbacks of pipeline/callbacks.py.
Exit codes: 0 done (or train.exit_after_steps reached), 2 a configuration, data or checkpoint error (one
sentence naming the file or field), 3 a stability abort (checkpoint saved), 75 preempted (checkpoint saved:
requeue and resume with --train.resume auto), 76 a peer rank was lost mid-collective (requeue; docs/FAULTS.md).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from pipeline import comm  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.data import DataError  # noqa: E402
from pipeline.engine.checkpoint import CheckpointError  # noqa: E402
from pipeline.engine.preemption import PREEMPTED_EXIT_CODE  # noqa: E402
from pipeline.metrics import LOGGER_NAME  # noqa: E402
from pipeline.run_config import parse_run_config  # noqa: E402
from pipeline.trainer import Trainer  # noqa: E402


def main(argv=None) -> int:
    return Trainer(parse_run_config(argv)).fit()


if __name__ == "__main__":
    try:
        code = main()
    except (ConfigError, DataError, CheckpointError, comm.PeerFailed) as err:
        # One sentence naming the file or field, not a traceback from deep inside a library.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if (message := comm.lost_peer(err)) is None:
            raise
        # Out at once: tearing down the process group would wait on the lost peer all over again.
        logging.getLogger(LOGGER_NAME).error("%s", message)  # training.log
        print(f"error: rank {comm.world()[0]}: {message}", file=sys.stderr, flush=True)
        comm.exit_without_teardown(comm.LOST_PEER_EXIT_CODE)
    if code == PREEMPTED_EXIT_CODE:  # the checkpoint is complete on every rank: out before SLURM's KillWait ends
        comm.exit_without_teardown(code)
    sys.exit(code)
