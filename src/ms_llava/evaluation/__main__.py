"""`python -m ms_llava.evaluation ...` = `ms-llava eval ...`, for launchers that take a module
(`accelerate launch -m ms_llava.evaluation`, `torchrun -m ms_llava.evaluation`): each process evaluates its share of
the samples, the first writes the results file. Input errors are handled as by `ms-llava` (`ms_llava.cli.run_as_module`)."""

import sys

from ..cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("eval"))
