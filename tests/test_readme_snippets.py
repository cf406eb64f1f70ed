"""The README's Python snippets run as written.

Every ```python block of README.md carries a name (an HTML comment `<!-- python: NAME -->` on the line above it);
each is executed here with its placeholders filled in: the image file becomes a generated picture, `base_model` a tiny
MS-LLaVA, an adapter folder one saved here. A snippet that needs full-size weights says so in the README's text and is
skipped here by name, with the reason; its code still runs with the sizes shrunk.
"""

import re
from pathlib import Path

import pytest

from ms_llava.testing_utils import build_tiny_checkpoint, sample_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NAMED_BLOCK = re.compile(r"<!-- python: ([\w-]+) -->\n```python\n(.+?)\n```", flags=re.S)
# Snippets that need full-size weights, skipped by name: the README's text before each says so (checked below).
FULL_SIZE = {"build-from-configs": "builds LLaVA-1.5-7B at full size: about 7e9 float32 parameters, 28 GB of RAM"}


def snippets() -> dict[str, str]:
    return dict(NAMED_BLOCK.findall(README))


def replaced(code: str, old: str, new: str) -> str:
    """`code` with `old` replaced by `new`; the README must still hold `old` (else this test is out of date)."""
    assert old in code, f"the README snippet no longer contains {old!r}: update tests/test_readme_snippets.py"
    return code.replace(old, new)


def run(name: str, code: str, namespace: dict | None = None) -> dict:
    namespace = dict(namespace or {})
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    return namespace


def test_every_python_snippet_is_named_and_covered():
    """A new ```python block must get a name and a case here (or in FULL_SIZE); none is left untested silently."""
    assert README.count("```python") == len(NAMED_BLOCK.findall(README)), "a ```python block has no name comment"
    names = list(snippets())
    assert len(names) == len(set(names)), f"snippet names repeat: {names}"
    assert set(names) == {"quick-start", "build-from-configs", "scale-adapter"}


def test_quick_start(tmp_path, monkeypatch):
    """The Quick start as written (`ms_llava.default_checkpoint_path()` after `import ms_llava`), on the embedded
    default, with "photo.jpg" a generated picture and 4 new tokens instead of 64 (time only)."""
    sample_image(size=64, seed=3).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    code = replaced(snippets()["quick-start"], "max_new_tokens=64", "max_new_tokens=4")
    namespace = run("quick-start", code)
    from ms_llava.demo import default_checkpoint_path

    assert namespace["path"] == default_checkpoint_path()
    assert isinstance(namespace["answer"], str) and namespace["answer"] == namespace["reply"]  # one greedy answer


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_snippet_is_skipped_by_name_and_says_so(name):
    """The text right before a full-size snippet warns about its size (7B, float32, the RAM it needs)."""
    before = README[: README.index(f"<!-- python: {name} -->")].rsplit("\n\n", 2)[-2:]
    warning = " ".join(before)
    assert "7B" in warning and "float32" in warning and "GB of RAM" in warning, warning
    pytest.skip(f"README snippet {name!r} not run at full size: it {FULL_SIZE[name]}")


def test_build_from_configs_with_the_sizes_shrunk():
    """The full-size snippet's code, with its widths and depths made tiny: it builds the model it describes."""
    code = snippets()["build-from-configs"]
    for old, new in [
        ("hidden_size=1024", "hidden_size=32"),
        ("image_size=336", "image_size=56"),
        ("num_hidden_layers=24", "num_hidden_layers=1"),
        ("num_attention_heads=16", "num_attention_heads=2"),
        ("intermediate_size=4096", "intermediate_size=37"),
        (
            "LlamaConfig()",
            "LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=1, "
            "num_attention_heads=2)",
        ),
        ('"num_queries": 64', '"num_queries": 4, "hidden_size": 16, "num_attention_heads": 2'),
        ('"scope_windows": [2, 6, 14]', '"scope_windows": [2, 4]'),
    ]:
        code = replaced(code, old, new)
    model = run("build-from-configs", code)["model"]
    resampler = model.config.resampler_config
    assert (resampler.num_queries, resampler.scope_windows, resampler.scope_bias_strength) == (4, [2, 4], 5.0)
    assert model.config.vision_config.patch_size == 14  # kept from the snippet: a 4 x 4 grid at 56 px


def test_scale_adapter(tmp_path, monkeypatch):
    """The ScAle snippet, with `base_model` a tiny MS-LLaVA and `runs/scale` an adapter saved here."""
    from peft import get_peft_model

    import ms_llava.tuners.scale

    monkeypatch.chdir(tmp_path)
    saved = get_peft_model(build_tiny_checkpoint(seed=1)[0], ms_llava.tuners.scale.ScaleConfig(token_scope="last"))
    saved.save_pretrained("runs/scale")
    namespace = run("scale-adapter", snippets()["scale-adapter"], {"base_model": build_tiny_checkpoint(seed=2)[0]})
    assert namespace["model"].peft_config["default"].peft_type == "SCALE"
    assert "default" in namespace["adapted"].peft_config
