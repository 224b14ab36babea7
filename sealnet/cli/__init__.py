"""The `sealnet` command: one module per command group; `main` is the console entry point."""

from sealnet.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
