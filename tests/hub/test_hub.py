"""Hub push and pull with the real huggingface_hub client over HTTP, against tests/hub_server.py on 127.0.0.1, and
the model card built from a run's records.

One module-scoped fixture publishes every repo once (pushes are in-process, one of them a converted transformers
LLaVA); every pull without `ms_llava` runs in one fresh subprocess that cannot import it and cannot reach anything but
127.0.0.1.
"""

import json
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from transformers import AutoModelForImageTextToText, AutoProcessor

from isolation import hub_subprocess_env, local_hub_clients, run_python
from llava_checkpoints import QUIET, TINY_RESAMPLER, save_llava
from messages import chat
from ms_llava import MSLlavaForConditionalGeneration, MSLlavaProcessor
from ms_llava.conversion import convert_llava_to_ms_llava
from ms_llava.hub import CARD_TAGS, REMOTE_CODE_MODULES, build_model_card, push_to_hub, write_model_card
from ms_llava.testing_utils import build_tiny_checkpoint, sample_image
from ms_llava_cli import main

REPO = "ms-llava-test/tiny"  # main: seed 1 (2nd push), tag v2; first commit: seed 0; branch dev: seed 2
NATIVE = "ms-llava-test/tiny-native"  # transformers' own model.push_to_hub / processor.push_to_hub, seed 0
FILLED = "ms-llava-test/tiny-no-modules"  # pushed from a folder without the modules and auto_map, seed 0
ADAPTER = "ms-llava-test/tiny-native-lora"  # a LoRA adapter (peft) on top of NATIVE
CONVERTED = "ms-llava-test/converted-from-llava"  # a transformers LLaVA, converted, then pushed
LORA_TARGETS = r".*language_model.*\.(q_proj|v_proj)"
CHECKPOINT_FILES = {
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    *REMOTE_CODE_MODULES,
}
RESULTS = {"POPE": 87.0, "GQA": 62.0, "OCRBench": 301}


def inputs_for(processor, image, text="Hi"):
    prompt = processor.apply_chat_template(chat(text), add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def usage_snippet(card_text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```python\n(.+?)\n```", card_text, flags=re.S)
    assert match, f"the model card lost its {marker} snippet"
    return match.group(1)


@pytest.fixture(scope="module")
def published(hub_server, tiny, tiny_dir, tmp_path_factory, folder_contents):
    """Pushes every repo the tests read, and returns the commits and the logits expected from each."""
    model0, processor = tiny
    image = sample_image(size=48, seed=1)
    inputs = inputs_for(processor, image)
    model1, _ = build_tiny_checkpoint(seed=1)
    model2, _ = build_tiny_checkpoint(seed=2)
    scratch = tmp_path_factory.mktemp("published")
    with local_hub_clients(hub_server.url, scratch / "cache"):
        first = push_to_hub(tiny_dir, REPO, base_model="llava-hf/llava-1.5-7b-hf")
        model1.save_pretrained(scratch / "seed1")
        processor.save_pretrained(scratch / "seed1")
        second = push_to_hub(
            scratch / "seed1", REPO, base_model="llava-hf/llava-1.5-7b-hf", results=RESULTS, training="paper"
        )
        HfApi().create_tag(REPO, tag="v2", revision=second.oid)
        dev = push_to_hub(model2, REPO, processor=processor, revision="dev", commit_message="seed 2 on dev")

        model0.push_to_hub(NATIVE)
        processor.push_to_hub(NATIVE)

        bare = shutil.copytree(tiny_dir, scratch / "bare")
        for module in REMOTE_CODE_MODULES:
            (bare / module).unlink()
        for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
            content = json.loads((bare / name).read_text())
            content.pop("auto_map")
            content.get("image_processor", {}).pop("auto_map", None)
            (bare / name).write_text(json.dumps(content))
        bare_before = folder_contents(bare)
        push_to_hub(bare, FILLED)
        bare_after = folder_contents(bare)

        from peft import LoraConfig, get_peft_model

        base = AutoModelForImageTextToText.from_pretrained(NATIVE).eval()  # with the package: no remote code
        base_logits = logits_of(base, inputs)
        with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            lora = LoraConfig(r=4, target_modules=LORA_TARGETS, init_lora_weights=False)  # B != 0: not a no-op
            adapted = get_peft_model(base, lora).eval()
        adapted_logits = logits_of(adapted, inputs)
        lora_modules = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in adapted.named_parameters() if ".lora_A" in n})
        adapted.push_to_hub(ADAPTER)

        converted = scratch / "converted"  # a transformers LLaVA -> convert -> push
        report = convert_llava_to_ms_llava(save_llava(scratch / "llava"), converted, **TINY_RESAMPLER, **QUIET)
        converted_model = AutoModelForImageTextToText.from_pretrained(converted).eval()
        converted_inputs = inputs_for(
            AutoProcessor.from_pretrained(converted), sample_image(44, seed=12), "What is it?"
        )
        push_to_hub(converted, CONVERTED, base_model="local/tiny-llava")
    image_path = scratch / "image.png"
    image.save(image_path)
    sample_image(44, seed=12).save(scratch / "converted.png")
    return {
        "commits": {"first": first.oid, "second": second.oid, "dev": dev.oid},
        "inputs": inputs,
        "image_path": image_path,
        "logits": {seed: logits_of(model, inputs) for seed, model in enumerate([model0, model1, model2])},
        "native_pulled_with_package": (type(base), base_logits),
        "adapted_logits": adapted_logits,
        "lora_modules": lora_modules,
        "bare_directory": (bare_before, bare_after),
        "converted": (
            report,
            converted_inputs,
            logits_of(converted_model, converted_inputs),
            scratch / "converted.png",
        ),
    }


