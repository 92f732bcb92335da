"""The ``moe-compile`` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moe-compile",
        description="torch.compile passes that fuse MoE routing, EPLB remapping and load counting",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo", help="route a batch with EPLB on and print the result", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from moe_compile import demo  # imported late: only the chosen command pays for it

        return demo.main(rest)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
