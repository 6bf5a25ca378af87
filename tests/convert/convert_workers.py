"""Functions the conversion tests run in-process or on gloo ranks (module level: picklable)."""

from __future__ import annotations

import torch


def relayout(flags: list[str], load: str, save: str) -> None:
    """Load ``load`` at the layout in ``flags`` and save it again with the trainer's saver."""
    from btx_megatron.config import parse_config
    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.runtime.distributed import initialize_distributed
    from btx_megatron.training import checkpointing

    cfg, _ = parse_config(flags)
    cfg.validate_layout(int(__import__("os").environ["WORLD_SIZE"]))
    initialize_distributed(cfg.parallel, seed=3)
    chunks = build_model_chunks(cfg, transformer_config(cfg))
    checkpointing.load_model_weights(chunks, load)
    checkpointing.save_checkpoint(cfg, 0, chunks, save_dir=save)


def megatron_model(flags: list[str], load: str | None = None, seed: int = 1):
    """A single-process GPTModel for ``flags`` (weights from ``load`` when given), eval mode."""
    from btx_megatron.config import parse_config
    from btx_megatron.models import build_model_chunks, transformer_config
    from btx_megatron.runtime.distributed import initialize_distributed
    from btx_megatron.training import checkpointing

    cfg, _ = parse_config(flags)
    initialize_distributed(cfg.parallel, seed=seed)
    model = build_model_chunks(cfg, transformer_config(cfg))[0]
    if load is not None:
        checkpointing.load_model_weights([model], load)
    return cfg, model.eval()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None)


def megatron_token_loss(model, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None, labels=labels)
