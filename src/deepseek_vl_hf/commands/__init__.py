"""Subcommands of the `deepseek-vl-hf` CLI, one module each."""
