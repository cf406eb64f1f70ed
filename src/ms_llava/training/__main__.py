"""`python -m ms_llava.training ...` = `ms-llava train ...`, for launchers that take a module (`accelerate launch -m`,
`torchrun -m`), with the same handling of input errors (`ms_llava_cli.run_as_module`)."""

import sys

from ms_llava_cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("train"))
