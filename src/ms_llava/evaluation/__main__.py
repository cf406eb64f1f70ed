"""`python -m ms_llava.evaluation` = `ms-llava eval`, for `accelerate launch -m` and `torchrun -m`: each process takes
its share of the samples, the first writes the results record."""

import sys

from ms_llava_cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("eval"))
