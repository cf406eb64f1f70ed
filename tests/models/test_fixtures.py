"""Checkpoints written by an earlier revision (tests/fixtures, made by make_fixtures.py) still load, with the package
and through remote code, and give identical processor outputs and the same logits.

The logits were bit-identical on the CPU the fixtures were made on (an Intel Xeon). Another CPU's float32 kernels
round differently (up to 1.2e-7 measured on an AMD EPYC), so the logits are compared to `LOGITS_ATOL`: far below
what a wrongly loaded or missing weight changes (the logits are of order 0.1)."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import ms_llava  # noqa: F401  (registers the Auto classes)
import ms_llava.tuners.scale  # noqa: F401  (registers PEFT's SCALE type)
from isolation import hub_subprocess_env, run_python

REMOTE_CODE_MODULES = [
    f"{name}_ms_llava.py" for name in ("configuration", "modeling", "processing", "image_processing")
]

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


REMOTE_SCRIPT = """
    import sys
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image_path, prompt, atol, *paths = sys.argv[1:]
    for path in paths:
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert not type(model).__module__.startswith("ms_llava"), type(model).__module__
        reference = load_file(path + "/expected.safetensors")
        with Image.open(image_path) as image:
            inputs = dict(processor(images=image.convert("RGB"), text=prompt, return_tensors="pt"))
        for key, value in inputs.items():
            assert torch.equal(value, reference[key]), key
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, reference["logits"], rtol=0, atol=float(atol))
        print("identical", path)
"""


@pytest.mark.slow
def test_fixture_checkpoints_give_the_same_logits_through_remote_code(tmp_path):
    """In a process that cannot import ms_llava, each checkpoint's own saved modules give the same outputs; so do the
    package's current modules copied over them (docs/serving.md, "Refreshing a checkpoint's code"), which is what
    makes a checkpoint saved by an earlier release load on transformers older than its code (the fixtures' code
    imports `select_hidden_states`, new in transformers 5.23)."""
    package = Path(ms_llava.__file__).parent
    paths = []
    for name in CHECKPOINTS:
        refreshed = tmp_path / f"{name}-refreshed"
        shutil.copytree(FIXTURES / name, refreshed)
        for module in REMOTE_CODE_MODULES:
            shutil.copy(package / module, refreshed / module)
        paths.append(refreshed)
        if Version(transformers.__version__) >= Version("5.23"):
            paths.append(shutil.copytree(FIXTURES / name, tmp_path / name))
    env = hub_subprocess_env("http://127.0.0.1:9", tmp_path / "hf")
    run = run_python(REMOTE_SCRIPT, FIXTURES / "image.png", PROMPT, LOGITS_ATOL, *paths, env=env, cwd=tmp_path)
    assert run.stdout.split() == [word for path in paths for word in ("identical", str(path))]
