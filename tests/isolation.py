"""Run test code in a fresh Python process that cannot import given packages and cannot reach the internet.

`run_python(script, *args, env=..., block=("ms_llava",))` prefixes `script` with a prelude that

- blocks the import of every package in `block` (and checks that it really is unimportable), so that a remote-code
  load proves the checkpoint carries its own code;
- allows sockets to connect only to loopback addresses and name lookups only of `localhost` / `127.0.0.1`; any other
  attempt raises `OSError` in the caller and makes the process exit with status 97, so a library that swallows
  connection errors (telemetry, update checks) still fails the test.

`install_network_guard()` does the same inside the test process and returns the list of refused attempts together
with a function that removes the guard. `hub_subprocess_env(endpoint, home)` is the environment for a subprocess that
talks to the local Hub server only: HF_ENDPOINT, an empty HF_HOME, a fake token, telemetry and Xet off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

TESTS_DIR = Path(__file__).resolve().parent
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
FAKE_TOKEN = "hf_local_test_token_not_a_real_one"


def _is_loopback(host) -> bool:
    if not isinstance(host, str):
        return True
    if host in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def install_network_guard():
    """Refuses non-loopback connections and name lookups in this process; returns `(attempts, uninstall)`."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connect {address}")
            raise OSError(f"network access outside 127.0.0.1 is blocked in tests (connect to {address})")

    def connect(self, address):
        check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host.decode() if isinstance(host, bytes) else host):
            attempts.append(f"getaddrinfo {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"name lookups are blocked in tests ({host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo

    def uninstall():
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
        socket.getaddrinfo = real_getaddrinfo

    return attempts, uninstall


PRELUDE = textwrap.dedent(
    """
    import atexit, importlib.abc, os, sys
    sys.path.insert(0, {tests_dir!r})
    import isolation as _isolation

    _blocked_attempts, _ = _isolation.install_network_guard()

    @atexit.register
    def _fail_on_network_attempts():
        if _blocked_attempts:
            sys.stderr.write(f"blocked network access: {{_blocked_attempts}}\\n")
            sys.stderr.flush()
            os._exit(97)

    class _BlockPackages(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == blocked or name.startswith(blocked + ".") for blocked in {block!r}):
                raise ImportError(f"{{name}} is blocked in this process")

    sys.meta_path.insert(0, _BlockPackages())
    for _name in {block!r}:
        try:
            __import__(_name)
            raise SystemExit(f"{{_name}} is importable: the test would prove nothing")
        except ImportError:
            pass
    del sys.path[0]
    """
)


def python_script(script: str, block: tuple[str, ...] = ("ms_llava",)) -> str:
    return PRELUDE.format(tests_dir=str(TESTS_DIR), block=tuple(block)) + textwrap.dedent(script)


def hub_subprocess_env(endpoint: str, home: str | Path) -> dict[str, str]:
    """The environment of a subprocess that uses the local Hub server at `endpoint` with an empty cache in `home`."""
    assert urlsplit(endpoint).hostname == "127.0.0.1", f"tests must only talk to 127.0.0.1, got {endpoint}"
    drop = ("PYTHONPATH", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "http_proxy", "https_proxy", "all_proxy")
    env = {
        key: value for key, value in os.environ.items() if not key.upper().startswith(tuple(d.upper() for d in drop))
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_TOKEN=FAKE_TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def run_python(script: str, *args, env: dict, cwd: str | Path, block: tuple[str, ...] = ("ms_llava",), timeout=300):
    """Runs `script` (with the prelude) in a fresh interpreter; returns the CompletedProcess, asserting success."""
    run = subprocess.run(
        [sys.executable, "-c", python_script(script, block), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stderr[-4000:]}"
    return run


@contextlib.contextmanager
def local_hub_clients(endpoint: str, cache_dir: str | Path):
    """Points huggingface_hub, transformers and peft in this process at `endpoint`, as HF_ENDPOINT would at import.

    huggingface_hub reads HF_ENDPOINT and friends into module constants when it is imported, so the constants are
    patched, with the HfApi instances built from them (huggingface_hub's module-level one, which its top-level
    functions are bound to, and transformers' cached one). The cache is `cache_dir`, the token a fake one, telemetry
    and Xet are off, and any connection or name lookup outside 127.0.0.1 is refused; leaving the block raises
    `AssertionError` if one was attempted. Everything is restored on exit.
    """
    import pytest
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import constants, hf_api

    assert urlsplit(endpoint).hostname == "127.0.0.1", f"tests must only talk to 127.0.0.1, got {endpoint}"
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN"):
            patch.delenv(name, raising=False)
        for name, value in {
            "HF_ENDPOINT": endpoint,
            "HF_TOKEN": FAKE_TOKEN,
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }.items():
            patch.setenv(name, value)
        for name, value in {
            "ENDPOINT": endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_CACHE": str(cache_dir),
            "HF_HUB_OFFLINE": False,
            "HF_HUB_DISABLE_TELEMETRY": True,
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        }.items():
            patch.setattr(constants, name, value)
        patch.setattr(hf_api.api, "endpoint", endpoint)
        patch.setattr(transformers_hub, "_hf_api", None)
        attempts, uninstall = install_network_guard()
        try:
            yield attempts
        finally:
            uninstall()
    assert not attempts, f"blocked network access: {attempts}"
