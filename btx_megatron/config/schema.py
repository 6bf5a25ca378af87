"""Typed run configuration.

Every field maps to a Megatron-LM flag of the same name (``num_layers`` <-> ``--num-layers``);
:mod:`btx_megatron.config.args` builds the command line from these dataclasses, so the field
docstrings (``help=`` metadata) are the flag documentation. Static checks live in
``__post_init__``; checks that need the world size live in :meth:`Config.validate_layout`.
User mistakes raise ``ValueError`` naming the flag and the fix. The model section
(:class:`~btx_megatron.config.model.ModelConfig`) lives in :mod:`btx_megatron.config.model`;
the ``flag`` field and the checks shared by every section in :mod:`btx_megatron.config.fields`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .fields import flag, require, require_positive
from .model import ModelConfig


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size is world / (TP * PP * CP)."""

    tensor_model_parallel_size: int = flag(1, "Tensor model parallel size (TP).")
    pipeline_model_parallel_size: int = flag(1, "Pipeline model parallel size (PP).")
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        None, "Layers per virtual pipeline stage (interleaved 1F1B schedule)."
    )
    expert_model_parallel_size: int = flag(1, "Expert model parallel size (EP).")
    expert_tensor_parallel_size: int | None = flag(
        None, "Tensor parallel size inside experts (default: TP)."
    )
    sequence_parallel: bool = flag(False, "Sequence parallelism (needs TP > 1).")
    use_distributed_optimizer: bool = flag(False, "Shard optimizer state over data parallel ranks.")
    overlap_grad_reduce: bool = flag(False, "Overlap the gradient reduce-scatter with backward.")
    overlap_param_gather: bool = flag(False, "Overlap the parameter all-gather with forward.")
    distributed_backend: str | None = flag(
        None, "torch.distributed backend (default nccl with CUDA, gloo without).", choices=(None, "nccl", "gloo")
    )
    distributed_timeout_minutes: int = flag(10, "Collective timeout.")

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1.")
        require_positive(self, ("distributed_timeout_minutes",))
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
        require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1; drop the flag at TP=1.",
        )
        if self.overlap_param_gather:
            require(
                self.use_distributed_optimizer,
                "--overlap-param-gather needs --use-distributed-optimizer.",
            )


@dataclass
class PrecisionConfig:
    bf16: bool = flag(False, "bfloat16 mixed precision (fp32 master weights).")
    fp16: bool = flag(False, "float16 mixed precision with dynamic loss scaling.")
    fp8_format: str | None = flag(
        None, "FP8 through Transformer Engine: hybrid (E4M3 fwd, E5M2 bwd) or e4m3.", choices=(None, "hybrid", "e4m3")
    )
    fp8_recipe: str = flag("delayed", "TE FP8 recipe.", choices=("delayed", "tensorwise", "mxfp8", "blockwise"))
    fp8_amax_history_len: int = flag(1024, "FP8 amax history length (delayed scaling).")
    fp8_amax_compute_algo: str = flag("max", "FP8 amax reduction.", choices=("max", "most_recent"))
    loss_scale: float | None = flag(None, "Static loss scale for fp16 (default dynamic).")
    initial_loss_scale: float = flag(2.0**16, "Initial dynamic loss scale (fp16).")
    attention_softmax_in_fp32: bool = flag(True, "Attention softmax in fp32.")

    def __post_init__(self) -> None:
        require(not (self.bf16 and self.fp16), "Choose one of --bf16 and --fp16.")
        if self.fp8_format is not None:
            require(
                self.bf16 or self.fp16,
                "--fp8-format runs inside bf16/fp16 mixed precision; add --bf16.",
            )

    @property
    def params_dtype_name(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"


@dataclass
class TrainConfig:
    """Optimisation and schedule (paper: AdamW, wd 0.1, LR 1e-4, 100 warmup, cosine to 10%)."""

    lr: float = flag(1e-4, "Peak learning rate.")
    min_lr: float = flag(0.0, "Learning rate at the end of the decay.")
    lr_warmup_iters: int = flag(0, "Linear warmup iterations.")
    lr_decay_iters: int | None = flag(None, "Decay iterations (default: train iters).")
    lr_decay_style: str = flag("cosine", "Decay shape.", choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    weight_decay: float = flag(0.01, "AdamW weight decay.")
    adam_beta1: float = flag(0.9, "Adam beta1.")
    adam_beta2: float = flag(0.999, "Adam beta2.")
    adam_eps: float = flag(1e-8, "Adam epsilon.")
    clip_grad: float = flag(1.0, "Global gradient-norm clip (0 disables).")
    micro_batch_size: int = flag(1, "Sequences per micro batch per data-parallel rank.")
    global_batch_size: int | None = flag(
        None, "Sequences per optimizer step over all ranks (default micro batch * DP)."
    )
    train_iters: int = flag(10, "Optimizer steps to train.")
    seed: int = flag(1234, "Random seed (weights, data order, dropout).")
    recompute_granularity: str | None = flag(
        None, "Activation recomputation.", choices=(None, "full", "selective")
    )
    recompute_method: str = flag("uniform", "Full recompute method.", choices=("uniform", "block"))
    recompute_num_layers: int = flag(1, "Layers per recompute chunk (full).")
    freeze_experts: bool = flag(False, "Train attention, norms, embeddings and routers only.")
    freeze_router: bool = flag(False, "Keep the MoE router weights fixed.")
    train_experts: list[str] = flag(
        [], "Train only these experts (names from the merged checkpoint's manifest, or indices) and freeze "
        "every other weight (FlexOlmo-style expert training); frozen weights have no optimizer state.", nargs="+"
    )
    train_router: bool = flag(False, "With --train-experts: also train those experts' rows of every router.")
    trained_expert_ids: tuple[int, ...] | None = None  # --train-experts resolved to indices (pretrain_mix)
    deterministic: bool = flag(False, "Deterministic algorithms (bit-exact reruns on GPU).")
    check_for_nan_in_loss_and_grad: bool = flag(
        True, "Stop (without saving) on a non-finite loss or gradient norm; names the iteration."
    )
    spiky_loss_factor: float = flag(
        3.0, "Stop (without saving) when the loss exceeds this multiple of its mean over the last "
        "--spiky-loss-window iterations (a divergence); 0 disables."
    )
    spiky_loss_window: int = flag(50, "Iterations in the running mean of --spiky-loss-factor.")

    def __post_init__(self) -> None:
        require(self.train_iters >= 0, "--train-iters must be >= 0.")
        require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1.")
        require(self.lr >= 0 and self.min_lr >= 0, "--lr and --min-lr must be >= 0.")
        require(self.min_lr <= self.lr, f"--min-lr {self.min_lr} exceeds --lr {self.lr}.")
        require(self.spiky_loss_factor == 0 or self.spiky_loss_factor > 1,
                f"--spiky-loss-factor {self.spiky_loss_factor}: use a factor above 1 (or 0 to disable).")
        require(self.spiky_loss_window >= 1, "--spiky-loss-window must be at least 1.")
        require_positive(self, ("adam_eps", "recompute_num_layers"), optional=("global_batch_size", "lr_decay_iters"),
                         at_least_zero=("lr_warmup_iters", "clip_grad", "weight_decay"))
        for name in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, name) < 1,
                    f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}.")


