"""Hub push and pull with the real huggingface_hub client over HTTP, against tests/hub_server.py on 127.0.0.1.

One module-scoped fixture publishes every repo once (pushes are in-process); the pulls without `ms_llava` all run in
one fresh subprocess that cannot import it and cannot reach anything but 127.0.0.1.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

from isolation import hub_subprocess_env, local_hub_clients, run_python
from messages import chat
from ms_llava import MSLlavaForConditionalGeneration, MSLlavaProcessor
from ms_llava.hub import CARD_TAGS, REMOTE_CODE_MODULES, add_cli, push_to_hub
from ms_llava.testing_utils import build_tiny_checkpoint, sample_image

REPO = "ms-llava-test/tiny"  # main: seed 1 (2nd push), tag v2; first commit: seed 0; branch dev: seed 2
NATIVE = "ms-llava-test/tiny-native"  # transformers' own model.push_to_hub / processor.push_to_hub, seed 0
FILLED = "ms-llava-test/tiny-no-modules"  # pushed from a directory without the modules and auto_map, seed 0
ADAPTER = "ms-llava-test/tiny-native-lora"  # a LoRA adapter (peft) on top of NATIVE
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


def inputs_for(processor, image):
    prompt = processor.apply_chat_template(chat("Hi"), add_generation_prompt=True)
    return processor(images=image, text=prompt, return_tensors="pt")


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def directory_contents(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes() for path in directory.rglob("*")}


def usage_snippet(card_text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```python\n(.+?)\n```", card_text, flags=re.S)
    assert match, f"the model card lost its {marker} snippet"
    return match.group(1)


@pytest.fixture(scope="module")
def published(hub_server, tiny, tiny_dir, tmp_path_factory):
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
        bare_before = directory_contents(bare)
        push_to_hub(bare, FILLED)
        bare_after = directory_contents(bare)

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
    image_path = scratch / "image.png"
    image.save(image_path)
    return {
        "commits": {"first": first.oid, "second": second.oid, "dev": dev.oid},
        "inputs": inputs,
        "image_path": image_path,
        "logits": {seed: logits_of(model, inputs) for seed, model in enumerate([model0, model1, model2])},
        "native_pulled_with_package": (type(base), base_logits),
        "adapted_logits": adapted_logits,
        "lora_modules": lora_modules,
        "bare_directory": (bare_before, bare_after),
    }


PULL_WITHOUT_PACKAGE = """
import sys
import torch
from PIL import Image
from huggingface_hub import ModelCard
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

repo, native, filled, adapter, first, image_path, out = sys.argv[1:8]
image = Image.open(image_path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]


def load(repo_id, **kwargs):
    model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True, **kwargs).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    return model


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
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
    own push, for a push that had to add the modules, and for a LoRA adapter on its base; the card's snippet runs."""
    commits, expected = published["commits"], published["logits"]
    out = tmp_path / "result.pt"
    run_python(
        PULL_WITHOUT_PACKAGE,
        REPO,
        NATIVE,
        FILLED,
        ADAPTER,
        commits["first"],
        published["image_path"],
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
    assert isinstance(result["snippet_answer"], str)
    assert hub_server.errors == [] and hub_server.unhandled == []


def test_push_leaves_the_checkpoint_directory_as_it_was(published):
    """The push adds the modules and auto_map to the commit (staged elsewhere), never to the directory it reads."""
    before, after = published["bare_directory"]
    assert after == before
    assert not set(REMOTE_CODE_MODULES) & set(after) and "auto_map" not in json.loads(after["config.json"])


def test_pull_with_the_package(published, hub):
    model_class, logits = published["native_pulled_with_package"]
    assert model_class is MSLlavaForConditionalGeneration  # the package's class, not remote code
    assert torch.equal(logits, published["logits"][0])
    first = published["commits"]["first"]
    model = AutoModelForImageTextToText.from_pretrained(REPO, revision=first).eval()
    processor = AutoProcessor.from_pretrained(REPO, revision=first)
    assert type(model) is MSLlavaForConditionalGeneration and type(processor) is MSLlavaProcessor
    assert torch.equal(logits_of(model, published["inputs"]), published["logits"][0])


def test_lora_targets_only_the_language_model(published):
    modules = published["lora_modules"]
    assert len(modules) == 2 * 2  # q_proj and v_proj of the 2 Llama layers
    assert all(".language_model." in name and name.endswith(("q_proj", "v_proj")) for name in modules)


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


def test_model_card(published, hub):
    first = ModelCard.load(HfApi().hf_hub_download(REPO, "README.md", revision=published["commits"]["first"]))
    card = ModelCard.load(REPO)
    for loaded in (first, card):
        data = loaded.data
        assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
        assert data.base_model == "llava-hf/llava-1.5-7b-hf" and data.license == "apache-2.0"
        assert set(CARD_TAGS) <= set(data.tags)
        text = loaded.text
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
            assert row in text, row
        assert f'model_id = "{REPO}"' in usage_snippet(text, "usage-remote-code")
    assert "**Untrained weights.**" in first.text and "No evaluation results were given" in first.text
    assert "**Untrained weights.**" not in card.text and "Trained with the paper's recipe" in card.text
    assert "| POPE | 87 |" in card.text and "| OCRBench | 301 |" in card.text


def test_model_card_snippet_runs_with_the_package(published, hub):
    snippet = usage_snippet(ModelCard.load(REPO).text, "usage-with-package")
    namespace = {}
    exec(compile(snippet, "README.md (usage-with-package)", "exec"), namespace)
    assert isinstance(namespace["answer"], str)
    assert type(namespace["model"]) is MSLlavaForConditionalGeneration


def _requests(server) -> int:
    return len(server.log)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), r"missing model\.safetensors$"),
        (
            lambda d: [(d / n).unlink() for n in ("processor_config.json", "tokenizer.json")],
            r"missing processor_config\.json, tokenizer\.json \(or tokenizer\.model\)",
        ),
        (lambda d: (d / "config.json").unlink(), r"missing config\.json"),
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
        (  # an invalid config value, agreed on by config and processor: found when the card reads the config
            lambda d: [
                (d / name).write_text((d / name).read_text().replace(before, after))
                for name, before, after in (
                    ("config.json", '"num_queries": 16', '"num_queries": 15'),
                    ("processor_config.json", '"num_image_tokens": 16', '"num_image_tokens": 15'),
                )
            ],
            r"num_queries \(M\) must be a perfect square .* got 15",
        ),
    ],
)
def test_push_refuses_a_bad_checkpoint_before_sending_anything(tiny_dir, tmp_path, hub, damage, message):
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    damage(broken)
    sent = _requests(hub)
    with pytest.raises(ValueError, match=message):
        push_to_hub(broken, "ms-llava-test/broken")
    assert _requests(hub) == sent and ("model", "ms-llava-test/broken") not in hub.repos


