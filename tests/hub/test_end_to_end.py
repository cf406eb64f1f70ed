"""The work item's evidence, end to end: a transformers LLaVA checkpoint -> `convert` -> `push` -> pulled in a fresh
process that cannot import ms_llava (remote code only) -> the same logits as before the push."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from isolation import hub_subprocess_env, run_python
from llava_checkpoints import save_llava
from messages import chat
from ms_llava.conversion.llava import convert_llava_to_ms_llava
from ms_llava.hub import push_to_hub
from ms_llava.testing_utils import sample_image

PULL = """
import sys
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo, image_path, out = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"input_ids": inputs["input_ids"], "logits": logits}, out)
"""


@pytest.mark.slow
def test_llava_converted_pushed_and_pulled_without_the_package(hub, tmp_path):
    llava_dir = save_llava(tmp_path / "llava")
    converted = tmp_path / "ms-llava"
    report = convert_llava_to_ms_llava(
        llava_dir,
        converted,
        num_queries=16,
        scope_windows=[2, 4, 8],
        resampler_kwargs={"hidden_size": 20, "num_attention_heads": 2},
        log=lambda line: None,
    )
    assert report.parity and max(report.parity.values()) == 0.0  # tower and LM carried over exactly
    assert any("multi_modal_projector" in key for keys in report.dropped.values() for key in keys)

    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    image = sample_image(44, seed=12)
    image.save(tmp_path / "image.png")
    inputs = processor(
        images=image,
        text=processor.apply_chat_template(chat("What is it?"), add_generation_prompt=True),
        return_tensors="pt",
    )
    with torch.no_grad():
        before_push = model(**inputs).logits

    push_to_hub(converted, "ms-llava-test/converted-from-llava", base_model="local/tiny-llava")
    out = tmp_path / "pulled.pt"
    run_python(
        PULL,
        "ms-llava-test/converted-from-llava",
        tmp_path / "image.png",
        out,
        env=hub_subprocess_env(hub.url, tmp_path / "hf_home"),
        cwd=tmp_path,
    )
    pulled = torch.load(out)
    assert torch.equal(pulled["input_ids"], inputs["input_ids"])
    assert torch.equal(pulled["logits"], before_push)
