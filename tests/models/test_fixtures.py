"""Checkpoints written by an earlier revision (tests/fixtures, made by make_fixtures.py) still load, with the package
and through remote code, and give identical processor outputs and the same logits.

The logits were bit-identical on the CPU the fixtures were made on (an Intel Xeon). Another CPU's float32 kernels
round differently (up to 1.2e-7 measured on an AMD EPYC), so the logits are compared to `LOGITS_ATOL`: far below
what a wrongly loaded or missing weight changes (the logits are of order 0.1)."""

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import ms_llava  # noqa: F401  (registers the Auto classes)
import ms_llava.tuners.scale  # noqa: F401  (registers PEFT's SCALE type)
from isolation import hub_subprocess_env, run_python

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT: A red circle"  # make_fixtures.PROMPT
CHECKPOINTS = ["tiny_ms_llava", "converted"]
LOGITS_ATOL = 1e-5


def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "expected.safetensors"))


def check(model, processor, name: str) -> None:
    reference = expected(name)
    with Image.open(FIXTURES / "image.png") as image:
        inputs = dict(processor(images=image.convert("RGB"), text=PROMPT, return_tensors="pt"))
    assert sorted(inputs) == sorted(key for key in reference if key != "logits")
    for key, value in inputs.items():
        assert torch.equal(value, reference[key]), key
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference["logits"], rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fixture_checkpoint_gives_the_same_logits_with_the_package(name):
    path = FIXTURES / name
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__module__ == "ms_llava.modeling_ms_llava"
    check(model, AutoProcessor.from_pretrained(path), name)


@pytest.mark.parametrize("name", ["scale_adapter", "lora_adapter"])
def test_fixture_adapter_gives_the_same_logits(name):
    base = AutoModelForImageTextToText.from_pretrained(FIXTURES / "tiny_ms_llava").eval()
    model = PeftModel.from_pretrained(base, FIXTURES / name).eval()
    check(model, AutoProcessor.from_pretrained(FIXTURES / "tiny_ms_llava"), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fixture_checkpoint_gives_the_same_logits_through_remote_code(name, tmp_path):
    """In a process that cannot import ms_llava: the checkpoint's own saved modules give the same outputs."""
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    script = """
        import sys
        import torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path, image_path, prompt = sys.argv[1:4]
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert not type(model).__module__.startswith("ms_llava"), type(model).__module__
        reference = load_file(path + "/expected.safetensors")
        with Image.open(image_path) as image:
            inputs = dict(processor(images=image.convert("RGB"), text=prompt, return_tensors="pt"))
        for key, value in inputs.items():
            assert torch.equal(value, reference[key]), key
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, reference["logits"], rtol=0, atol=float(sys.argv[4]))
        print("identical")
    """
    env = hub_subprocess_env("http://127.0.0.1:9", tmp_path / "hf")
    run = run_python(script, path, FIXTURES / "image.png", PROMPT, LOGITS_ATOL, env=env, cwd=tmp_path)
    assert run.stdout.strip().endswith("identical")
