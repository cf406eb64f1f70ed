"""What the training tests share (the generated `shapes` data is in tests/conftest.py, for the tuners' tests too): a
free port for launchers, a folder's contents, and `ms-llava train` through the command line's real entry point."""

import socket
from pathlib import Path

import pytest

from ms_llava.outputs import LOCK_FILE


@pytest.fixture(scope="session")
def free_port():
    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    return free_port


@pytest.fixture(scope="session")
def folder_contents():
    def folder_contents(folder: Path) -> dict[str, bytes | None]:
        """Every path under `folder` with its bytes (None for a folder), but the run lock, which names its holder:
        what "as it found it" compares."""
        return {
            str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
            for path in Path(folder).rglob("*")
            if path.name != LOCK_FILE
        }

    return folder_contents


@pytest.fixture
def run_cli(capsys):
    """`ms-llava train ARGUMENTS` in this process through `ms_llava.cli.main`: (exit status, stdout, stderr)."""
    from ms_llava.cli import main

    def run_cli(arguments: list[str]) -> tuple[int, str, str]:
        status = main(["train", *map(str, arguments)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run_cli
