"""`python -m ms_llava.training ...` = `ms-llava train ...`, through the command line's dispatcher and error boundary
(for launchers that take a module: `accelerate launch -m`, `torchrun -m`)."""

import sys

from ms_llava_cli import run_as_module

if __name__ == "__main__":
    sys.exit(run_as_module("train"))
