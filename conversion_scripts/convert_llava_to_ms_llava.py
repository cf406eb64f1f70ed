#!/usr/bin/env python
"""Convert a transformers LLaVA checkpoint into an MS-LLaVA checkpoint (new MS-Resampler, everything else bit-exact).

    python conversion_scripts/convert_llava_to_ms_llava.py --source llava-hf/llava-1.5-7b-hf --output ms-llava-7b \
        [--num-queries 144] [--scope-windows 2 6 24] [--scope-bias-strength 5] [--fusion channel_mlp]

Also `ms-llava convert llava-to-ms-llava ...`. See docs/conversion.md.
"""

import sys

from ms_llava.conversion.llava import main

if __name__ == "__main__":
    sys.exit(main())
