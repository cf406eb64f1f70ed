"""`python -m experiments.spatial_scale ...` from the repository root."""

import sys

from .spatial import main

sys.exit(main())
