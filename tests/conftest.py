import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from hub_server import HubServer
from isolation import install_network_guard, local_hub_clients
from ms_llava.testing_utils import (
    build_tiny_checkpoint,
    build_tiny_processor,
    build_tiny_tokenizer,
    sample_image,
    write_shapes_dataset,
)


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny MS-LLaVA (8 x 8 grid, M = 16, k = [2, 4, 8]) and its processor."""
    return build_tiny_checkpoint(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny checkpoint saved with save_pretrained (model + processor). The processor is a fresh one: calling a
    tokenizer leaves state in its backend (padding) that save_pretrained would write, whatever tests ran first."""
    model, _ = tiny
    path = tmp_path_factory.mktemp("tiny_ms_llava")
    model.save_pretrained(path)
    build_tiny_processor(model.config, build_tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """The generated data (LLaVA JSON, images in `images`): `text` (LLM warm-up), `caption` (stage 1), `qa` (stage 2)
    and `held_out` (qa, another seed), 96 / 96 / 96 / 32 records; `qa8`, `qa24`, `caption24`: their first records."""
    directory = tmp_path_factory.mktemp("shapes")
    paths = {
        "text": write_shapes_dataset(directory, "text", 96, seed=3),
        "caption": write_shapes_dataset(directory, "caption", 96, seed=0),
        "qa": write_shapes_dataset(directory, "qa", 96, seed=1),
        "held_out": write_shapes_dataset(directory, "qa", 32, seed=2),
    }
    for name, count in (("qa", 8), ("qa", 24), ("caption", 24)):
        paths[f"{name}{count}"] = directory / f"{name}{count}.json"
        paths[f"{name}{count}"].write_text(json.dumps(json.loads(paths[name].read_text())[:count]))
    return {**paths, "images": directory / "images"}


@pytest.fixture(scope="module")
def one_thread():
    """torch runs on one thread for the module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def image():
    return sample_image(size=48, seed=1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test leaves torch's thread count as it found it: commands a test runs in-process set it (the ScopeBench
    command line sets 1), and a later test comparing logits with a fresh process's would see the reductions split
    differently."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _strict_pil(monkeypatch):
    """PIL refuses truncated images in every test, as in a process that has not imported lmms-eval (which sets
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` at import, for the rest of the process): the tests of corrupt files
    give the same result whichever tests ran before them."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.fixture
def run_cli(capsys):
    """Runs `ms-llava ARGS` in this process (`ms_llava_cli.main`): `run_cli(args) -> (exit status, stdout, stderr)`."""
    from ms_llava_cli import main

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_info:
            code = exit_info.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def free_port():
    """`free_port() -> int`: a 127.0.0.1 port that nothing listens on now (bound, then released)."""

    def port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    return port


@pytest.fixture(scope="session")
def folder_contents():
    """`folder_contents(folder)`: every path under `folder` (relative) with its bytes (None for a folder), but a run's
    lock file, which names its holder."""
    from ms_llava.outputs import LOCK_FILE

    return lambda folder: {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in Path(folder).rglob("*")
        if path.name != LOCK_FILE
    }


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory):
    """A Hub-API server (tests/hub_server.py) on 127.0.0.1, serving repos kept under a temporary folder."""
    server = HubServer(tmp_path_factory.mktemp("hub_server")).start()
    assert urlsplit(server.url).hostname == "127.0.0.1", server.url
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, tmp_path_factory):
    """Points huggingface_hub, transformers and peft in this process at `hub_server` (see
    `isolation.local_hub_clients`: patched endpoint constants, an empty cache, a fake token, no telemetry, no Xet, no
    connection outside 127.0.0.1), and fails the test if the server failed or was asked for something it lacks."""
    errors, unhandled = len(hub_server.errors), len(hub_server.unhandled)
    with local_hub_clients(hub_server.url, tmp_path_factory.mktemp("hf_cache")):
        yield hub_server
    assert hub_server.errors[errors:] == [], "the test Hub server failed:\n" + "\n".join(hub_server.errors[errors:])
    assert hub_server.unhandled[unhandled:] == [], f"requests the test Hub does not serve: {hub_server.unhandled}"


@pytest.fixture(scope="session", autouse=True)
def _no_network():
    """No test reaches beyond 127.0.0.1: connections and name lookups elsewhere fail (a mistyped local path that
    would be taken for a Hub id, say), and a test that tried fails at the end of the session."""
    attempts, uninstall = install_network_guard()
    yield
    uninstall()
    assert attempts == [], f"tests tried to reach the network: {attempts}"
