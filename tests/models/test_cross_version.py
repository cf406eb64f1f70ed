"""A checkpoint saved under one transformers version loads under another and gives the same tokens, with the package
and through its remote code. `.ci/run` saves one in its floor lane and one in its newest lane (`python
tests/models/test_cross_version.py save DIR`) and runs this file in the other lane with MS_LLAVA_CROSS_VERSION naming
the folders; without it there is nothing to compare, and the test says so."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor

import ms_llava  # noqa: F401  (registers the Auto classes)
from ms_llava.testing_utils import build_tiny_checkpoint, sample_image

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
SETTINGS = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
FOLDERS = [Path(folder) for folder in os.environ.get("MS_LLAVA_CROSS_VERSION", "").split(os.pathsep) if folder]


def generate(model, processor) -> list[int]:
    inputs = processor(images=sample_image(size=48, seed=1), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**inputs, **SETTINGS)[0, inputs["input_ids"].shape[1] :].tolist()


def save(folder: Path) -> None:
    """Writes a tiny checkpoint, the image the tokens are generated from, and the tokens under this version."""
    model, processor = build_tiny_checkpoint(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    sample_image(size=48, seed=1).save(folder / "image.png")
    record = {"transformers": transformers.__version__, "tokens": generate(model.eval(), processor)}
    (folder / "tokens.json").write_text(json.dumps(record))


@pytest.mark.skipif(not FOLDERS, reason="MS_LLAVA_CROSS_VERSION is unset: no checkpoint of another version to load")
@pytest.mark.parametrize("folder", FOLDERS, ids=str)
def test_a_checkpoint_saved_under_another_version_gives_the_same_tokens(folder, tmp_path):
    from isolation import hub_subprocess_env, run_python

    record = json.loads((folder / "tokens.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model).__module__ == "ms_llava.modeling_ms_llava"
    assert generate(model, AutoProcessor.from_pretrained(folder)) == record["tokens"], record["transformers"]
    script = """
        import sys
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder, prompt, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(images=Image.open(folder + "/image.png"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        print(*tokens[0, inputs["input_ids"].shape[1] :].tolist())
    """
    env = hub_subprocess_env("http://127.0.0.1:9", tmp_path / "hf")
    run = run_python(script, folder, PROMPT, SETTINGS["max_new_tokens"], env=env, cwd=tmp_path)
    assert [int(token) for token in run.stdout.split()] == record["tokens"], record["transformers"]


if __name__ == "__main__":  # python tests/models/test_cross_version.py save DIR
    assert sys.argv[1] == "save", sys.argv
    save(Path(sys.argv[2]))
    print(f"saved under transformers {transformers.__version__}: {sys.argv[2]}")
