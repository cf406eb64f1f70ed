import json
import re
from pathlib import Path

import pytest
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from ms_llava import MSLlavaForConditionalGeneration
from ms_llava.chat import default_checkpoint_path, load_demo_samples
from ms_llava.visualize import panel_layout
from ms_llava_cli import COMMANDS, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster, and steady on a shared machine

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
    from ms_llava import chat

    monkeypatch.setattr(chat, "DEFAULT_CHECKPOINT_DIR", tmp_path / "default_checkpoint")
    (tmp_path / "default_checkpoint").mkdir()
    (tmp_path / "default_checkpoint" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"default_checkpoint lacks demo_samples.json, \*.safetensors"):
        chat.default_checkpoint_path()


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
def test_visualize_refuses_bad_arguments(tiny_checkpoint_with_samples, run_cli, extra, message, monkeypatch, tmp_path):
    """Exit status 2, as argparse's own refusals, also for what is known only once the checkpoint is loaded (M)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["visualize", "--checkpoint", str(tiny_checkpoint_with_samples), *extra])
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err)


def test_demo_refuses_a_missing_image(run_cli):
    code, _, err = run_cli(["demo", "--image", "/nonexistent/photo.png"])
    assert code == 2 and "no such file: /nonexistent/photo.png" in err


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


# ----------------------------------------------------------------------------------------------- the dispatcher


def test_help_and_argument_errors_answer_without_importing_the_package():
    """`ms-llava --help`, a command's `--help` and an argument error are answered by `ms_llava_cli` alone: neither
    `ms_llava` (whose __init__ imports torch and transformers to register the Auto classes) nor torch is imported
    (but for `train`, whose options are `TrainingArguments`' fields). The console script is timed too (the target is
    1 s on a quiet 2-core machine; the bound here leaves room for a busy one)."""
    import subprocess
    import sys
    import time

    calls = [
        ["--help"],
        ["no-such-command"],
        [],
        ["chat", "--bogus"],
        ["demo", "--max-new-tokens", "0"],
        ["convert", "llava-to-ms-llava", "--output", "x"],
        ["compose", "--fusion", "sum"],
        ["eval", "--help"],
    ]
    script = (
        f"import sys\nfrom ms_llava_cli import main\nfor argv in {calls!r}:\n"
        "    try:\n        main(argv)\n    except SystemExit as exit_info:\n        print('EXIT', exit_info.code)\n"
        "print('LOADED', sorted(name for name in ('ms_llava', 'torch', 'transformers') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.count("EXIT 2") == 6 and done.stdout.count("EXIT 0") == 2, done
    assert "LOADED []" in done.stdout, done
    for expected in (
        "invalid choice: 'no-such-command'",
        "required: COMMAND",
        "unrecognized arguments: --bogus",
        "argument --max-new-tokens: must be an integer >= 1, got '0'",
        "the following arguments are required: --source",
        "argument --fusion: invalid choice: 'sum'",
    ):
        assert expected in done.stderr, (expected, done.stderr)
    assert "usage: ms-llava eval" in done.stdout and "--log-samples" in done.stdout
    for name, (_, _, help_line) in COMMANDS.items():
        assert f"{name}" in done.stdout and " ".join(help_line.split()[:3]) in " ".join(done.stdout.split())
    script = Path(sys.executable).parent / "ms-llava"
    for argv in (["--help"], ["chat", "--bogus"]):
        started = time.perf_counter()
        done = subprocess.run([script, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == (0 if argv == ["--help"] else 2) and time.perf_counter() - started < 3, done


def test_the_command_tables_literals_are_the_packages():
    """The option values `ms_llava_cli` spells out (so as not to import the package) are the package's own."""
    from typing import get_args

    import ms_llava_cli
    from ms_llava import MSResamplerConfig
    from ms_llava.conversion.streaming import DEFAULT_MAX_SHARD_SIZE
    from ms_llava.demo import DEMO_OUTPUT

    assert ms_llava_cli.FUSIONS == get_args(MSResamplerConfig.__annotations__["fusion"])
    assert ms_llava_cli.MAX_SHARD_SIZE == DEFAULT_MAX_SHARD_SIZE
    assert ms_llava_cli.DEMO_OUTPUT == DEMO_OUTPUT


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("demo", "--query-at"),
        ("visualize", "--query-at"),
        ("chat", "--image"),
        ("tiny", "--overwrite"),
        ("convert", "llava-to-ms-llava"),
        ("convert", "original-to-hf"),
        ("compose", "--vision-tower"),
        ("push", "repo_id"),
        ("eval", "--log-samples"),
        ("train", "--stage"),
    ],
)
def test_every_command_has_its_options(command, option, run_cli):
    """Each command's options (the table's first column) are what `--help` lists."""
    code, out, _ = run_cli([command, "--help"])
    assert code == 0 and out.startswith(f"usage: ms-llava {command}") and option in out


