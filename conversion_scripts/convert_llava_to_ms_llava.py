#!/usr/bin/env python
"""Convert a transformers LLaVA checkpoint into an MS-LLaVA checkpoint (new MS-Resampler, everything else bit-exact):
`ms-llava convert llava-to-ms-llava`, as a script. See docs/conversion.md.

    python conversion_scripts/convert_llava_to_ms_llava.py --source llava-hf/llava-1.5-7b-hf --output ms-llava-7b \
        [--num-queries 144] [--scope-windows 2 6 24] [--scope-bias-strength 5] [--fusion channel_mlp]
"""

import sys

from ms_llava_cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "llava-to-ms-llava", *sys.argv[1:]]))