PULL_WITHOUT_PACKAGE = """
import sys
import torch
from PIL import Image
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

repo, native, filled, adapter, converted, first, image_path, converted_image, out = sys.argv[1:10]


def load(repo_id, **kwargs):
    model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True, **kwargs).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return model


def inputs_of(processor, path, text):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=Image.open(path), text=prompt, return_tensors="pt")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
inputs = inputs_of(processor, image_path, "Hi")
result = {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"]}
result["main"] = logits(load(repo), inputs)
result["first"] = logits(load(repo, revision=first), inputs)
result["tag"] = logits(load(repo, revision="v2"), inputs)
result["branch"] = logits(load(repo, revision="dev"), inputs)
result["native"] = logits(load(native), inputs)
native_processor = AutoProcessor.from_pretrained(native, trust_remote_code=True)
assert type(native_processor).__module__.startswith("transformers_modules"), type(native_processor).__module__
result["filled"] = logits(load(filled), inputs)
result["adapter"] = logits(PeftModel.from_pretrained(load(native), adapter).eval(), inputs)
converted_inputs = inputs_of(AutoProcessor.from_pretrained(converted, trust_remote_code=True), converted_image, "What is it?")
result["converted_input_ids"], result["converted"] = converted_inputs["input_ids"], logits(load(converted), converted_inputs)

card = ModelCard.load(repo).content
snippet = card.split("<!-- usage-remote-code -->\\n```python\\n", 1)[1].split("\\n```", 1)[0]
namespace = {}
exec(compile(snippet, "README.md (usage-remote-code)", "exec"), namespace)
result["snippet_answer"] = namespace["answer"]
torch.save(result, out)
"""