@dataclass
class DataConfig:
    mock_data: bool = flag(False, "Synthetic random tokens (no dataset needed).")
    data_path: list[str] = flag([], "Training blend: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...", nargs="+")
    split: str = flag("969,30,1", "train,valid,test proportions of --data-path.")
    eval_domains: dict[str, list[str]] = flag(
        {},
        "Named validation set NAME=PREFIX (repeatable), reported as per-domain loss/perplexity.",
        flag_name="--eval-domain",
    )
    tokenizer_type: str | None = flag(
        None, "Tokenizer.", choices=(None, "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")
    )
    tokenizer_model: str | None = flag(None, "sentencepiece model file or Hugging Face tokenizer dir.")
    data_cache_path: str | None = flag(None, "Where dataset index caches are written.")
    reset_position_ids: bool = flag(False, "Restart position ids after each EOD.")
    reset_attention_mask: bool = flag(False, "Block attention across EOD (needs attention masks).")
    eod_mask_loss: bool = flag(False, "No loss on EOD tokens.")
    vocab_size: int | None = None  # filled from the model config for the NullTokenizer

    def __post_init__(self) -> None:
        # Neither --mock-data nor --data-path is fine: evaluation-only tools pass eval domains.
        require(
            not (self.mock_data and self.data_path),
            "Give either --mock-data or --data-path, not both.",
        )
        if self.data_path:
            require(
                self.tokenizer_type is not None,
                "--data-path needs --tokenizer-type (SentencePieceTokenizer or HuggingFaceTokenizer) "
                "and --tokenizer-model.",
            )


@dataclass
class CheckpointConfig:
    save: str | None = flag(None, "Directory for checkpoints (iter_XXXXXXX sub-directories).")
    load: str | None = flag(None, "Checkpoint directory to start from or resume.")
    save_interval: int | None = flag(None, "Save every N iterations (and at the end).")
    ckpt_format: str = flag("torch_dist", "Checkpoint format.", choices=("torch_dist",))
    finetune: bool = flag(
        False, "Load weights only; start at iteration 0 with a fresh optimizer (branch start)."
    )
    no_load_optim: bool = flag(False, "Do not load optimizer and scheduler state.")
    no_load_rng: bool = flag(False, "Do not load RNG state.")
    dist_ckpt_optim_fully_reshardable: bool = flag(
        False, "Save optimizer state so it can be loaded at any TP/PP/EP/DP layout."
    )
    no_save_optim: bool = flag(False, "Save weights only.")
    async_save: bool = flag(
        False, "Write checkpoints in a background process (Megatron-Core's async torch_dist save) while "
        "training goes on; a save becomes the latest only once every rank's files are written."
    )
    exit_signal_handler: bool = flag(
        True, "On SIGTERM/SIGUSR1 (SLURM pre-emption), save a checkpoint and exit cleanly."
    )
    exit_interval: int | None = flag(None, "Save and exit after this iteration.")
    overwrite_save: bool = flag(
        False, "Allow --save to hold another run's checkpoints when not resuming from it."
    )

    def __post_init__(self) -> None:
        require(
            self.save_interval is None or self.save_interval > 0, "--save-interval must be positive."
        )
        require_positive(self, (), optional=("exit_interval",))


