"""Typed configuration: the one source of truth for every option.

jsonargparse reads these dataclasses from YAML files and command-line overrides
(`--model.hidden_dim 256`); the field docstrings below become `--help`.
`__post_init__` rejects invalid combinations with one sentence naming the fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the field(s)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Architecture of `pipeline.model.HybridLM` (field names follow the old trainer's flags)."""

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

    def __post_init__(self) -> None:
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


@dataclass
class DataConfig:
    """Where the tokenized shards are and how samples are cut from them."""

    data_dir: str = "data/demo"
    """Folder holding `manifest.json` and the Arrow shards written by `data_prep/`."""
    sequence_length: int = 128
    """Tokens per training sample (each sample reads sequence_length + 1 tokens: inputs and shifted targets)."""
    seed: int = 1234
    """Seed of the sample order; the order is a pure function of (seed, epoch, data config)."""

    def __post_init__(self) -> None:
        _require(self.sequence_length >= 2, f"data.sequence_length must be at least 2, got {self.sequence_length}")


@dataclass
class TrainConfig:
    """The training loop: schedule, evaluation, checkpoints, logging."""

    out_dir: str = "outputs/run"
    """Run folder: checkpoints, training.log, metrics.csv."""
    max_steps: int = 200
    """Optimizer steps to train for."""
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
    log_interval: int = 10
    """Log training metrics every N steps."""
    seed: int = 1234
    """Seed of parameter initialisation and dropout."""
    resume: str = "none"
    """`auto`: continue from the newest checkpoint in out_dir if there is one; `none`; or a checkpoint folder."""
    exit_after_steps: int = 0
    """Checkpoint and stop after this many steps of this invocation (0: off); for time-boxed batch jobs."""
    deterministic: bool = False
    """Use deterministic GPU kernels (slower), so a rerun or a resume on a GPU reproduces the losses bit for bit."""
    allow_cpu_fp16: bool = False
    """Declare fp16 supported on DeepSpeed's CPU accelerator (slow emulation) to rehearse the real fp16 path in tests."""

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, "train.max_steps must be positive")
        _require(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must lie in [0, 1]")
        _require(self.warmup_steps >= 0, "train.warmup_steps must be non-negative")
        for name in ("eval_interval", "checkpoint_interval", "log_interval"):
            _require(getattr(self, name) > 0, f"train.{name} must be positive")


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
