"""Printing the C API's build flags: `quantvm capi-flags` and `python -m compiler.capi`."""

from __future__ import annotations

import argparse
import shlex
import sys

from compiler.errors import QuantvmError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cflags", action="store_true", help="print the include flag (the folder of quantvm.h)")
    p.add_argument("--libs", action="store_true",
                   help="print the link flags (builds libquantvm.so into the cache on first use)")


def flags(args) -> str:
    from compiler.capi import cflags, libs

    parts = []
    if args.cflags or not args.libs:
        parts += cflags()
    if args.libs or not args.cflags:
        parts += libs()
    return shlex.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler.capi", description=(
        "Print the flags that build a program against quantvm's C API and the installed TVM runtime, e.g. "
        "c++ main.cc $(python -m compiler.capi --cflags --libs)"))
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(flags(args))
    except QuantvmError as err:
        print(f"quantvm: error: {err}", file=sys.stderr)
        return 1
    return 0