def test_demo_says_in_one_line_that_a_question_is_longer_than_the_context(run_cli, tmp_path):
    code, _, err = run_cli(["demo", "--question", "word " * 1200, "--output", tmp_path / "o.png"])
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 2
    assert re.search(r"error: the prompt holds \d+ tokens, more than the language model's context", err)
    assert not (tmp_path / "o.png").exists()


# --------------------------------------------------------------------------------------------------- ms-llava chat


def test_chat_streams_keeps_the_conversation_and_goes_on_after_a_refusal(run_cli, monkeypatch, capsys):
    """Questions from standard input (not a terminal), one per line: answers streamed token by token through
    transformers' `TextStreamer`, the images placed in the turn they were given, `/image` adding one, a question
    beyond the context refused in one line without ending the session, `/reset` starting over."""
    import io

    from transformers import TextStreamer, pipeline

    from ms_llava.images import load_image

    samples = {sample["answer"]: sample["image"] for sample in load_demo_samples(default_checkpoint_path())}
    # the conversation's second turn, as the pipeline answers it: both turns, each with its image where it was given
    question = "How many objects are there?"
    turns = [
        {
            "role": "user",
            "content": [{"type": "image", "image": load_image(samples["two"])}, {"type": "text", "text": question}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": load_image(samples["five"])}, {"type": "text", "text": question}],
        },
    ]
    reference = pipeline("image-text-to-text", model=str(default_checkpoint_path()))
    second = reference(text=turns, generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    second = second[0]["generated_text"][-1]["content"].strip()
    capsys.readouterr()  # the reference's loading bars
    calls = []  # what generate gave the streamer: the prompt, then each new token, then the end
    for method in ("put", "end"):
        original = getattr(TextStreamer, method)
        monkeypatch.setattr(
            TextStreamer, method, lambda self, *args, _o=original, _m=method: (calls.append(_m), _o(self, *args))
        )
    lines = [
        "How many objects are there?",
        f"/image {samples['five']}",
        "How many objects are there?",
        "word " * 1200,
        "/image /no/such/image.png",
        "/reset",
        f"/image {samples['four']}",
        "How many objects are there?",
    ]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = run_cli(["chat", "--image", samples["two"], "--max-new-tokens", "4"])
    assert code == 0, err
    answers = re.findall(r"ASSISTANT: (.*)", out)
    assert answers == ["two", second, "", "four"], out  # the third was refused: nothing was answered
    assert out.count("USER: How many objects are there?") == 3
    # every answer came through the streamer, token by token: three ends, and a put per token after each prompt
    assert calls.count("end") == 3 and calls.count("put") >= 3 + 4, calls
    refusals = err.strip().splitlines()
    assert len(refusals) == 2 and "Traceback" not in err
    assert re.search(r"error: the prompt holds \d+ tokens, more than the language model's context", refusals[0])
    assert "question not kept" in refusals[0] and "image file not found: /no/such/image.png" in refusals[1]


@pytest.mark.slow
def test_chat_scripts_from_a_pipe(tmp_path):
    """`printf 'What colour?\\nHow many?\\n' | ms-llava chat --image x.png`, with the embedded default checkpoint."""
    import os
    import shutil
    import subprocess
    import sys

    image = Path(load_demo_samples(default_checkpoint_path())[0]["image"])
    shutil.copy(image, tmp_path / "x.png")
    done = subprocess.run(
        [Path(sys.executable).parent / "ms-llava", "chat", "--image", "x.png"],
        input="How many objects are there?\nWhat colour is the object with the digit?\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0 and done.stderr.count("error") == 0, done.stderr
    assert f"checkpoint: {default_checkpoint_path()}" in done.stdout
    answers = re.findall(r"ASSISTANT: (.*)", done.stdout)
    assert len(answers) == 2 and answers[0] == "two" and all(answers), done.stdout