@pytest.mark.slow
def test_pull_without_the_package_in_a_fresh_process(published, hub_server, tmp_path):
    """Remote code only: bit-exact logits on main, at the first commit's sha, at a tag, on a branch, for transformers'
    own push, for a push that had to add the modules, for a LoRA adapter on its base, and for a transformers LLaVA
    converted and pushed (the same logits as before the push); the card's snippet runs."""
    commits, expected = published["commits"], published["logits"]
    report, converted_inputs, converted_logits, converted_image = published["converted"]
    out = tmp_path / "result.pt"
    run_python(
        PULL_WITHOUT_PACKAGE,
        REPO,
        NATIVE,
        FILLED,
        ADAPTER,
        CONVERTED,
        commits["first"],
        published["image_path"],
        converted_image,
        out,
        env=hub_subprocess_env(hub_server.url, tmp_path / "hf_home"),
        cwd=tmp_path,
    )
    result = torch.load(out)
    assert torch.equal(result["input_ids"], published["inputs"]["input_ids"])
    assert torch.equal(result["pixel_values"], published["inputs"]["pixel_values"])
    assert not torch.equal(expected[0], expected[1]) and not torch.equal(expected[1], expected[2])
    assert torch.equal(result["main"], expected[1])
    assert torch.equal(result["first"], expected[0])
    assert torch.equal(result["tag"], expected[1])
    assert torch.equal(result["branch"], expected[2])
    assert torch.equal(result["native"], expected[0])
    assert torch.equal(result["filled"], expected[0])
    assert not torch.equal(published["adapted_logits"], expected[0])  # the adapter changes the outputs
    assert torch.equal(result["adapter"], published["adapted_logits"])
    assert report.parity and max(report.parity.values()) == 0.0  # tower and LM carried over exactly
    assert any("multi_modal_projector" in key for keys in report.dropped.values() for key in keys)
    assert torch.equal(result["converted_input_ids"], converted_inputs["input_ids"])
    assert torch.equal(result["converted"], converted_logits)
    assert isinstance(result["snippet_answer"], str)
    assert hub_server.errors == [] and hub_server.unhandled == []


@pytest.mark.slow
def test_push_leaves_the_checkpoint_directory_as_it_was(published):
    """The push adds the modules and auto_map to the commit (staged elsewhere), never to the folder it reads."""
    before, after = published["bare_directory"]
    assert after == before
    assert not set(REMOTE_CODE_MODULES) & set(after) and "auto_map" not in json.loads(after["config.json"])


@pytest.mark.slow
def test_pull_with_the_package_and_lora_targets(published, hub):
    model_class, logits = published["native_pulled_with_package"]
    assert model_class is MSLlavaForConditionalGeneration  # the package's class, not remote code
    assert torch.equal(logits, published["logits"][0])
    first = published["commits"]["first"]
    model = AutoModelForImageTextToText.from_pretrained(REPO, revision=first).eval()
    processor = AutoProcessor.from_pretrained(REPO, revision=first)
    assert type(model) is MSLlavaForConditionalGeneration and type(processor) is MSLlavaProcessor
    assert torch.equal(logits_of(model, published["inputs"]), published["logits"][0])
    modules = published["lora_modules"]
    assert len(modules) == 2 * 2  # q_proj and v_proj of the 2 Llama layers
    assert all(".language_model." in name and name.endswith(("q_proj", "v_proj")) for name in modules)


@pytest.mark.slow
def test_repo_files_refs_and_commits(published, hub):
    api = HfApi()
    commits = published["commits"]
    assert {entry.path for entry in api.list_repo_tree(REPO, recursive=True)} == CHECKPOINT_FILES
    assert set(api.list_repo_files(NATIVE)) == CHECKPOINT_FILES
    assert set(api.list_repo_files(FILLED)) == CHECKPOINT_FILES
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == commits["second"] and info.pipeline_tag == "image-text-to-text"
    assert {s.rfilename for s in info.siblings} == CHECKPOINT_FILES and all(s.size > 0 for s in info.siblings)
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": commits["second"], "dev": commits["dev"]}
    assert {t.name: t.target_commit for t in refs.tags} == {"v2": commits["second"]}
    history = api.list_repo_commits(REPO)
    assert [c.commit_id for c in history[:2]] == [commits["second"], commits["first"]] and len(history) == 3
    assert api.list_repo_commits(REPO, revision="dev")[0].title == "seed 2 on dev"
    for repo in (REPO, NATIVE, FILLED):
        config = json.loads(Path(api.hf_hub_download(repo, "config.json")).read_text())
        processor_config = json.loads(Path(api.hf_hub_download(repo, "processor_config.json")).read_text())
        assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_ms_llava.MSLlavaForConditionalGeneration"
        assert processor_config["auto_map"] == {"AutoProcessor": "processing_ms_llava.MSLlavaProcessor"}


