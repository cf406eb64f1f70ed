#!/usr/bin/env python
"""Convert between the original LLaVA code base's checkpoints and transformers' layout (mlp2x_gelu or ms_resampler).

    python conversion_scripts/convert_original_llava_to_hf.py --source llava-v1.5-7b --output llava-1.5-7b-hf \
        [--vision-tower clip-vit-large-patch14-336] [--base-llm vicuna-7b-v1.5]
    python conversion_scripts/convert_original_llava_to_hf.py --direction hf-to-original --source ms-llava-7b \
        --output ms-llava-7b-original

Also `ms-llava convert original-to-hf ...` and `ms-llava convert hf-to-original ...`. See docs/conversion.md.
"""

import sys

from ms_llava.conversion.original import main

if __name__ == "__main__":
    sys.exit(main())
