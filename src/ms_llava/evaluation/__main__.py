"""`python -m ms_llava.evaluation ...` = `ms-llava eval ...`, for launchers that take a module
(`accelerate launch -m ms_llava.evaluation`, `torchrun -m ms_llava.evaluation`): each process evaluates its share of
the samples, the first writes the results record. Errors go through `ms-llava`'s boundary (`ms_llava_cli`)."""

import sys

from ms_llava_cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("eval"))
