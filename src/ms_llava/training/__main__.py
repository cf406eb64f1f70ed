"""`python -m ms_llava.training ...` = `ms-llava train ...` (for `accelerate launch -m`, `torchrun -m`)."""

import sys

from ms_llava_cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("train"))
