"""The `lens-jax` command line: one subcommand per module of `lens_jax.tools`.

Each subcommand module has `add_parser(subparsers)` and `run(args) -> int`; a module that owns a
whole parser of its own (the conversion tool) is listed in FORWARDED and gets the raw arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lens_jax.errors import InputError, LensError

from .runtime import default_xla_flags, init_distributed

# subcommand -> module under lens_jax.tools
SUBCOMMANDS = {
    "generate": "generate",
    "parity": "parity.cli",
    "serve": "serve",
    "train": "train",
}
# subcommand -> (module, help): modules with their own argparse parser and `main(argv)`
FORWARDED = {
    "convert": ("convert", "convert PyTorch checkpoints to orbax (see `lens-jax convert --help`)"),
}


def main(argv: list[str] | None = None) -> int:
    if "jax" not in sys.modules:
        default_xla_flags()
    parser = argparse.ArgumentParser(prog="lens-jax", description="Lens text-to-image in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {name: importlib.import_module(f"lens_jax.tools.{mod}") for name, mod in SUBCOMMANDS.items()}
    for module in modules.values():
        module.add_parser(sub)
    for name, (_, help_text) in FORWARDED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    sub.add_parser("version", help="print the version")
    args, rest = parser.parse_known_args(argv)
    if args.command in FORWARDED:
        return importlib.import_module(f"lens_jax.tools.{FORWARDED[args.command][0]}").main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "version":
        from lens_jax import __version__

        print(__version__)
        return 0
    try:
        init_distributed()  # several hosts: LENS_JAX_DISTRIBUTED=1 (lens_jax.tools.runtime)
        return modules[args.command].run(args)
    except (ValueError, FileNotFoundError, LensError) as e:
        print(f"lens-jax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lens-jax: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lens-jax train --print-config | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) if isinstance(e, InputError) else str(e)


if __name__ == "__main__":
    sys.exit(main())