@dataclass
class LoggingConfig:
    log_interval: int = flag(1, "Log every N iterations.")
    eval_interval: int | None = flag(None, "Evaluate every N iterations (and at the end).")
    eval_iters: int = flag(2, "Micro-batch rounds per evaluation.")
    tensorboard_dir: str | None = flag(None, "TensorBoard event directory.")
    log_routing: bool = flag(True, "Log per-layer expert token fractions for MoE models.")
    metrics_file: str | None = flag(None, "JSONL metrics file (default <save>/metrics.jsonl).")
    peak_tflops: float | None = flag(
        None, "Peak dense TFLOP/s per device for MFU (default: H100/H200 bf16 989; CPU: measured)."
    )

    def __post_init__(self) -> None:
        require_positive(self, ("log_interval",), optional=("eval_interval", "peak_tflops"),
                         at_least_zero=("eval_iters",))


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        m, p = self.model, self.parallel
        if m.is_moe and p.tensor_model_parallel_size > 1:
            require(
                p.sequence_parallel,
                "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel.",
            )
        if self.precision.fp8_format is not None and m.transformer_impl == "local":
            raise ValueError("--fp8-format needs --transformer-impl transformer_engine (or auto).")
        t = self.train
        if t.freeze_experts or t.freeze_router or t.train_experts:
            require(m.is_moe, "--freeze-experts/--freeze-router/--train-experts apply to MoE models (--num-experts).")
        require(not (t.train_experts and (t.freeze_experts or t.freeze_router)),
                "--train-experts freezes everything but the named experts; drop --freeze-experts/--freeze-router.")
        require(not t.train_router or bool(t.train_experts), "--train-router goes with --train-experts NAME ...")
        self.data.vocab_size = m.vocab_size

    def validate_layout(self, world_size: int) -> None:
        """Checks that need the world size; raise before any compute."""
        m, p, t = self.model, self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
        require(
            world_size % (tp * pp) == 0,
            f"World size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes.",
        )
        dp = world_size // (tp * pp)
        require(
            m.num_attention_heads % tp == 0,
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}.",
        )
        require(
            m.num_query_groups % tp == 0,
            f"--num-query-groups {m.num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}.",
        )
        require(
            m.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}.",
        )
        require(
            m.num_layers % pp == 0,
            f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.",
        )
        vp = p.num_layers_per_virtual_pipeline_stage
        if vp is not None:
            require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1.")
            require(
                m.num_layers % (pp * vp) == 0,
                f"--num-layers {m.num_layers} is not divisible by pipeline size {pp} x "
                f"--num-layers-per-virtual-pipeline-stage {vp}.",
            )
        if m.vocab_size is not None:
            require(
                m.padded_vocab_size % tp == 0,
                f"Padded vocabulary {m.padded_vocab_size} is not divisible by TP {tp}; "
                "set --make-vocab-size-divisible-by to a multiple of the TP size.",
            )
        if m.is_moe:
            require(
                m.num_experts % ep == 0,
                f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}.",
            )
            require(
                world_size % (etp * ep * pp) == 0,
                f"World size {world_size} is not divisible by --expert-model-parallel-size {ep} x "
                f"--expert-tensor-parallel-size {etp} x pipeline size {pp}.",
            )
            require(
                m.expert_ffn_hidden_size % etp == 0,
                f"Expert FFN size {m.expert_ffn_hidden_size} is not divisible by "
                f"--expert-tensor-parallel-size {etp}.",
            )
        else:
            require(ep == 1, "--expert-model-parallel-size > 1 needs an MoE model (--num-experts).")
        if t.global_batch_size is None:
            t.global_batch_size = t.micro_batch_size * dp
        require(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}.",
        )
        if vp is not None:
            num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
            require(
                num_microbatches % pp == 0,
                f"The interleaved schedule needs the number of micro batches ({num_microbatches}) "
                f"to be a multiple of the pipeline size {pp}; raise --global-batch-size.",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = dict(data.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            require(not unknown, f"Unknown {name} option(s): {sorted(unknown)}.")
            sections[name] = section_cls(**values)
        return cls(**sections)
