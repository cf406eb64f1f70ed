import pytest
import torch

from ms_llava.tiny import build_tiny_checkpoint, sample_image


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny MS-LLaVA (8 x 8 grid, M = 16, k = [2, 4, 8]) and its processor."""
    return build_tiny_checkpoint(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny checkpoint saved with save_pretrained (model + processor)."""
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny_ms_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def image():
    return sample_image(size=48, seed=1)


def chat(text: str, num_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
