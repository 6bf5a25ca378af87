"""The training loop, checkpointing, metrics and run set-up shared by every BTX stage."""
