"""`python -m ms_llava.training`: `ms-llava train` for launchers that take a module (`accelerate launch -m`)."""

import sys

from .trainer import main

sys.exit(main())