@pytest.mark.slow
def test_model_card_and_its_snippet(published, hub):
    first = ModelCard.load(HfApi().hf_hub_download(REPO, "README.md", revision=published["commits"]["first"]))
    card = ModelCard.load(REPO)
    for loaded in (first, card):
        data = loaded.data
        assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
        assert data.base_model == "llava-hf/llava-1.5-7b-hf" and data.license == "apache-2.0"
        assert set(CARD_TAGS) <= set(data.tags)
        for row in (
            "| visual tokens per image (queries per branch) | M | 16 |",
            "| scope windows per branch | k^(e) | [2, 4, 8] |",
            "| branches | E | 3 |",
            "| scope-prior strength | beta | 5.0 |",
            "| scope bias B | B | fixed (Eq. 5) |",
            "| fusion | | `channel_mlp` (Eq. 7-8, hidden width h = 5, `gelu`) |",
            "| attention width / heads per branch | D | 20 / 2 |",
            "| 2. instruction tuning | MS-Resampler + LLM | vision encoder | LLaVA-1.5 665K instruction data | 1e-5 | 16 | 1 |",
        ):
            assert row in loaded.text, row
        assert re.search(
            r"\| parameters \| \| [\d.]+K \([\d,]+\) in total, [\d.]+K \([\d,]+\) in the projector \|", loaded.text
        )
        assert f'model_id = "{REPO}"' in usage_snippet(loaded.text, "usage-remote-code")
    assert "**Untrained weights.**" in first.text and "No evaluation results were given" in first.text
    assert "**Untrained weights.**" not in card.text
    assert "Trained with the paper's recipe (Sec. 4.1, LLaVA-1.5 data), as stated by the uploader" in card.text
    assert (
        "| POPE | 87 |" in card.text
        and "| OCRBench | 301 |" in card.text
        and "Scores as stated by the uploader" in card.text
    )
    namespace = {}
    exec(compile(usage_snippet(card.text, "usage-with-package"), "README.md (usage-with-package)", "exec"), namespace)
    assert isinstance(namespace["answer"], str) and type(namespace["model"]) is MSLlavaForConditionalGeneration


# --------------------------------------------------------------------------------------------- cards from records


def test_the_card_states_the_recorded_run_and_labels_every_evaluation_row(recorded_run, tmp_path):
    """A tiny run's card: its own learning rate, batch and example count from the folder's training record, none of
    the paper's data or numbers; evaluation rows with task, data source, samples and --limit, and only the official
    full run labelled as the paper's benchmark."""
    folder, results = recorded_run
    text = build_model_card(folder, "me/tiny-run", results=results).text
    assert "**Untrained weights.**" not in text
    assert (
        "| 1. pretrain | `runs/composed` | `shapes/caption-0.json` | 40 (2 skipped) | model.multi_modal_projector |"
        in text
    )
    assert "| none | 0.003 (cosine, warm-up 0.1) | 8 (4 x 2 x 1) | 2 | 10 of 10 |" in text
    for paper in ("558K", "665K", "0.001", "LLaVA-1.5 data", "paper's pretrain hyper-parameters"):
        assert paper not in text, paper
    assert "| pope | pope_accuracy | 85.2 | POPE | `lmms-lab/POPE` @ abc123 | 9000 | none |" in text
    assert (
        "| gqa | exact_match | 50 | not the paper's benchmark (--limit 4) | `lmms-lab/GQA` @ unpinned | 4 | 4 |"
        in text
    )
    assert (
        "| pope_local | pope_accuracy | 62.5 | not the paper's benchmark (local data) | `/data/pope-24` (a local copy) | 24 (1 unreadable) | none |"
        in text
    )
    assert "as stated by the uploader" not in text

    # a record that ran the paper's stage-1 hyper-parameters says so, and the uploader's statement is marked as such
    record = json.loads((folder / "ms_llava_training.json").read_text())
    record["stages"][0].update(learning_rate=1e-3, global_batch_size=32, num_train_epochs=1.0)
    (folder / "ms_llava_training.json").write_text(json.dumps(record))
    text = build_model_card(folder, "me/tiny-run", training="paper", results={"MMB": 65.6}).text
    assert "stage 1 ran the paper's pretrain hyper-parameters (Sec. 4.1: learning rate, global batch, epochs)" in text
    assert "Training as stated by the uploader" not in text and "as stated by the uploader, not from a record" in text
    assert "Scores as stated by the uploader, not from a record" in text and "| MMB | 65.6 |" in text