def test_push_refuses_bad_arguments_before_sending_anything(tiny, tiny_dir, hub):
    model, _ = tiny
    sent = _requests(hub)
    with pytest.raises(ValueError, match=r"the score of 'POPE' must be a finite number, got 'high'"):
        push_to_hub(tiny_dir, "ms-llava-test/broken", results={"POPE": "high"})
    with pytest.raises(ValueError, match=r"training must be None \(untrained\), 'paper' or a non-empty dict"):
        push_to_hub(tiny_dir, "ms-llava-test/broken", training="yes")
    with pytest.raises(ValueError, match=r"needs its processor"):
        push_to_hub(model, "ms-llava-test/broken")
    assert _requests(hub) == sent


def test_push_with_a_processor_refuses_a_directory_without_weights(tiny, tiny_dir, tmp_path, hub):
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    sent = _requests(hub)
    with pytest.raises(ValueError, match=r"with the processor given is not a complete .* missing model\.safetensors$"):
        push_to_hub(broken, "ms-llava-test/broken", processor=tiny[1])
    assert _requests(hub) == sent


def test_push_with_a_processor_replaces_the_directory_processor_and_prunes_stale_files(tiny, tiny_dir, tmp_path, hub):
    _, processor = tiny
    model_only = tmp_path / "model_only"
    model_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, model_only / name)
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
    ]  # staged elsewhere: the directory is left as it was


def test_push_deletes_the_shards_of_an_earlier_sharded_push(tiny, tiny_dir, tmp_path, hub):
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


def test_push_command(tiny_dir, tmp_path, hub, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="ms-llava")
    add_cli(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "results.json").write_text(json.dumps({"MMB": 65.6}))
    repo = "ms-llava-test/from-cli"
    args = parser.parse_args(
        ["push", str(tiny_dir), repo, "--private", "--revision", "release", "--base-model", "org/base"]
        + ["--license", "mit", "--results", str(tmp_path / "results.json"), "--commit-message", "from the CLI"]
    )
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert f"pushed {tiny_dir} to {repo}" in out and "marks these weights as UNTRAINED" in out
    api = HfApi()
    assert api.model_info(repo).private
    assert api.list_repo_commits(repo, revision="release")[0].title == "from the CLI"
    card = ModelCard.load(api.hf_hub_download(repo, "README.md", revision="release"))
    assert card.data.license == "mit" and card.data.base_model == "org/base" and "| MMB | 65.6 |" in card.text
    with pytest.raises(SystemExit):
        parser.parse_args(["push", str(tiny_dir)])
    bad = parser.parse_args(["push", str(tiny_dir), repo, "--results", str(tmp_path / "missing.json")])
    assert bad.handler(bad) == 2
    assert f"ms-llava push: error: --results: no such file: {tmp_path / 'missing.json'}" in capsys.readouterr().err
    bad = parser.parse_args(["push", str(tmp_path), repo])
    assert bad.handler(bad) == 2
    assert "is not a complete MS-LLaVA checkpoint: missing config.json, model.safetensors" in capsys.readouterr().err


def test_model_card_template_ships_with_the_package():
    """model_cards/ is mapped to ms_llava.model_cards (pyproject); packages are listed by hand, so check none is left
    out of the wheel."""
    from importlib import resources

    from ms_llava.hub import MODEL_CARD_TEMPLATE, model_card_template

    root = Path(__file__).resolve().parents[2]
    assert resources.files("ms_llava.model_cards").joinpath(MODEL_CARD_TEMPLATE).is_file()
    assert model_card_template() == (root / "model_cards" / MODEL_CARD_TEMPLATE).read_text()
    from setuptools.config.pyprojecttoml import read_configuration  # reads TOML on Python 3.10 too (no tomllib)

    packages = set(read_configuration(root / "pyproject.toml")["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(root / "src").parts) for init in (root / "src").rglob("__init__.py")}
    assert on_disk | {"ms_llava.model_cards"} == packages


def test_hub_server_speaks_the_clients_protocol(hub, tmp_path):
    """The server answers the client calls beyond push/pull as the Hub does (typed errors, refs, conflicts)."""
    from huggingface_hub import CommitOperationAdd, get_hf_file_metadata, hf_hub_url, snapshot_download
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
