"""Typed configuration: the one source of truth for every option.

jsonargparse reads these dataclasses from YAML files and command-line overrides
(`--model.hidden_dim 256`); the field docstrings below become `--help`.
`__post_init__` rejects invalid combinations with one sentence naming the fields.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import List, Literal, Optional


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the field(s)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Architecture of the model built by `pipeline.model.build_model`: the hybrid (`pipeline.model.HybridLM`, field
    names follow the old trainer's flags) or the baseline Transformer (`pipeline.model.TransformerLM`)."""

    arch: Literal["hybrid", "transformer"] = "hybrid"
    """`hybrid`: the liquid / spiking / Mamba model. `transformer`: the baseline to compare it with (pre-norm RMSNorm,
    rotary positions, SwiGLU MLP, causal attention, no biases; it reads vocab_size, hidden_dim, num_layers,
    num_attention_heads, ffn_dim, dropout and tie_embeddings, and refuses the hybrid's own options)."""
    vocab_size: int = 8000
    """Number of token ids; must equal the tokenizer's vocabulary (checked against the data manifest)."""
    hidden_dim: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of hybrid blocks."""
    liquid_units: int = 64
    """Width of the liquid (continuous-time) layer inside each block."""
    liquid_backbone: Literal["scan", "cfc"] = "scan"
    """`scan`: input-dependent time constant, solved exactly as a diagonal linear recurrence (fast).
    `cfc`: the nonlinear closed-form continuous-time cell of `ncps` (state-dependent gates, slower)."""
    spiking_units: int = 32
    """Number of leaky integrate-and-fire neurons inside each block."""
    spike_threshold: float = 1.0
    """Membrane potential at which a LIF neuron fires."""
    beta: float = 0.95
    """Membrane decay per step of the LIF neurons (0 < beta < 1)."""
    num_spike_steps: int = 1
    """Sub-steps each token's input current is integrated for; the spike rate is averaged over them."""
    spike_reset: Literal["subtract", "zero", "none"] = "subtract"
    """What a spike does to its membrane: subtract the threshold, reset to zero, or nothing."""
    surrogate: Literal["atan", "fast_sigmoid"] = "atan"
    """Surrogate gradient of the spike's step function."""
    surrogate_slope: float = 2.0
    """Sharpness of the surrogate (alpha for atan, slope for fast_sigmoid)."""
    num_attention_heads: int = 4
    """Heads of the causal self-attention layers."""
    attention_every: int = 0
    """Insert a causal attention layer after every N-th block (0: no attention layers)."""
    use_mamba: bool = True
    """Add a Mamba selective state-space branch to every block."""
    integration_mode: Literal["sequential", "parallel", "bidirectional"] = "sequential"
    """How the liquid and Mamba streams are combined inside a block."""
    mamba_d_state: int = 16
    """Mamba state size N."""
    mamba_d_conv: int = 4
    """Mamba causal depthwise convolution width."""
    mamba_expand: int = 2
    """Mamba inner width = expand * hidden_dim."""
    mamba_backend: Literal["auto", "torch", "cuda"] = "auto"
    """`auto`: mamba_ssm's CUDA kernels when on a GPU with mamba_ssm installed, else pure PyTorch;
    `torch`: always the pure-PyTorch scan; `cuda`: require mamba_ssm (error if it cannot be imported)."""
    spike_to_mamba_method: Literal["rate", "temporal", "potential"] = "potential"
    """How spikes are encoded for the Mamba stream (all causal)."""
    spike_temporal_tau: float = 20.0
    """Time constant (tokens) of the causal exponential kernel of the `temporal` encoding."""
    spike_rate_window: int = 10
    """Trailing window (tokens) of the `rate` encoding's causal moving average."""
    use_adaptive_gating: bool = False
    """Fuse streams with a learned per-head sigmoid gate instead of a sum."""
    num_gate_heads: int = 4
    """Heads of the adaptive gate."""
    use_cross_attention: bool = False
    """Causal cross-attention between the liquid and Mamba streams."""
    cross_attn_heads: int = 4
    """Heads of the liquid<->Mamba cross-attention."""
    dropout: float = 0.0
    """Dropout on the residual branches."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    max_position_embeddings: int = 0
    """Learned absolute positions up to this length (0: none; the recurrences carry position)."""
    ffn_dim: int = 0
    """`arch: transformer`: inner width of the SwiGLU MLP (0: 8/3 x hidden_dim rounded up to a multiple of 16);
    `python -m pipeline.compare` sets it to match the hybrid's parameter count."""

    def __post_init__(self) -> None:
        _require(self.ffn_dim >= 0, f"model.ffn_dim must be 0 (default width) or positive, got {self.ffn_dim}")
        if self.arch == "transformer":
            defaults = ModelConfig.__dataclass_fields__
            for name in HYBRID_ONLY_FIELDS:
                _require(getattr(self, name) == defaults[name].default,
                         f"model.{name} is an option of model.arch=hybrid only; remove it for model.arch=transformer")
            heads = self.num_attention_heads
            _require(heads > 0 and self.hidden_dim % heads == 0 and (self.hidden_dim // heads) % 2 == 0,
                     f"model.num_attention_heads ({self.num_attention_heads}) must divide model.hidden_dim "
                     f"({self.hidden_dim}) into heads of even width (rotary positions rotate pairs)")
        else:
            _require(self.ffn_dim == 0, "model.ffn_dim is an option of model.arch=transformer only; remove it for "
                     "model.arch=hybrid")
        _require(self.vocab_size > 0, f"model.vocab_size must be positive, got {self.vocab_size}")
        _require(self.hidden_dim > 0 and self.num_layers > 0,
                 "model.hidden_dim and model.num_layers must be positive")
        _require(0.0 < self.beta < 1.0, f"model.beta must lie in (0, 1), got {self.beta}")
        _require(self.spike_threshold > 0, f"model.spike_threshold must be positive, got {self.spike_threshold}")
        _require(self.num_spike_steps >= 1, "model.num_spike_steps must be at least 1")
        _require(self.attention_every == 0 or self.hidden_dim % self.num_attention_heads == 0,
                 f"model.num_attention_heads ({self.num_attention_heads}) must divide model.hidden_dim ({self.hidden_dim})")
        _require(self.use_mamba or self.integration_mode == "sequential",
                 f"model.integration_mode={self.integration_mode} needs model.use_mamba=true")
        _require(self.use_mamba or not self.use_cross_attention,
                 "model.use_cross_attention needs model.use_mamba=true")
        _require(not self.use_cross_attention or self.hidden_dim % self.cross_attn_heads == 0,
                 f"model.cross_attn_heads ({self.cross_attn_heads}) must divide model.hidden_dim ({self.hidden_dim})")
        _require(not self.use_adaptive_gating or self.hidden_dim % self.num_gate_heads == 0,
                 f"model.num_gate_heads ({self.num_gate_heads}) must divide model.hidden_dim ({self.hidden_dim})")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must lie in [0, 1), got {self.dropout}")
        _require(self.liquid_units > 0 and self.spiking_units > 0,
                 "model.liquid_units and model.spiking_units must be positive")
        _require(self.surrogate_slope > 0, f"model.surrogate_slope must be positive, got {self.surrogate_slope}")
        _require(self.attention_every >= 0, "model.attention_every must be 0 (none) or positive")
        _require(self.max_position_embeddings >= 0, "model.max_position_embeddings must be 0 or positive")
        _require(self.mamba_d_state >= 1 and self.mamba_d_conv >= 1 and self.mamba_expand >= 1,
                 "model.mamba_d_state, model.mamba_d_conv and model.mamba_expand must be at least 1")
        _require(self.spike_temporal_tau > 0, f"model.spike_temporal_tau must be positive, got {self.spike_temporal_tau}")
        _require(self.spike_rate_window >= 1, "model.spike_rate_window must be at least 1")
        _require(self.integration_mode != "bidirectional" or self.use_cross_attention,
                 "model.integration_mode=bidirectional exchanges the streams through cross-attention, "
                 "so it needs model.use_cross_attention=true")
        _require(not self.use_cross_attention or self.integration_mode != "sequential",
                 "model.use_cross_attention needs model.integration_mode parallel or bidirectional "
                 "(sequential has a single stream)")
        _require(self.use_mamba or not self.use_adaptive_gating,
                 "model.use_adaptive_gating fuses the liquid and Mamba streams, so it needs model.use_mamba=true")


# What only the hybrid reads: a Transformer config that sets any of these (to other than its default) is refused.
HYBRID_ONLY_FIELDS = ("liquid_units", "liquid_backbone", "spiking_units", "spike_threshold", "beta", "num_spike_steps",
                      "spike_reset", "surrogate", "surrogate_slope", "attention_every", "use_mamba", "integration_mode",
                      "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_backend", "spike_to_mamba_method",
                      "spike_temporal_tau", "spike_rate_window", "use_adaptive_gating", "num_gate_heads",
                      "use_cross_attention", "cross_attn_heads", "max_position_embeddings")


@dataclass
class DataConfig:
    """Where the tokenized shards are and how samples are cut from them."""

    data_dir: str = "data/demo"
    """Folder holding `manifest.json` and the Arrow shards written by `data_prep/`."""
    sequence_length: int = 128
    """Tokens per training sample (each sample reads sequence_length + 1 tokens: inputs and shifted targets)."""
    seed: int = 1234
    """Seed of the sample order; the order is a pure function of (seed, epoch, data config)."""
    trace_samples: bool = False
    """Append the global sample ids each rank reads to `<out_dir>/samples/rank<R>.jsonl` (one line per
    micro-batch, across restarts): an audit of which samples a run saw."""
    allow_changed: bool = False
    """Resume even when the training split's shards (the reader's manifest fingerprint) differ from the
    one the checkpoint was trained on (for example after data_prep rewrote it); the sample order then
    continues over the new data."""

    def __post_init__(self) -> None:
        _require(self.sequence_length >= 2, f"data.sequence_length must be at least 2, got {self.sequence_length}")


@dataclass
class TrainConfig:
    """The training loop: schedule, evaluation, checkpoints, logging."""

    out_dir: str = "outputs/run"
    """Run folder: checkpoints, training.log, metrics.jsonl, report/."""
    max_steps: int = 200
    """Optimizer steps to train for (with `continual.tasks`: 0 or the sum of the tasks' steps)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay, as a fraction of `lr`."""
    warmup_steps: int = 20
    """Linear warmup steps; the first step already trains at lr/warmup_steps, never at 0."""
    weight_decay: float = 0.1
    """AdamW weight decay (norms, biases, embeddings and the tied head, A_log and D are exempt)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    micro_batch_size: Optional[int] = None
    """Samples per rank per micro-step; overrides `train_micro_batch_size_per_gpu` of the DeepSpeed JSON."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-steps per optimizer step; overrides the DeepSpeed JSON's value."""
    eval_interval: int = 50
    """Evaluate on the validation split every N steps (and after the last step)."""
    eval_batches: int = 0
    """Validation micro-batches per rank per evaluation (0: the whole validation split)."""
    checkpoint_interval: int = 100
    """Save a checkpoint every N steps (and after the last step)."""
    keep_checkpoints: int = 2
    """Keep this many newest checkpoints (0: keep all)."""
    keep_best: bool = True
    """Also keep the checkpoint of the lowest validation loss as `checkpoints/best` (saved at each new best,
    never pruned; `launch/generate.py --tag best`)."""
    log_interval: int = 10
    """Log training metrics (and refresh the progress bar) every N steps."""
    peak_flops: Optional[float] = None
    """Peak FLOP/s of one device for MFU (default: a datasheet value for known GPUs in the training precision,
    measured with a short matmul on CPUs and unknown devices; the log states which)."""
    tensorboard: Optional[str] = None
    """Folder for DeepSpeed's TensorBoard monitor, fed with every metrics.jsonl record (needs `tensorboard`)."""
    csv: Optional[str] = None
    """Folder for DeepSpeed's CSV monitor, fed with every metrics.jsonl record."""
    wandb: Optional[str] = None
    """Weights & Biases project: log every metrics.jsonl record, the run config and the report's plots there
    (rank 0; needs `pip install -r requirements-extras.txt`; `WANDB_MODE=offline` keeps it local)."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) of the project (default: the logged-in user's)."""
    wandb_name: Optional[str] = None
    """W&B run name (default: the name of out_dir). A resumed run keeps its W&B run (id in out_dir/wandb_run_id)."""
    wandb_tags: List[str] = field(default_factory=list)
    """W&B run tags."""
    report: bool = True
    """Write `<out_dir>/report/report.md` and its plots at the end of training (`python -m pipeline.report`)."""
    seed: int = 1234
    """Seed of parameter initialisation and dropout."""
    resume: str = "none"
    """`auto`: continue from the newest checkpoint in out_dir if there is one; `none`; or a checkpoint folder."""
    max_seconds: float = 0.0
    """Stop after this many seconds spent in training steps (evaluation and checkpoints not counted; 0: no limit),
    at the same step on every rank, with the last step's evaluation and checkpoint. The LR schedule still spans
    max_steps: set max_steps to what fits in the time (`python -m pipeline.compare --budget seconds:S` does)."""
    exit_after_steps: int = 0
    """Checkpoint and stop after this many steps of this invocation (0: off); for time-boxed batch jobs."""
    deterministic: bool = False
    """Use deterministic GPU kernels (slower), so a rerun or a resume on a GPU reproduces the losses bit for bit."""
    allow_cpu_fp16: bool = False
    """Declare fp16 supported on DeepSpeed's CPU accelerator (slow emulation) to rehearse the real fp16 path in tests."""
    preemption_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals (SLURM: SIGTERM on preemption, `--signal=USR1@<s>` before the time limit) after which every
    rank finishes its step, saves a checkpoint and exits with code 75 (requeue); [] to keep the default actions."""
    collective_timeout_s: float = 300.0
    """Longest wait of any collective (start-up, gradient reduction, checkpoint barriers) for a peer rank. A
    rank lost to a kill, a crash or a node failure makes every other rank exit within this time with a
    message naming the likely cause and exit code 76 (requeue). Keep it above the slowest checkpoint save."""

    def __post_init__(self) -> None:
        # 0 is for continual schedules, which set it to the sum of their tasks (checked in RunConfig).
        _require(self.max_steps >= 0, "train.max_steps must be positive")
        _require(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must lie in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be non-negative")
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s must be positive")
        _require(self.max_seconds >= 0, f"train.max_seconds must be 0 (no limit) or positive, got {self.max_seconds}")
        for name in ("eval_interval", "checkpoint_interval", "log_interval"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive")
        for name in self.preemption_signals:
            _require(name in signal.Signals.__members__ and name not in ("SIGKILL", "SIGSTOP"),
                     f"train.preemption_signals: {name!r} is not a signal that can be caught (e.g. SIGTERM, SIGUSR1)")


@dataclass
class StabilityConfig:
    """Engine hooks that keep long runs alive: collective bad-batch skipping, loss-scale watch, drills."""

    skip_nonfinite_loss: bool = True
    """Skip, on every rank at once, a micro-batch whose loss is NaN/inf on any rank (no backward, scaler untouched)."""
    max_consecutive_skips: int = 20
    """After this many skipped micro-batches in a row: save a checkpoint and exit non-zero (0: never)."""
    quarantine_file: str = "skipped_batches.jsonl"
    """Record of skipped batches, in the run folder; samples listed there are skipped again on resume."""
    skip_loss_spikes: bool = False
    """Also skip micro-batches whose loss exceeds `spike_factor` x the running median of recent steps."""
    spike_factor: float = 3.0
    """Loss-spike threshold as a multiple of the running median."""
    spike_window: int = 50
    """Steps in the running median; spikes are only judged once the window is full."""
    grad_norm_warning: float = 100.0
    """Warn when the global gradient norm (before clipping) exceeds this."""
    exit_at_min_loss_scale: bool = True
    """fp16: an overflow while the scale sits at `min_loss_scale` saves a checkpoint and exits non-zero,
    instead of DeepSpeed's bare exception without a checkpoint."""
    reset_loss_scale: bool = False
    """fp16: on resume, restart the loss scaler from the DeepSpeed JSON instead of the checkpointed scale."""
    drill_nan_loss: List[str] = field(default_factory=list)
    """Drill: poison the loss with NaN at `STEP@RANK` (e.g. `5@1`; `5@*` for every rank); first micro-batch of that step."""
    drill_inf_grad_steps: List[int] = field(default_factory=list)
    """Drill: make every gradient of these steps infinite (the last micro-batch), as an fp16 overflow would."""
    drill_nan_fraction: float = 0.0
    """Drill: poison this fraction of micro-batches on random ranks (seeded by `drill_seed`)."""
    drill_seed: int = 0
    """Seed of the random drill."""

    def __post_init__(self) -> None:
        _require(self.max_consecutive_skips >= 0, "stability.max_consecutive_skips must be non-negative")
        _require(self.spike_factor > 1.0, f"stability.spike_factor must exceed 1, got {self.spike_factor}")
        _require(self.spike_window >= 3, "stability.spike_window must be at least 3")
        _require(0.0 <= self.drill_nan_fraction < 1.0, "stability.drill_nan_fraction must lie in [0, 1)")
        for item in self.drill_nan_loss:
            step, _, rank = str(item).partition("@")
            _require(step.isdigit() and (rank == "*" or rank.isdigit()),
                     f"stability.drill_nan_loss entry {item!r} must look like STEP@RANK or STEP@*")


@dataclass
class TaskSpec:
    """One task of a continual schedule: where its data is and how long it trains."""

    name: str
    """Name of the task in logs, metrics and the task matrix (unique; not `init`, the matrix's first row)."""
    data_dir: Optional[str] = None
    """Folder of tokenized shards (`data_prep` output); give this or `data_dirs`."""
    data_dirs: List[str] = field(default_factory=list)
    """Several folders blended per sample, in the proportions of `weights`."""
    weights: List[float] = field(default_factory=list)
    """Blend weights of `data_dirs` (positive; normalised to sum 1; default: equal)."""
    steps: int = 0
    """Optimizer steps of this task; give this or `tokens`."""
    tokens: int = 0
    """Budget in tokens of this task's own data (replayed samples do not count), rounded up to whole steps."""
    lr: Optional[float] = None
    """Peak learning rate of this task (default: train.lr)."""


@dataclass
class ContinualConfig:
    """A sequence of tasks trained one after the other, with replay, EWC and a task x task evaluation matrix.

    Off unless `tasks` or `num_tasks` is set. Task boundaries fall on optimizer steps, identical on every rank."""

    tasks: List[TaskSpec] = field(default_factory=list)
    """The tasks, trained in this order; `data.data_dir` is then not used."""
    num_tasks: int = 0
    """Instead of `tasks`: split `data.data_dir` into this many tasks by document ranges (`part1`, `part2`, ...),
    `train.max_steps` shared out evenly (the old trainer's `--num-tasks`)."""
    rewarm_steps: Optional[int] = None
    """Linear LR warm-up at the start of every task, then that task's cosine decay to lr*min_lr_ratio
    (default: train.warmup_steps; capped at each task's length)."""
    replay_ratio: float = 0.0
    """Share of each micro-batch drawn from earlier tasks (rounded to whole samples; 0: no replay)."""
    replay_buffer_size: int = 20000
    """Samples kept for replay: a uniform reservoir over all earlier tasks' trained samples (sample ids, not tokens)."""
    ewc_lambda: float = 0.0
    """EWC strength: the loss gains (ewc_lambda/2) * sum F (theta - theta*)^2 with the Fisher F normalised to
    mean 1 per task, so it does not depend on the loss scale or model size (0: off)."""
    ewc_gamma: float = 1.0
    """Online EWC: the accumulated Fisher decays by this factor at each task boundary (1.0: plain EWC)."""
    ewc_fisher_batches: int = 8
    """Micro-batches per rank of the finished task's training data for its Fisher (per-sample squared gradients)."""
    eval_batches: int = 50
    """Validation micro-batches per rank per task (and per folder of a blend) for the task matrix
    (0: the whole split)."""

    @property
    def enabled(self) -> bool:
        return bool(self.tasks) or self.num_tasks > 0

    def __post_init__(self) -> None:
        _require(not (self.tasks and self.num_tasks), "continual.tasks and continual.num_tasks exclude each other: "
                 "give the tasks or the number of parts of data.data_dir")
        _require(self.num_tasks != 1 and self.num_tasks >= 0,
                 f"continual.num_tasks must be 0 (off) or at least 2, got {self.num_tasks}")
        names = set()
        for i, task in enumerate(self.tasks):
            where = f"continual.tasks[{i}]"
            _require(bool(task.name) and task.name != "init" and task.name not in names,
                     f"{where}.name must be a unique non-empty name other than 'init', got {task.name!r}")
            names.add(task.name)
            _require((task.data_dir is None) != (not task.data_dirs),
                     f"{where}.data_dir or {where}.data_dirs must be given (one of them, not both)")
            _require(not task.weights or len(task.weights) == len(task.data_dirs),
                     f"{where}.weights has {len(task.weights)} entries for {len(task.data_dirs)} data_dirs")
            _require(all(w > 0 for w in task.weights), f"{where}.weights must be positive, got {task.weights}")
            _require((task.steps > 0) != (task.tokens > 0),
                     f"{where}.steps or {where}.tokens must be positive (one of them, not both)")
            _require(task.steps >= 0 and task.tokens >= 0, f"{where}.steps and {where}.tokens must not be negative")
            _require(task.lr is None or task.lr > 0, f"{where}.lr must be positive, got {task.lr}")
        _require(self.rewarm_steps is None or self.rewarm_steps >= 0, "continual.rewarm_steps must be non-negative")
        _require(0.0 <= self.replay_ratio < 1.0, f"continual.replay_ratio must lie in [0, 1), got {self.replay_ratio}")
        _require(self.replay_buffer_size >= 1, "continual.replay_buffer_size must be positive")
        _require(self.ewc_lambda >= 0, f"continual.ewc_lambda must be non-negative, got {self.ewc_lambda}")
        _require(0.0 <= self.ewc_gamma <= 1.0, f"continual.ewc_gamma must lie in [0, 1], got {self.ewc_gamma}")
        _require(self.ewc_fisher_batches >= 1, "continual.ewc_fisher_batches must be at least 1")
        _require(self.eval_batches >= 0, "continual.eval_batches must be non-negative")


@dataclass
class PlasticityConfig:
    """Local plasticity beside backprop (`pipeline/plasticity/`): STDP on the weights that feed the LIF
    neurons, and metaplastic consolidation inside the optimizer. Both off by default; both act on the fp32 master
    weights under ZeRO-2, identically on every rank, and never on a step the fp16 loss scaler skips."""

    stdp: Literal["none", "pair", "homeostatic"] = "none"
    """STDP on every block's `spike_proj` weight (input: the normed residual stream; output: the LIF spikes), applied
    after each optimizer step: `pair` = the trace rule A+ post x trace_pre - A- trace_post x pre (batch x time mean);
    `homeostatic` = the same with each neuron's depression scaled by (its running rate / stdp_target_rate), which
    pulls rates toward the target. The old `use_stdp` + `stdp_type` (classical -> pair)."""
    stdp_learning_rate: float = 0.01
    """eta: the STDP update is eta * dW, fp32, every applied optimizer step; independent of the LR schedule."""
    stdp_tau_plus: float = 20.0
    """Time constant (tokens) of the pre-synaptic trace, trace <- trace * (1 - 1/tau) + x (at least 1)."""
    stdp_tau_minus: float = 20.0
    """Time constant (tokens) of the post-synaptic spike trace (at least 1)."""
    stdp_a_plus: float = 0.005
    """A+: potentiation amplitude (post spike after or with pre activity)."""
    stdp_a_minus: float = 0.00525
    """A-: depression amplitude (pre activity after a post spike)."""
    stdp_target_rate: float = 0.1
    """`homeostatic`: the firing rate (spikes per token) each neuron is pulled toward."""
    stdp_rate_tau: float = 100.0
    """`homeostatic`: time constant (optimizer steps) of each neuron's running firing rate."""
    stdp_max_update: float = 0.01
    """Bound: per layer and step, ||eta dW|| is clipped to this fraction of ||W||."""
    meta: bool = False
    """Metaplasticity (Laborieux et al. 2021, for real weights): an optimizer update that moves a weight further
    from its value at the task start is scaled by 1 - tanh^2(meta_strength * |W - W_start|); norms, biases and
    other 1-D parameters are exempt. The reference resets at each continual task start (else: the run's start)."""
    meta_strength: float = 20.0
    """m of the metaplastic attenuation: half of an outward update survives at |W - W_start| = 0.88 / m."""

    @property
    def enabled(self) -> bool:
        return self.stdp != "none" or self.meta

    def __post_init__(self) -> None:
        _require(self.stdp_learning_rate > 0, f"plasticity.stdp_learning_rate must be positive, got {self.stdp_learning_rate}")
        for name in ("stdp_tau_plus", "stdp_tau_minus", "stdp_rate_tau"):
            _require(getattr(self, name) >= 1.0, f"plasticity.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("stdp_a_plus", "stdp_a_minus"):
            _require(getattr(self, name) >= 0, f"plasticity.{name} must be non-negative, got {getattr(self, name)}")
        _require(0.0 < self.stdp_target_rate <= 1.0,
                 f"plasticity.stdp_target_rate must lie in (0, 1] spikes per token, got {self.stdp_target_rate}")
        _require(self.stdp_max_update > 0, f"plasticity.stdp_max_update must be positive, got {self.stdp_max_update}")
        _require(self.meta_strength > 0, f"plasticity.meta_strength must be positive, got {self.meta_strength}")
