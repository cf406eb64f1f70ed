import json
import re
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from ms_llava import MSLlavaForConditionalGeneration
from ms_llava.cli import main
from ms_llava.demo import default_checkpoint_path, load_demo_samples
from ms_llava.visualize import panel_layout

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


def test_demo_on_the_embedded_default(tmp_path, capsys, monkeypatch):
    """The README's main command: the shipped default answers its demo samples and draws one query's attention."""
    samples = load_demo_samples(default_checkpoint_path())
    assert samples
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" not in out
    assert f"checkpoint: {default_checkpoint_path()}" in out
    for sample in samples:
        assert f"question: {sample['question']}" in out and f"expected: {sample['answer']}" in out
    assert len(re.findall(r"answer: +'.*' +(RIGHT|WRONG)", out)) == len(samples)
    assert re.search(rf"correct: \d+/{len(samples)}", out)
    assert f"attention map: {tmp_path / 'ms-llava-demo.png'}" in out
    with Image.open(tmp_path / "ms-llava-demo.png") as picture:
        assert picture.format == "PNG"
        config = AutoConfig.from_pretrained(default_checkpoint_path())
        assert picture.size[0] == panel_layout(len(config.resampler_config.scope_windows), 320)[0]


def test_default_checkpoint_path_names_what_is_missing(tmp_path, monkeypatch):
    from ms_llava import demo

    monkeypatch.setattr(demo, "DEFAULT_CHECKPOINT_DIR", tmp_path / "default_checkpoint")
    (tmp_path / "default_checkpoint").mkdir()
    (tmp_path / "default_checkpoint" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"default_checkpoint lacks demo_samples.json, \*.safetensors"):
        demo.default_checkpoint_path()


@pytest.fixture
def tiny_checkpoint_with_samples(tmp_path, image):
    """A tiny (untrained) checkpoint written by `ms-llava tiny`, with two demo samples like the default's."""
    assert main(["tiny", str(tmp_path / "ckpt")]) == 0
    (tmp_path / "ckpt" / "samples").mkdir()
    image.save(tmp_path / "ckpt" / "samples" / "a.png")
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((0, 0, 48, 30)).save(tmp_path / "ckpt" / "samples" / "b.png")
    samples = [
        {"image": "samples/a.png", "question": "How many shapes are there?", "answer": "three", "type": "count"},
        {"image": "samples/b.png", "question": "What colour is the circle?", "answer": "blue", "type": "colour"},
    ]
    (tmp_path / "ckpt" / "demo_samples.json").write_text(json.dumps(samples))
    return tmp_path / "ckpt"


def test_demo_answers_the_checkpoints_samples_and_draws(tiny_checkpoint_with_samples, tmp_path, capsys):
    checkpoint = tiny_checkpoint_with_samples
    assert isinstance(AutoModelForImageTextToText.from_pretrained(checkpoint), MSLlavaForConditionalGeneration)
    output = tmp_path / "demo.png"
    assert main(["demo", "--checkpoint", str(checkpoint), "--max-new-tokens", "2", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "projector: MS-Resampler M=16 windows=[2, 4, 8] beta=5.0 fusion=channel_mlp" in out
    assert f"[1/2] image: {checkpoint / 'samples' / 'a.png'} (48x48)" in out
    assert f"[2/2] image: {checkpoint / 'samples' / 'b.png'} (48x30)" in out
    assert "question: How many shapes are there?" in out and "expected: three" in out
    assert "question: What colour is the circle?" in out and "expected: blue" in out
    assert len(re.findall(r"answer: +'.*' +(RIGHT|WRONG)", out)) == 2
    assert re.search(r"correct: [0-2]/2", out)
    assert f"attention map: {output} (query 5 of 16, anchor row 2.5 col 2.5 on the 8x8 grid)" in out
    assert len(re.findall(r"k=\d: [\d.]+% of the attention inside the window", out)) == 3
    with Image.open(output) as picture:
        assert picture.size == panel_layout(3, 320, num_notes=1)


def test_demo_on_a_given_checkpoint_and_image(tiny_checkpoint_with_samples, tmp_path, capsys, image):
    image.save(tmp_path / "photo.png")
    args = ["demo", "--checkpoint", str(tiny_checkpoint_with_samples), "--image", str(tmp_path / "photo.png")]
    assert main([*args, "--question", "Hm?", "--output", str(tmp_path / "o.png"), "--query", "0"]) == 0
    out = capsys.readouterr().out
    assert "RANDOMLY INITIALISED" not in out and "question: Hm?" in out
    assert f"[1/1] image: {tmp_path / 'photo.png'}" in out and "expected:" not in out and "correct:" not in out
    assert "(query 0 of 16," in out and (tmp_path / "o.png").is_file()


def test_visualize_command(tiny_checkpoint_with_samples, tmp_path, capsys):
    output = tmp_path / "v.png"
    picture = tiny_checkpoint_with_samples / "samples" / "b.png"  # 48 x 30: padded to 48 x 48, then 32 x 32
    args = ["visualize", "--checkpoint", str(tiny_checkpoint_with_samples), "--image", str(picture)]
    assert (
        main([*args, "--query-at", "47,29", "--question", "Hm?", "--max-new-tokens", "2", "--output", str(output)])
        == 0
    )
    out = capsys.readouterr().out
    assert "question: Hm?" in out and re.search(r"answer: '.*'", out)
    # (47, 29) -> (47, 38) padded -> (31.3, 25.3) in the 32 px input -> token (6, 7.3): the last query's anchor
    assert f"attention map: {output} (query 15 of 16, anchor row 6.5 col 6.5 on the 8x8 grid)" in out
    with Image.open(output) as written:
        assert written.size == panel_layout(3, 320, num_notes=1)
    # no --image: the checkpoint's first demo sample
    assert main(["visualize", "--checkpoint", str(tiny_checkpoint_with_samples), "--output", str(output)]) == 0
    assert f"image: {tiny_checkpoint_with_samples / 'samples' / 'a.png'} (48x48)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--query", "16"], r"query must be an integer in \[0, 16\) \(M = 16\), got 16"),
        (["--query-at", "1;2"], "expected a point as x,y in pixels"),
        (["--query-at", "100,2"], r"query_at \(100.0, 2.0\) lies outside"),
        (["--output", "x.jpg"], "--output must be a .png file, got 'x.jpg'"),
        (["--query", "1", "--query-at", "1,2"], "not allowed with argument"),
    ],
)
def test_visualize_refuses_bad_arguments(tiny_checkpoint_with_samples, capsys, extra, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["visualize", "--checkpoint", str(tiny_checkpoint_with_samples), *extra])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_demo_refuses_a_missing_image(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--image", "/nonexistent/photo.png"])
    assert "no such file: /nonexistent/photo.png" in capsys.readouterr().err


def test_the_main_command_writes_an_ignored_file_and_the_readme_says_where():
    """`ms-llava demo` in a fresh clone leaves the tracked files unchanged: its picture has a name git ignores here,
    and the README says where it goes. (The README's Python snippets run in tests/test_readme_snippets.py.)"""
    import shutil
    import subprocess

    from ms_llava.demo import DEMO_OUTPUT

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"writes `{DEMO_OUTPUT}` in the current directory (git ignores that name in this repository" in readme
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git whether the demo's output is ignored")
    ignored = subprocess.run(["git", "check-ignore", "-q", DEMO_OUTPUT], cwd=ROOT, check=False)
    tracked = subprocess.run(["git", "ls-files", DEMO_OUTPUT], cwd=ROOT, capture_output=True, text=True, check=True)
    assert ignored.returncode == 0 and tracked.stdout == ""