def test_the_card_reports_what_was_built_at_the_chosen_size(tiny_dir):
    text = build_model_card(tiny_dir).text
    assert "| attention width / heads per branch | D | 20 / 2 |" in text and "**Untrained weights.**" in text
    assert (
        "| vision encoder | | `clip_vision_model`, 32 px, patch 4, width 24 (8 x 8 = 64 tokens, layer -2, `default`) |"
        in text
    )
    assert "| language model | | `llama`, width 32, 2 layers, vocabulary 400 |" in text


@pytest.mark.slow
def test_the_card_of_a_peft_adapter_folder(tiny_dir, tmp_path, training_record):
    """`write_model_card` on a LoRA output: peft's library, the base model's Hub id (never a local path), the
    adapter's settings and size, the base's MS-Resampler when the base folder is at hand, the run's record."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_checkpoint(seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    adapted.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "ms_llava_training.json").write_text(json.dumps(training_record))
    for base, expected in ((str(tiny_dir), None), ("org/ms-llava-base", "org/ms-llava-base")):
        config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
        (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        card = ModelCard.load(write_model_card(tmp_path / "lora"))
        assert card.data.library_name == "peft" and card.data.base_model == expected and str(tiny_dir) not in card.text
        assert "- adapter: LORA, r 4, lora_alpha 8" in card.text and "0.003 (cosine, warm-up 0.1)" in card.text
        assert "PeftModel.from_pretrained(base," in card.text and "**Untrained weights.**" not in card.text
        assert ("| attention width / heads per branch | D | 20 / 2 |" in card.text) == (expected is None)


# --------------------------------------------------------------------------------------------- dry run, network


def test_dry_run_writes_what_a_push_would_upload_and_contacts_nobody(
    recorded_run, hub, tmp_path, capsys, folder_contents
):
    """`ms-llava push DIR REPO --dry-run OUT`: no request reaches the Hub; OUT holds exactly the files a real push
    commits (card included), byte for byte; a training run's intermediate checkpoint-N/ stays local."""
    folder, results = recorded_run
    (folder / "checkpoint-2").mkdir()
    for name in ("model.safetensors", "config.json", "modeling_ms_llava.py"):
        shutil.copyfile(folder / name, folder / "checkpoint-2" / name)
    requests = len(hub.log)
    assert (
        main(["push", str(folder), "ms-llava-test/dry", "--results", str(results), "--dry-run", str(tmp_path / "out")])
        == 0
    )
    assert f"into {tmp_path / 'out'}" in capsys.readouterr().out and len(hub.log) == requests
    written = folder_contents(tmp_path / "out")
    assert "ms_llava_training.json" not in written and "README.md" in written and "model.safetensors" in written
    assert not any(name.startswith("checkpoint-2") for name in written), sorted(written)
    assert "0.003 (cosine, warm-up 0.1)" in written["README.md"].decode()
    push_to_hub(folder, "ms-llava-test/dry", results=results)
    pulled = Path(snapshot_download("ms-llava-test/dry"))
    assert {name: content for name, content in folder_contents(pulled).items() if name != ".gitattributes"} == written
    with pytest.raises(ValueError, match="--dry-run .*: not a new or empty folder"):
        push_to_hub(folder, "ms-llava-test/dry", dry_run=tmp_path / "out")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_fails_at_once_naming_the_host_and_the_dry_run(tiny_dir, tmp_path, capsys, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with local_hub_clients(endpoint, tmp_path / "cache"):
        started = time.perf_counter()
        with pytest.raises(ConnectionError) as error:
            push_to_hub(tiny_dir, "ms-llava-test/unreachable")
        assert time.perf_counter() - started < 5
        message = str(error.value)
        assert f"cannot reach the Hub at {endpoint.removeprefix('http://')}" in message
        assert "--dry-run OUT" in message and "HF_HUB_OFFLINE=1" in message and "nothing was committed" in message
        code = main(["push", str(tiny_dir), "ms-llava-test/unreachable"])
        assert code == 1 and "cannot reach the Hub at 127.0.0.1:" in capsys.readouterr().err
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE is set, and pushing needs the Hub.*--dry-run OUT"):
            push_to_hub(tiny_dir, "ms-llava-test/unreachable")


# --------------------------------------------------------------------------------------------- what is refused


def _requests(server) -> int:
    return len(server.log)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), r"no weights \(model\.safetensors"),
        (
            lambda d: [(d / n).unlink() for n in ("processor_config.json", "tokenizer.json")],
            r"the processor's files are missing: processor_config\.json \(or preprocessor_config\.json\), tokenizer\.json \(or tokenizer\.model\)",
        ),
        (lambda d: (d / "config.json").unlink(), r"no config\.json"),
        (
            lambda d: (d / "processor_config.json").write_text(
                (d / "processor_config.json").read_text().replace('"num_image_tokens": 16', '"num_image_tokens": 9')
            ),
            r"num_image_tokens=9 .* resampler_config\.num_queries=16",
        ),
        (
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace('"model_type": "ms_llava"', '"model_type": "llava"')
            ),
            r"model_type 'llava', not 'ms_llava'",
        ),
        (
            lambda d: [
                (d / name).write_text((d / name).read_text().replace(before, after))
                for name, before, after in (
                    ("config.json", '"num_queries": 16', '"num_queries": 15'),
                    ("processor_config.json", '"num_image_tokens": 16', '"num_image_tokens": 15'),
                )
            ],
            r"config\.json: .*num_queries \(M\) must be a positive perfect square.* got num_queries=15",
        ),
        (
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 40')
            ),
            r"model\.safetensors holds .* with shape \[\d+, 32\], but config\.json builds \[\d+, 40\]: the config and the weights disagree",
        ),
    ],
    ids=["weights", "processor", "config", "M", "model type", "invalid config", "config vs weights"],
)
def test_push_refuses_a_bad_checkpoint_before_sending_anything(tiny_dir, tmp_path, hub, damage, message):
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    damage(broken)
    sent = _requests(hub)
    with pytest.raises(ValueError, match=message):
        push_to_hub(broken, "ms-llava-test/broken")
    assert _requests(hub) == sent and ("model", "ms-llava-test/broken") not in hub.repos


