"""Typed configuration: dataclasses (``model``, ``schema``) and the Megatron-style command line (``args``)."""

from .args import build_parser, config_to_argv, parse_config, parse_options
from .model import ModelConfig
from .schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "Config", "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "PrecisionConfig", "TrainConfig", "build_parser", "config_to_argv", "parse_config", "parse_options",
]
