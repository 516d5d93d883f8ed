"""Train the hybrid liquid/spiking/Mamba language model with DeepSpeed ZeRO-2.

    deepspeed launch/train.py --deepspeed_config ds_configs/fp16_stable.json --config launch/presets/small.yaml
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu.json --config launch/presets/tiny.yaml \
        --train.max_steps 50 --train.resume auto

Read top to bottom: config -> data -> model -> engine -> resume -> loop (step, log, eval, checkpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch

from pipeline import comm
from pipeline.config import ConfigError
from pipeline.continual import ContinualRun
from pipeline.data import DataError, DataFingerprint, PackedReader
from pipeline.engine.checkpoint import (BEST_TAG, BestCheckpoint, CheckpointError, Checkpointer, ClientState,
                                        RunConfigRecord)
from pipeline.engine.evaluation import evaluate, lm_loss
from pipeline.engine.plasticity import Plasticity
from pipeline.engine.preemption import PREEMPTED_EXIT_CODE, Preemption
from pipeline.engine.stability import BatchGuard, Drill, LossScaleWatch, RunAborted, describe_skip_counts
from pipeline.engine.setup import (check_precision_supported, configure_cpu_threads, configure_determinism,
                                   initialize, load_deepspeed_config, precision_of)
from pipeline.flops import MFU
from pipeline.metrics import MetricsSink, bits_per_byte, peak_memory_gb, read_metrics, setup_logging
from pipeline.model import HybridLM
from pipeline.progress import Progress
from pipeline.run_config import parse_run_config


def main(argv=None) -> int:
    # ---- config: YAML preset + overrides, DeepSpeed JSON; checked before any process group exists
    cfg = parse_run_config(argv)
    ds_config = load_deepspeed_config(cfg.deepspeed_config, cfg.train)
    check_precision_supported(ds_config, cfg.deepspeed_config, cfg.train.allow_cpu_fp16)
    configure_determinism(cfg.train.deterministic)

    rank, world_size = comm.init_distributed(cfg.train.collective_timeout_s)  # under deepspeed, srun, mpirun or alone
    configure_cpu_threads()  # after: under srun and mpirun the ranks per node are known only now
    run_dir = Path(cfg.train.out_dir)
    log = setup_logging(run_dir, rank)
    preemption = Preemption(cfg.train.preemption_signals)  # from here on a SIGTERM/SIGUSR1 means: checkpoint

    # ---- data: each rank reads its own slice of the packed token stream
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    # One process per node hashes the shards (every rank checks their sizes): nodes may hold their own copies.
    verify = int(os.environ.get("LOCAL_RANK", "0")) == 0
    # Checks some ranks make alone (shard checksums) end every rank, with the same sentence.
    with comm.fail_together(ConfigError, DataError, OSError):
        # A continual schedule trains tasks from named folders: its stream stands in for the reader.
        continual = ContinualRun(cfg, micro_batch, ds_config["gradient_accumulation_steps"], rank, world_size,
                                 verify, run_dir) if cfg.continual.enabled else None
        if continual is not None:
            cfg.train.max_steps = continual.total_steps
        train_reader = continual.stream if continual else PackedReader(
            cfg.data.data_dir, split="train", sequence_length=cfg.data.sequence_length, micro_batch_size=micro_batch,
            seed=cfg.data.seed, rank=rank, world_size=world_size, verify_checksums=verify,
            trace_file=run_dir / "samples" / f"rank{rank}.jsonl" if cfg.data.trace_samples else None,
            allow_changed=cfg.data.allow_changed)
        val_reader = continual.validation if continual else PackedReader(
            cfg.data.data_dir, split="validation", sequence_length=cfg.data.sequence_length,
            micro_batch_size=micro_batch, seed=cfg.data.seed, rank=rank, world_size=world_size, verify_checksums=verify)
        if train_reader.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                              f"({train_reader.vocab_size}) of {cfg.data.data_dir}/manifest.json")

    # ---- model and engine: identical initial weights on every rank, then per-rank dropout streams
    torch.manual_seed(cfg.train.seed)
    model = HybridLM(cfg.model)
    torch.manual_seed(cfg.train.seed + 1 + rank)
    engine, scheduler = initialize(model, ds_config, cfg.train, continual.lr_scheduler if continual else None,
                                   plasticity=cfg.plasticity)  # with plasticity.meta: the metaplastic optimizer
    # STDP on the spiking input weights and metaplasticity, beside backprop (off unless configured)
    plasticity = Plasticity(cfg.plasticity, engine, model) if cfg.plasticity.enabled else None
    if rank == 0:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
        shutil.copyfile(train_reader.tokenizer_path, run_dir / "tokenizer.model")
    d = train_reader.describe()
    log.info("data: %d train documents, %d tokens -> %d samples/epoch (dropped per epoch: %d samples, %d tail "
             "tokens); validation: %d documents, %d tokens", d["documents"], d["stream_tokens"], d["num_samples"],
             d["samples_dropped_per_epoch"], d["tail_tokens_dropped"], val_reader.num_documents, val_reader.num_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %s, ZeRO-2 on %d ranks (%s), micro batch %d x accumulation %d x seq %d",
             n_params / 1e6, precision_of(ds_config), world_size, engine.device, micro_batch,
             engine.gradient_accumulation_steps(), cfg.data.sequence_length)
    # Every rank measures the CPU peak at once, so the matmul shares the cores as training will.
    mfu = MFU(cfg.model, cfg.data.sequence_length, engine.device, world_size, cfg.train.peak_flops,
              {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision_of(ds_config), torch.float32))
    log.info("mfu: %s", mfu.describe())

    # ---- stability hooks: collective bad-batch skipping, loss-scale watch, fault drills
    guard = BatchGuard(cfg.stability, run_dir, train_reader)
    scale_watch = LossScaleWatch(engine, cfg.stability, ds_config)
    drill = Drill(cfg.stability)

    # ---- checkpoint state: every component that must survive a restart, registered once
    run_config = RunConfigRecord(cfg.to_dict())
    states = ClientState()
    # The data check first: on changed data its sentence, not the reader's, says what happened and what to do.
    if continual is None:  # a resume onto data that data_prep rewrote is refused (checkpoints from before: no check)
        states.register("data", DataFingerprint(cfg.data.data_dir, cfg.data.allow_changed), optional=True)
    states.register("reader", train_reader)
    states.register("guard", guard)
    states.register("scale_watch", scale_watch)
    states.register("run_config", run_config)
    best = BestCheckpoint()
    states.register("best", best, optional=True)  # checkpoints from before `best` existed still resume
    if continual is not None:  # the schedule, replay buffer, EWC and task matrix
        continual.attach(engine, guard)
        continual.register(states)
    if plasticity is not None:  # STDP's running rates and counters, the metaplastic reference's reset state
        plasticity.register(states)
        if continual is not None:
            continual.schedule.subscribe(plasticity)  # each task start retakes the metaplastic reference
    checkpointer = Checkpointer(run_dir, states, keep=cfg.train.keep_checkpoints, best=best)

    # ---- resume: the engine from DeepSpeed's checkpoint, then every registered state, then the RNG
    resumed_from = checkpointer.load(engine, cfg.train.resume)
    if resumed_from is not None:
        log.info("resumed from %s at step %d (epoch %d)%s", resumed_from, engine.global_steps, train_reader.epoch,
                 f", {len(guard.quarantined)} quarantined samples" if guard.quarantined else "")
        if run_config.changed:
            log.info("settings changed since that checkpoint: %s", ", ".join(run_config.changed))
    metrics = MetricsSink(run_dir, rank, engine.monitor)

    def run_eval(step: int) -> None:
        result = (continual.evaluate_current(step) if continual else
                  evaluate(engine, val_reader.iter_epoch_once(), cfg.train.eval_batches))
        text_bytes = None if continual else val_reader.manifest.split("validation").extra.get("text_bytes")
        if text_bytes:  # manifests written before data_prep counted bytes have none
            result["bpb"] = bits_per_byte(result["loss"], val_reader.num_tokens, text_bytes)
        log.info("eval step %d: loss %.4f  ppl %.2f  acc %.3f%s  (%d tokens)", step, result["loss"],
                 result["perplexity"], result["accuracy"], f"  bpb {result['bpb']:.4f}" if "bpb" in result else "",
                 result["tokens"])
        metrics.write("eval", step, result)
        # A continual schedule evaluates each task on its own data: its losses do not rank checkpoints.
        if cfg.train.keep_best and continual is None and best.improved(step, result["loss"]):
            log.info("best validation loss so far: checkpoint %s", checkpointer.save(engine, step, tag=BEST_TAG))

    def save(step: int) -> None:
        log.info("checkpoint %s", checkpointer.save(engine, step))

    # ---- the loop
    step = engine.global_steps
    start_step = step
    if continual is not None:
        continual.begin(metrics)  # a fresh run: the task matrix's row 0, then the first task starts
    if step == 0:
        run_eval(0)
    gas = engine.gradient_accumulation_steps()
    tokens_per_step = micro_batch * gas * world_size * cfg.data.sequence_length
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    steps_since_log, train_seconds = 0, 0.0  # throughput counts training time, not eval or checkpoints
    progress = Progress(log, cfg.train.max_steps, initial_step=step, enabled=rank == 0)
    while step < cfg.train.max_steps:
        t_step = time.time()
        reader_state_at_step_start = train_reader.state_dict()
        lr = scheduler.get_last_lr()[0]  # what this step trains with; the engine steps the schedule after it
        scale_watch.before_step()
        good, attempt = 0, 0
        try:
            # A skipped micro-batch is replaced by the next one, so every step gets its full count.
            while good < gas:
                batch = train_reader.next_batch()
                logits = engine(batch["input_ids"].to(engine.device))
                logits = drill.apply_to_logits(logits, step + 1, last_micro_batch=good == gas - 1)
                loss = drill.apply_to_loss(lm_loss(logits, batch["targets"].to(engine.device)), step + 1, attempt)
                attempt += 1
                reason = guard.check(loss, batch["sample_index"], step + 1, attempt - 1)
                if reason is not None:
                    log.warning("step %d: skipped a micro-batch on every rank (%s); see %s", step + 1, reason,
                                guard.path.name)
                    continue
                engine.backward(continual.objective(loss) if continual else loss)  # + the EWC penalty
                if plasticity is not None:
                    plasticity.accept_micro_batch()  # this micro-batch's spikes count toward the step's STDP
                engine.step()  # applies the optimizer only at the accumulation boundary
                loss_sum += loss.detach().double()
                good += 1
            step = engine.global_steps
            overflow = scale_watch.after_step(step)
            if plasticity is not None:
                plasticity.after_step()  # STDP on the fp32 masters, only if the optimizer step was applied
        except RunAborted as abort:
            # The partial step is dropped: the checkpoint holds the last applied step and the reader
            # position at its end, so a resume redoes this step (skipping what is now quarantined).
            if good < gas:
                train_reader.load_state_dict(reader_state_at_step_start)
            save(engine.global_steps)
            progress.close()
            log.error("%s", abort)
            return abort.exit_code
        if overflow is not None:
            log.warning("step %d: optimizer step skipped by the fp16 loss scaler (overflow): scale %s -> %s, "
                        "hysteresis left %s", step, overflow.get("scale_before"), overflow.get("scale_after"),
                        overflow.get("hysteresis_left"))
            metrics.write("overflow", step, overflow)
        steps_since_log += 1
        train_seconds += time.time() - t_step

        if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
            mean_loss = comm.all_reduce(loss_sum, out_device="cpu").item() / (world_size * steps_since_log * gas)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else None
            record = {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step * steps_since_log / train_seconds, "epoch": train_reader.epoch,
                      **scale_watch.state(), **describe_skip_counts(guard, scale_watch)}
            record.update(mfu=mfu(record["tokens_per_s"]), peak_memory_gb=peak_memory_gb(engine.device))
            record.update({k: v.item() for k, v in model.observables().items()})
            if continual is not None:
                record.update(continual.train_record())
            if plasticity is not None:
                record.update(plasticity.train_record())  # per layer: plastic update / optimizer update
            progress.update(step, record)  # the `step N: loss ...` line, and the bar on a terminal
            if overflow is None and grad_norm is not None and grad_norm > cfg.stability.grad_norm_warning:
                log.warning("step %d: gradient norm %.1f exceeds stability.grad_norm_warning=%g", step, grad_norm,
                            cfg.stability.grad_norm_warning)
            metrics.write("train", step, record)
            loss_sum.zero_()
            steps_since_log, train_seconds = 0, 0.0

        if continual is not None:
            continual.after_step(step)  # replay feed; after a task's last step its end hooks, before any checkpoint
        last = step == cfg.train.max_steps
        stopping = cfg.train.exit_after_steps and step - start_step >= cfg.train.exit_after_steps
        preempted = preemption.requested()  # every rank, every step: one all-reduce of one number
        if preempted and not last:
            save(step)
            progress.close()
            log.warning("preempted (%s) after step %d: checkpoint saved; exit code %d asks for a requeue, and "
                        "the next run resumes with --train.resume auto", preemption.describe(), step,
                        PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE
        if step % cfg.train.eval_interval == 0 or last:
            run_eval(step)
        if step % cfg.train.checkpoint_interval == 0 or last or stopping:
            save(step)
        if stopping and not last:
            log.info("exit_after_steps=%d reached at step %d; resume with --train.resume auto",
                     cfg.train.exit_after_steps, step)
            break

    progress.close()
    skips = describe_skip_counts(guard, scale_watch)
    if any(v for k, v in skips.items() if k.startswith("skipped")):
        log.info("skipped: %s (details in %s)", skips, guard.path)
    evals = read_metrics(run_dir, "eval") if rank == 0 else []
    if len(evals) >= 2:
        log.info("validation loss %.4f (step %d) -> %.4f (step %d)", evals[0]["loss"], evals[0]["step"],
                 evals[-1]["loss"], evals[-1]["step"])
    log.info("done at step %d. run folder: %s", step, run_dir.resolve())
    log.info("  checkpoints: %s  log: %s  metrics: %s", checkpointer.dir, run_dir / "training.log",
             run_dir / "metrics.jsonl")
    if continual is not None:
        log.info("  %s", continual.summary(run_dir))
    if cfg.train.report and rank == 0:
        from pipeline.report import build_report  # matplotlib: imported on the one rank that draws

        try:
            log.info("  report: %s", build_report(run_dir))
        except Exception as err:  # a plotting problem must not fail a finished run
            log.warning("the run report could not be written (%s: %s); retry with python -m pipeline.report %s",
                        type(err).__name__, err, run_dir)
    return 0


def _lost_peer_exit(err: BaseException) -> None:
    """A collective failed because a peer is gone: one sentence, and out at once (tearing down the
    process group or DeepSpeed's atexit work would wait on the lost peer all over again)."""
    message = comm.lost_peer(err)
    if message is None:
        return
    import logging

    from pipeline.metrics import LOGGER_NAME

    log = logging.getLogger(LOGGER_NAME)  # training.log's (rank 0) and the console's
    log.error("%s", message)
    print(f"error: rank {comm.world()[0]}: {message}", file=sys.stderr, flush=True)
    for handler in log.handlers:
        handler.flush()
    os._exit(comm.LOST_PEER_EXIT_CODE)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError, comm.PeerFailed) as err:
        # One sentence naming the file or field, not a traceback from deep inside a library.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        _lost_peer_exit(err)
        raise