def test_push_refuses_bad_arguments_before_sending_anything(tiny, tiny_dir, tmp_path, hub, capsys):
    model, _ = tiny
    sent = _requests(hub)
    with pytest.raises(ValueError, match=r"the score of 'POPE' must be a finite number, got 'high'"):
        push_to_hub(tiny_dir, "ms-llava-test/broken", results={"POPE": "high"})
    with pytest.raises(ValueError, match=r"--training: no such file: yes \(or give 'paper'\)"):
        push_to_hub(tiny_dir, "ms-llava-test/broken", training="yes")
    with pytest.raises(
        ValueError, match=r"training must be None \(untrained\), 'paper' or a dict with a 'stages' list"
    ):
        push_to_hub(tiny_dir, "ms-llava-test/broken", training={"stages": "two"})
    with pytest.raises(ValueError, match=r"needs its processor"):
        push_to_hub(model, "ms-llava-test/broken")
    with pytest.raises(ValueError, match=r"Repo id must"):
        push_to_hub(tiny_dir, "a/b/c")
    with pytest.raises(ValueError, match=r"expected a non-empty ms-llava-eval-results/1 record"):
        push_to_hub(tiny_dir, "ms-llava-test/broken", results={"format": "other", "rows": []})
    code = main(["push", str(tiny_dir), "ms-llava-test/broken", "--results", str(tmp_path / "missing.json")])
    assert code == 1 and f"--results: no such file: {tmp_path / 'missing.json'}" in capsys.readouterr().err
    code = main(["push", str(tmp_path), "ms-llava-test/broken"])
    assert code == 1 and "no config.json, so not a checkpoint" in capsys.readouterr().err
    assert _requests(hub) == sent


