"""The ``circtune`` command: one module per subcommand, each imported only for its own help and run.

``circtune --help`` imports none of them beyond their names and help texts, so it answers without loading torch.
"""

from __future__ import annotations

import argparse
import sys
import threading
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import UsageError
from . import check, compare, demo, devices, models, profile, report, search

# Each subcommand module provides NAME, HELP, add_arguments(parser) and run(args) -> int, and imports torch (and
# everything heavy) only inside run: building the parser stays cheap.
SUBCOMMANDS = (search, profile, report, compare, check, models, devices, demo)

DESCRIPTION = ("circtune measures what circulant adapters (C3A, CDVFT) cost on this machine and picks, for each "
               "layer of your model, the adapter that trains fastest within a trainable-parameter budget; it "
               "writes an adapter_config.json that a training script loads with circtune.apply_adapter.")
EPILOG = ("start with:  circtune search --model roberta-large --budget 100k   (writes runs/roberta-large-<device>/); "
          "'circtune COMMAND --help' for the options of one command")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the mistake and a pointer to --help, not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = Parser(prog="circtune", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"circtune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parsers = {}
    for module in SUBCOMMANDS:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        # SUPPRESS: without the flag, the subcommand leaves `circtune --debug COMMAND`'s value alone
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        parsers[module.NAME] = p
    return parser, parsers


def _context_broken() -> type[Exception]:
    # Looked up only once an exception is on its way (the profiler imports torch, which --help must not).
    from ..measure.profiler import ContextBroken

    return ContextBroken


def main(argv: Sequence[str] | None = None) -> int:
    from .._signals import disarm, install, kept_summary

    if threading.current_thread() is threading.main_thread():
        # The command owns its process: SIGTERM stops like Ctrl-C; both wait for a database write in progress to
        # finish (the library calls do this only while they run).
        install()
    parser, parsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args._run(args)
    except (UsageError, ValueError) as e:
        if args.debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"circtune {args.command}: error: {first}", file=sys.stderr)
        rest = str(e).splitlines()[1:]
        if rest:
            print("\n".join(rest), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"circtune {args.command}: interrupted; kept in the store: {kept_summary()}; re-running the same "
              "command continues from there", file=sys.stderr)
        return 130
    except _context_broken() as e:  # a sticky CUDA error: the failing row is stored; the line says what to do
        print(f"circtune {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        disarm()


if __name__ == "__main__":
    sys.exit(main())
