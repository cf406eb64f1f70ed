import re
from pathlib import Path

from transformers import AutoModelForImageTextToText

from ms_llava import MSLlavaForConditionalGeneration
from ms_llava.cli import main

ROOT = Path(__file__).resolve().parent.parent


def readme_command(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", (ROOT / "README.md").read_text())
    assert match, f"README lost its {marker} block"
    return match.group(1)


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_command("test-command")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines
    assert command.endswith("pytest")


def test_main_command_runs_the_demo():
    assert readme_command("main-command").endswith("ms-llava demo")


def test_demo_answers_on_the_untrained_default(capsys):
    assert main(["demo", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" in out  # never presented as a trained model
    assert "projector: MS-Resampler M=16 windows=[2, 4, 8] beta=5.0 fusion=channel_mlp" in out
    assert re.search(r"answer: '.+'", out)


def test_demo_on_a_given_checkpoint_and_image(tmp_path, capsys, image):
    assert main(["tiny", str(tmp_path / "ckpt")]) == 0
    assert isinstance(AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt"), MSLlavaForConditionalGeneration)
    image.save(tmp_path / "photo.png")
    args = [
        "demo",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--image",
        str(tmp_path / "photo.png"),
        "--question",
        "Hm?",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" not in out and "question: Hm?" in out


def test_demo_refuses_a_missing_image(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["demo", "--image", "/nonexistent/photo.png"])
    assert "no such file: /nonexistent/photo.png" in capsys.readouterr().err


def test_readme_quick_start_runs(tiny_dir, image, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    quick_start = blocks[0]
    assert "path/to/ms-llava-checkpoint" in quick_start and "photo.jpg" in quick_start
    image.save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    code = quick_start.replace("path/to/ms-llava-checkpoint", str(tiny_dir)).replace("64", "4")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["answer"] and namespace["answer"] == namespace["reply"]  # the same greedy answer both ways
