#!/usr/bin/env python
"""Convert a checkpoint of the original LLaVA code base (haotian-liu/LLaVA) into a transformers one (LLaVA for an
`mlp2x_gelu` projector, MS-LLaVA for `ms_resampler`; every tensor bit-exact, `<image>` added): `ms-llava convert
original-to-hf`, as a script. See docs/conversion.md.

    python conversion_scripts/convert_original_llava_to_hf.py --source llava-v1.5-7b --output llava-v1.5-7b-hf \
        [--vision-tower openai/clip-vit-large-patch14-336] [--base-llm lmsys/vicuna-7b-v1.5]
"""

import sys

from ms_llava_cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "original-to-hf", *sys.argv[1:]]))
