"""Typed run configuration.

Every field maps to a Megatron-LM flag of the same name (``num_layers`` <-> ``--num-layers``);
:mod:`btx_megatron.config.args` builds the command line from these dataclasses, so the field
docstrings (``help=`` metadata) are the flag documentation. Static checks live in
``__post_init__``; checks that need the world size live in :meth:`Config.validate_layout`.
User mistakes raise ``ValueError`` naming the flag and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def flag(default: Any = None, help: str = "", **extra: Any) -> Any:
    """A dataclass field that is also a command-line flag."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        factory = type(default)
        return field(default_factory=lambda: factory(default), metadata=meta)
    return field(default=default, metadata=meta)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_positive(section: Any, names: tuple[str, ...], *, optional: tuple[str, ...] = (),
                      at_least_zero: tuple[str, ...] = ()) -> None:
    """Numeric options that must be > 0 (``optional``: also None, the derived default) or >= 0
    (``at_least_zero``); a zero here would otherwise end in a division by zero (or SIGFPE) deep
    inside model construction."""
    for name in names + optional + at_least_zero:
        value = getattr(section, name)
        if value is None and name in optional:
            continue
        default = section.__dataclass_fields__[name].default
        hint = f" (default {default})" if default is not None else " (or leave it out for the default)"
        if name in at_least_zero:
            _require(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}{hint}.")
        else:
            _require(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}{hint}.")


ROUTER_TYPES = ("topk", "switch", "sample-top1", "soft")


