"""`python -m ms_llava.evaluation ...` = `ms-llava eval ...`, for launchers that take a module
(`accelerate launch -m ms_llava.evaluation`, `torchrun -m ms_llava.evaluation`): each process evaluates its share of
the samples, the first writes the results file."""

import argparse
import sys

from .run import add_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_llava.evaluation")
    commands = parser.add_subparsers(dest="command", required=True)
    add_cli(commands)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"ms-llava eval: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
