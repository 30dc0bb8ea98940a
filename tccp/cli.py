"""The `tccp` command: one entry point, one module per subcommand.

Subcommands live in `tccp.commands.<name>` (or another package named in COMMANDS) and
expose `add_arguments(parser)` and `main(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from typing import Iterator, Sequence

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that every cleanup path (temp outputs removed,
    sessions closed) runs for both."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into the KeyboardInterrupt path for the duration of a command.

    Where the running code installed its own SIGINT handler (asyncio.run cancels its
    main task on Ctrl-C), SIGTERM goes through that same handler, so a run is cancelled
    exactly as Ctrl-C cancels it; otherwise it raises `Terminated`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def on_term(signum, frame):  # noqa: ANN001
        got.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
            return
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except (ValueError, OSError):  # pragma: no cover - not the main thread / no signals
        yield
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """After a closed pipe (`tccp info --json | head`): no more writes, and none at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 1
    from tccp.io_utils import command_scope

    terminated: list = []
    try:
        with _sigterm_as_interrupt() as terminated, command_scope(args.command):
            code = args._main(args)
            sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
    except TCCPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return 141  # what a process killed by SIGPIPE reports (128 + 13)
    except KeyboardInterrupt:
        if terminated or isinstance(sys.exc_info()[1], Terminated):
            print("error: terminated", file=sys.stderr)
            return 143
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