@dataclass
class ModelConfig:
    """Llama-style GPT architecture (dense, or MoE when ``num_experts`` is set)."""

    num_layers: int = flag(2, "Number of transformer layers.")
    hidden_size: int = flag(64, "Transformer hidden size.")
    ffn_hidden_size: int | None = flag(None, "FFN hidden size (default 4 * hidden size).")
    num_attention_heads: int = flag(4, "Number of attention heads.")
    num_query_groups: int | None = flag(
        None, "Key/value head groups for grouped-query attention (default: one per head)."
    )
    kv_channels: int | None = flag(None, "Head dimension (default hidden / heads).")
    seq_length: int = flag(128, "Training sequence length.")
    max_position_embeddings: int | None = flag(None, "Maximum positions (default seq length).")
    vocab_size: int | None = flag(
        None, "Model vocabulary size before padding (default: the tokenizer's size)."
    )
    make_vocab_size_divisible_by: int = flag(
        128,
        "Pad the vocabulary to a multiple of this. Unlike Megatron-LM the multiple does not "
        "include the TP size, so one checkpoint serves every layout.",
    )
    swiglu: bool = flag(False, "SwiGLU FFN (gated SiLU) as in Llama.")
    normalization: str = flag("LayerNorm", "LayerNorm or RMSNorm.", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = flag(1e-5, "Epsilon of the normalisation layers.")
    position_embedding_type: str = flag(
        "learned_absolute", "Position embedding.", choices=("learned_absolute", "rope")
    )
    rotary_base: int = flag(10000, "RoPE base (theta).")
    rotary_percent: float = flag(1.0, "Fraction of each head that RoPE rotates.")
    untie_embeddings_and_output_weights: bool = flag(
        False, "Separate input embedding and output layer weights (Llama)."
    )
    disable_bias_linear: bool = flag(False, "No biases in linear layers (Llama).")
    init_method_std: float = flag(0.02, "Std of the normal weight initialisation.")
    hidden_dropout: float = flag(0.0, "Dropout after attention and FFN.")
    attention_dropout: float = flag(0.0, "Dropout on attention probabilities.")
    transformer_impl: str = flag(
        "auto",
        "Layer implementation: transformer_engine, local, or auto (TE when importable).",
        choices=("auto", "transformer_engine", "local"),
    )
    attention_backend: str = flag(
        "auto",
        "Local-spec core attention: sdpa (PyTorch fused scaled_dot_product_attention), "
        "unfused (Megatron's DotProductAttention), auto (sdpa). TE specs use TE attention.",
        choices=("auto", "sdpa", "unfused"),
    )
    # --- Mixture of experts -------------------------------------------------------------
    num_experts: int | None = flag(None, "Experts per MoE layer (None: dense model).")
    moe_ffn_hidden_size: int | None = flag(None, "Expert FFN size (default ffn hidden size).")
    moe_router_topk: int = flag(2, "Experts per token for the top-k router.")
    moe_router_type: str = flag(
        "topk",
        "BTX router: topk (softmax over the selected logits), switch (top-1, capacity), "
        "sample-top1 (Gumbel sample), soft (all experts).",
        choices=ROUTER_TYPES,
    )
    moe_router_load_balancing_type: str = flag(
        "aux_loss", "Load balancing.", choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
    )
    moe_aux_loss_coeff: float = flag(0.01, "Load-balancing loss weight (paper: 0.01).")
    moe_z_loss_coeff: float | None = flag(None, "Router z-loss weight.")
    moe_grouped_gemm: bool = flag(False, "Grouped-GEMM experts (Transformer Engine).")
    moe_token_dispatcher_type: str = flag(
        "allgather", "Token dispatcher.", choices=("allgather", "alltoall")
    )
    moe_expert_capacity_factor: float | None = flag(
        None, "Capacity factor; tokens beyond capacity are dropped (switch router)."
    )
    moe_sample_temperature_rate: float = flag(
        1e-4, "sample-top1: temperature max(0.5, exp(-rate * step))."
    )
    moe_router_dtype: str | None = flag(None, "Router compute dtype (fp32 recommended).", choices=(None, "fp32", "fp64"))

    def __post_init__(self) -> None:
        _require(self.num_layers > 0, "--num-layers must be positive.")
        _require(self.hidden_size > 0, "--hidden-size must be positive.")
        _require_positive(self, ("num_attention_heads", "seq_length", "make_vocab_size_divisible_by", "norm_epsilon",
                                 "rotary_base"),
                          optional=("ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings",
                                    "vocab_size"))
        _require(0 < self.rotary_percent <= 1, f"--rotary-percent must be in (0, 1], got {self.rotary_percent}.")
        for name in ("hidden_dropout", "attention_dropout"):
            _require(0 <= getattr(self, name) < 1,
                     f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}.")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        _require(
            self.hidden_size % self.num_attention_heads == 0 or self.kv_channels is not None,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
            f"{self.num_attention_heads}; change one or set --kv-channels.",
        )
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"--num-attention-heads {self.num_attention_heads} is not a multiple of "
            f"--num-query-groups {self.num_query_groups}.",
        )
        _require(
            self.max_position_embeddings >= self.seq_length,
            f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
            f"--seq-length {self.seq_length}.",
        )
        if self.num_experts is not None:
            self._check_moe()
        else:
            _require(
                self.moe_expert_capacity_factor is None and not self.moe_grouped_gemm,
                "MoE options (--moe-expert-capacity-factor, --moe-grouped-gemm) need --num-experts.",
            )

    def _check_moe(self) -> None:
        """Every router/MoE option check, in one place (the routers assume they passed)."""
        router = self.moe_router_type
        _require(self.num_experts >= 1, "--num-experts must be at least 1.")
        _require(
            self.moe_ffn_hidden_size is None or self.moe_ffn_hidden_size > 0,
            f"--moe-ffn-hidden-size must be positive, got {self.moe_ffn_hidden_size}.",
        )
        if router == "topk":
            _require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"--moe-router-topk {self.moe_router_topk} must be between 1 and "
                f"--num-experts {self.num_experts}.",
            )
        if router in ("soft", "sample-top1"):
            _require(
                self.moe_expert_capacity_factor is None,
                f"--moe-router-type {router} does not drop tokens; remove --moe-expert-capacity-factor "
                "(use --moe-router-type switch for capacity-limited top-1 routing).",
            )
            _require(
                self.moe_router_load_balancing_type != "sinkhorn",
                f"--moe-router-load-balancing-type sinkhorn chooses the experts itself and works with "
                f"--moe-router-type topk or switch only, not {router}; use aux_loss, seq_aux_loss, "
                "global_aux_loss or none.",
            )
        if router == "switch" and self.moe_expert_capacity_factor is None:
            # The paper's Switch baseline uses capacity factor 1.5.
            self.moe_expert_capacity_factor = 1.5
        _require(
            self.moe_expert_capacity_factor is None or self.moe_expert_capacity_factor > 0,
            f"--moe-expert-capacity-factor must be positive, got {self.moe_expert_capacity_factor}.",
        )
        _require(
            self.moe_sample_temperature_rate >= 0,
            f"--moe-sample-temperature-rate must be >= 0, got {self.moe_sample_temperature_rate}.",
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def padded_vocab_size(self) -> int:
        assert self.vocab_size is not None, "vocab size must be resolved before building"
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def architecture(self) -> dict[str, Any]:
        """The fields that must agree between checkpoints that are merged or resumed."""
        keys = (
            "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
            "swiglu", "normalization", "norm_epsilon", "position_embedding_type", "rotary_base",
            "rotary_percent", "untie_embeddings_and_output_weights", "disable_bias_linear",
            "max_position_embeddings",
        )
        return {k: getattr(self, k) for k in keys}


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
            _require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1.")
        _require_positive(self, ("distributed_timeout_minutes",))
        if self.expert_tensor_parallel_size is None:
            self.expert_tensor_parallel_size = self.tensor_model_parallel_size
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel needs --tensor-model-parallel-size > 1; drop the flag at TP=1.",
        )
        if self.overlap_param_gather:
            _require(
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
        _require(not (self.bf16 and self.fp16), "Choose one of --bf16 and --fp16.")
        if self.fp8_format is not None:
            _require(
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
        _require(self.train_iters >= 0, "--train-iters must be >= 0.")
        _require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1.")
        _require(self.lr >= 0 and self.min_lr >= 0, "--lr and --min-lr must be >= 0.")
        _require(self.min_lr <= self.lr, f"--min-lr {self.min_lr} exceeds --lr {self.lr}.")
        _require(self.spiky_loss_factor == 0 or self.spiky_loss_factor > 1,
                 f"--spiky-loss-factor {self.spiky_loss_factor}: use a factor above 1 (or 0 to disable).")
        _require(self.spiky_loss_window >= 1, "--spiky-loss-window must be at least 1.")
        _require_positive(self, ("adam_eps", "recompute_num_layers"), optional=("global_batch_size", "lr_decay_iters"),
                          at_least_zero=("lr_warmup_iters", "clip_grad", "weight_decay"))
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1,
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
        _require(
            not (self.mock_data and self.data_path),
            "Give either --mock-data or --data-path, not both.",
        )
        if self.data_path:
            _require(
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
        _require(
            self.save_interval is None or self.save_interval > 0, "--save-interval must be positive."
        )
        _require_positive(self, (), optional=("exit_interval",))


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
        _require_positive(self, ("log_interval",), optional=("eval_interval", "peak_tflops"),
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
            _require(
                p.sequence_parallel,
                "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel.",
            )
        if self.precision.fp8_format is not None and m.transformer_impl == "local":
            raise ValueError("--fp8-format needs --transformer-impl transformer_engine (or auto).")
        t = self.train
        if t.freeze_experts or t.freeze_router or t.train_experts:
            _require(m.is_moe, "--freeze-experts/--freeze-router/--train-experts apply to MoE models (--num-experts).")
        _require(not (t.train_experts and (t.freeze_experts or t.freeze_router)),
                 "--train-experts freezes everything but the named experts; drop --freeze-experts/--freeze-router.")
        _require(not t.train_router or bool(t.train_experts), "--train-router goes with --train-experts NAME ...")
        self.data.vocab_size = m.vocab_size

    def validate_layout(self, world_size: int) -> None:
        """Checks that need the world size; raise before any compute."""
        m, p, t = self.model, self.parallel, self.train
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
        _require(
            world_size % (tp * pp) == 0,
            f"World size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes.",
        )
        dp = world_size // (tp * pp)
        _require(
            m.num_attention_heads % tp == 0,
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}.",
        )
        _require(
            m.num_query_groups % tp == 0,
            f"--num-query-groups {m.num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}.",
        )
        _require(
            m.ffn_hidden_size % tp == 0,
            f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}.",
        )
        _require(
            m.num_layers % pp == 0,
            f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}.",
        )
        vp = p.num_layers_per_virtual_pipeline_stage
        if vp is not None:
            _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1.")
            _require(
                m.num_layers % (pp * vp) == 0,
                f"--num-layers {m.num_layers} is not divisible by pipeline size {pp} x "
                f"--num-layers-per-virtual-pipeline-stage {vp}.",
            )
        if m.vocab_size is not None:
            _require(
                m.padded_vocab_size % tp == 0,
                f"Padded vocabulary {m.padded_vocab_size} is not divisible by TP {tp}; "
                "set --make-vocab-size-divisible-by to a multiple of the TP size.",
            )
        if m.is_moe:
            _require(
                m.num_experts % ep == 0,
                f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}.",
            )
            _require(
                world_size % (etp * ep * pp) == 0,
                f"World size {world_size} is not divisible by --expert-model-parallel-size {ep} x "
                f"--expert-tensor-parallel-size {etp} x pipeline size {pp}.",
            )
            _require(
                m.expert_ffn_hidden_size % etp == 0,
                f"Expert FFN size {m.expert_ffn_hidden_size} is not divisible by "
                f"--expert-tensor-parallel-size {etp}.",
            )
        else:
            _require(ep == 1, "--expert-model-parallel-size > 1 needs an MoE model (--num-experts).")
        if t.global_batch_size is None:
            t.global_batch_size = t.micro_batch_size * dp
        _require(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}.",
        )
        if vp is not None:
            num_microbatches = t.global_batch_size // (t.micro_batch_size * dp)
            _require(
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
            _require(not unknown, f"Unknown {name} option(s): {sorted(unknown)}.")
            sections[name] = section_cls(**values)
        return cls(**sections)
