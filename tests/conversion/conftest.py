import pytest
import torch

from llava_checkpoints import rewrite_weights, save_llava, to_hub_4x_layout, to_new_layout

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