@pytest.mark.slow
def test_push_with_a_processor_replaces_the_folder_processor_and_prunes_stale_files(tiny, tiny_dir, tmp_path, hub):
    _, processor = tiny
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, model_only / name)
    sent = _requests(hub)
    broken = shutil.copytree(model_only, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights \(model\.safetensors"):
        push_to_hub(broken, "ms-llava-test/broken", processor=processor)
    assert _requests(hub) == sent
    shutil.copytree(tiny_dir, tmp_path / "extra")
    (tmp_path / "extra" / "special_tokens_map.json").write_text("{}")
    (tmp_path / "extra" / "optimizer.pt").write_bytes(b"not part of a checkpoint")
    repo = "ms-llava-test/processor-given"
    push_to_hub(tmp_path / "extra", repo)
    files = set(HfApi().list_repo_files(repo))
    assert "special_tokens_map.json" in files and "optimizer.pt" not in files
    push_to_hub(model_only, repo, processor=processor)
    assert set(HfApi().list_repo_files(repo)) == CHECKPOINT_FILES
    assert sorted(path.name for path in model_only.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


@pytest.mark.slow
def test_push_deletes_the_shards_of_an_earlier_sharded_push_in_one_commit(tiny, tiny_dir, tmp_path, hub, capsys):
    model, processor = tiny
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    processor.save_pretrained(sharded)
    shards = {path.name for path in sharded.glob("model-*.safetensors")}
    assert len(shards) > 1
    repo = "ms-llava-test/resharded"
    push_to_hub(sharded, repo)
    assert shards | {"model.safetensors.index.json"} <= set(HfApi().list_repo_files(repo))
    commit = push_to_hub(tiny_dir, repo)
    assert set(HfApi().list_repo_files(repo)) == CHECKPOINT_FILES
    assert HfApi().list_repo_commits(repo)[0].commit_id == commit.oid  # the upload and the deletions: one commit
    assert len(HfApi().list_repo_commits(repo)) == 3

    (tmp_path / "results.json").write_text(json.dumps({"MMB": 65.6}))  # the command line's options
    repo = "ms-llava-test/from-cli"
    args = ["push", str(tiny_dir), repo, "--private", "--revision", "release", "--base-model", "org/base"]
    args += ["--license", "mit", "--results", str(tmp_path / "results.json"), "--commit-message", "from the CLI"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"pushed {tiny_dir} to {repo}" in out and "marks these weights as UNTRAINED" in out
    api = HfApi()
    assert api.model_info(repo).private
    assert api.list_repo_commits(repo, revision="release")[0].title == "from the CLI"
    card = ModelCard.load(api.hf_hub_download(repo, "README.md", revision="release"))
    assert card.data.license == "mit" and card.data.base_model == "org/base" and "| MMB | 65.6 |" in card.text
    with pytest.raises(SystemExit):
        main(["push", str(tiny_dir)])


def test_model_card_template_ships_with_the_package():
    """model_cards/ is mapped to ms_llava.model_cards (pyproject); packages are listed by hand, so check none is left
    out of the wheel."""
    from importlib import resources

    from setuptools.config.pyprojecttoml import read_configuration  # reads TOML on Python 3.10 too (no tomllib)

    from ms_llava.hub import MODEL_CARD_TEMPLATE, model_card_template

    root = Path(__file__).resolve().parents[2]
    assert resources.files("ms_llava.model_cards").joinpath(MODEL_CARD_TEMPLATE).is_file()
    assert model_card_template() == (root / "model_cards" / MODEL_CARD_TEMPLATE).read_text()
    packages = set(read_configuration(root / "pyproject.toml")["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(root / "src").parts) for init in (root / "src").rglob("__init__.py")}
    assert on_disk | {"ms_llava.model_cards"} == packages


@pytest.mark.slow
def test_hub_server_speaks_the_clients_protocol(hub, tmp_path):
    """The server answers the client calls beyond push/pull as the Hub does (typed errors, refs, conflicts)."""
    from huggingface_hub import CommitOperationAdd, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import get_session

    api, repo = HfApi(), "ms-llava-test/protocol"
    api.create_repo(repo)
    api.create_repo(repo, exist_ok=True)
    first = api.upload_file(path_or_fileobj=b"hello", path_in_repo="a/b.txt", repo_id=repo)
    add = [CommitOperationAdd("c.txt", b"c" * 10), CommitOperationAdd("a/d.txt", b"d")]
    second = api.create_commit(repo, add, commit_message="two", parent_commit=first.oid)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_commit(repo, [CommitOperationAdd("e.txt", b"e")], commit_message="late", parent_commit=first.oid)
    assert conflict.value.response.status_code == 412
    assert [(e.path, type(e).__name__) for e in api.list_repo_tree(repo)] == [
        ("a", "RepoFolder"),
        (".gitattributes", "RepoFile"),
        ("c.txt", "RepoFile"),
    ]
    expanded = {e.path: e.last_commit.oid for e in api.list_repo_tree(repo, recursive=True, expand=True)}
    assert expanded["a/b.txt"] == first.oid and expanded["a/d.txt"] == expanded["a"] == second.oid
    assert [e.path for e in api.get_paths_info(repo, ["a", "c.txt", "missing"])] == ["a", "c.txt"]

    metadata = get_hf_file_metadata(hf_hub_url(repo, "c.txt"))
    assert (metadata.commit_hash, metadata.size, metadata.xet_file_data) == (second.oid, 10, None)
    head = get_session().head(hf_hub_url(repo, "c.txt"), headers={"authorization": "Bearer x"})
    assert head.headers["x-repo-commit"] == second.oid and head.headers["etag"] == f'"{metadata.etag}"'
    assert not [name for name in head.headers if name.lower().startswith("x-xet")]

    api.create_branch(repo, branch="feature/x", revision=first.oid)
    api.create_tag(repo, tag="t1", revision="feature/x")
    assert Path(api.hf_hub_download(repo, "a/b.txt", revision="t1")).read_text() == "hello"
    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(repo, "c.txt", revision="feature/x")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("ms-llava-test/no-such-repo")
    snapshot = Path(snapshot_download(repo, revision=second.oid))
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == [
        ".gitattributes",
        "a/b.txt",
        "a/d.txt",
        "c.txt",
    ]
    api.delete_folder("a", repo_id=repo)
    api.delete_file("c.txt", repo_id=repo)
    api.delete_tag(repo, tag="t1")
    api.delete_branch(repo, branch="feature/x")
    assert api.list_repo_files(repo) == [".gitattributes"]
    refs = api.list_repo_refs(repo)
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []
    api.delete_repo(repo)
    assert not api.repo_exists(repo)


class _Pickled:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_folder_is_checked_before_anything_loads_it(tiny_dir, tmp_path, capsys):
    """`checkpoints.check_checkpoint_folder` (what demo, visualize, train and eval run on --checkpoint / --model, and
    push on its folder) names the file: pickled `.bin` weights are refused unread, a `.bin` that is not a plain state
    dict and a config.json whose shapes the weights do not have are named in one sentence."""
    from safetensors.torch import load_file

    from ms_llava.checkpoints import CheckpointError, resolve_checkpoint

    state = load_file(tiny_dir / "model.safetensors")
    for name, content, message in (
        (
            "pickled",
            {**state, "x": _Pickled()},
            r"pytorch_model\.bin is not a plain state dict: it holds pickled objects \(Unsupported global: GLOBAL \w+\), and unpickling them could run code",
        ),
        (
            "nested",
            {"model": state, "optimizer": {}},
            r"pytorch_model\.bin is not a plain state dict of tensors by name",
        ),
    ):
        folder = shutil.copytree(tiny_dir, tmp_path / name)
        (folder / "model.safetensors").unlink()
        torch.save(content, folder / "pytorch_model.bin")
        with pytest.raises(
            CheckpointError, match=rf"--model {re.escape(str(folder))}: {re.escape(str(folder))}/{message}"
        ):
            resolve_checkpoint(folder, "--model", processor=True)
    assert "this must never run" not in capsys.readouterr().out
    folder = shutil.copytree(tiny_dir, tmp_path / "wider")
    (folder / "config.json").write_text(
        (folder / "config.json").read_text().replace('"hidden_size": 24', '"hidden_size": 28')
    )
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors holds .* with shape \[.*24.*\], but config\.json builds \[.*28.*\]"
    ):
        resolve_checkpoint(folder, "--checkpoint")
