import json

import pytest
import torch
from transformers import CLIPVisionModel

from llava_checkpoints import rewrite_weights, save_llava, to_hub_4x_layout, to_new_layout
from ms_llava.testing_utils import tiny_vision_config

HUB_4X_BUFFER = "vision_tower.vision_model.embeddings.position_ids"


@pytest.fixture(scope="session")
def llava_dirs(tmp_path_factory):
    """A tiny LLaVA as transformers 5 saves it, in the new key layout, and in llava-hf's transformers 4.x layout with
    the position_ids buffer that CLIP checkpoints of transformers < 4.31 carried."""
    root = tmp_path_factory.mktemp("llava")
    saved = save_llava(root / "saved")
    return {
        "saved by transformers 5": saved,
        "new layout": rewrite_weights(saved, root / "new", to_new_layout),
        "4.x hub layout": rewrite_weights(
            saved, root / "hub4x", to_hub_4x_layout, {HUB_4X_BUFFER: torch.arange(65)[None]}
        ),
    }


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A transformers CLIPVisionModel folder with a CLIP preprocessor config: an original checkpoint's mm_vision_tower,
    and the --vision-tower of one saved without its tower."""
    directory = tmp_path_factory.mktemp("clip")
    torch.manual_seed(2)
    CLIPVisionModel(tiny_vision_config()).save_pretrained(directory)
    preprocessor = {
        "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": {"shortest_edge": 32},
        "image_processor_type": "CLIPImageProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return directory
