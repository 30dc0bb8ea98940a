"""The `tccp` command: one entry point, one module per subcommand.

Subcommands live in `tccp.commands.<name>` (or another package named in COMMANDS) and
expose `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from tccp import __version__
from tccp.errors import TCCPError

# name -> (module, one-line help). Modules must import quickly (heavy imports in main).
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("tccp.commands.prepare", "turn clips into prepared training/inference samples"),
    "info": ("tccp.commands.info", "parameter count and FLOPs per window of a model config"),
    "train": ("tccp.commands.train", "train stage 1 (landmarks) or stage 2 (faces)"),
    "run": ("tccp.commands.run", "regenerate the talking head of a video driven by audio"),
    "demo": ("tccp.commands.demo", "run the bundled sample with the bundled model"),
    "serve": ("streaming.server", "WebRTC server: browser camera+mic in, edited video out"),
    "export": ("export.cli", "export the model pack to ONNX / TensorRT"),
    "bench": ("export.bench", "benchmark the per-window pipeline (JSON + plot)"),
    "eval": ("tccp.commands.eval", "quality metrics of a generated video"),
    "avatar": ("tccp.commands.avatar", "create and manage avatar packs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tccp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tccp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 1
    try:
        code = args._main(args)
    except TCCPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
