"""Subcommands of the `allocsvc` CLI, one module per feature (registered in allocsvc.cli)."""
