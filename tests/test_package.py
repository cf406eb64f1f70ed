"""The package's shape: its modules import each other without cycles, the library never imports an experiment, the
remote-code model files import only each other, and the built wheel holds the library and its data, no experiment."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = {"configuration_ms_llava", "modeling_ms_llava", "processing_ms_llava", "image_processing_ms_llava"}


def module_name(path: Path) -> str:
    """`src/ms_llava/training/data.py` -> `ms_llava.training.data`; a package is named by its `__init__.py`."""
    relative = path.relative_to(ROOT / "src" if path.is_relative_to(ROOT / "src") else ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = [*(ROOT / "src").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")]
    return {module_name(path): path for path in files if "default_checkpoint" not in path.parts}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere (module level or inside functions), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                base = [*base, *(node.module.split(".") if node.module else [])]
            else:
                base = node.module.split(".")
            stem = ".".join(base)
            # `from package import submodule` depends on the submodule, `from package import name` on the package
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), and modules importing themselves."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "ms_llava.training.trainer" in graph["ms_llava.training"]  # from .trainer import ... (package __init__)
    assert "ms_llava.recipes" in graph["ms_llava.hub"]  # an import inside a function
    assert "experiments.scopebench.generator" in graph["experiments.scopebench.runs"]  # from . import generator


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_an_experiment():
    offenders = {
        name: sorted(target for target in targets if target.startswith("experiments"))
        for name, targets in import_graph().items()
        if name.startswith("ms_llava")
    }
    assert {name: targets for name, targets in offenders.items() if targets} == {}


def test_the_model_files_import_only_each_other():
    """They ship with every checkpoint as remote code, next to nothing else of the package."""
    graph = import_graph()
    for name in MODEL_FILES:
        targets = graph[f"ms_llava.{name}"]
        assert {target.removeprefix("ms_llava.") for target in targets} <= MODEL_FILES, (name, targets)
        source = (ROOT / "src" / "ms_llava" / f"{name}.py").read_text(encoding="utf-8")
        assert "from ms_llava" not in source and "import ms_llava" not in source, name


@pytest.mark.slow
def test_the_wheel_holds_the_library_and_no_experiment(tmp_path):
    """Builds the wheel from the tracked files (setuptools' build backend, no network) and lists it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    source = tmp_path / "source"
    for relative in tracked.split():
        if (ROOT / relative).is_file():
            (source / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, source / relative)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    run = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    wheel_name = run.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(tmp_path / "dist" / wheel_name) as wheel:
        names = set(wheel.namelist())
    library = {name for name in names if not name.startswith("ms_llava-0.1.0.dist-info/")}
    # the package, and beside it the command line's dispatcher (light: `ms-llava --help` does not import the package)
    assert all(name.startswith("ms_llava/") for name in library - {"ms_llava_cli.py"}), sorted(library)
    assert "ms_llava_cli.py" in library
    entry_points = zipfile.ZipFile(tmp_path / "dist" / wheel_name).read("ms_llava-0.1.0.dist-info/entry_points.txt")
    assert "ms-llava = ms_llava_cli:main" in entry_points.decode()
    expected_modules = {
        f"ms_llava/{name.relative_to(ROOT / 'src' / 'ms_llava').as_posix()}"
        for name in (ROOT / "src" / "ms_llava").rglob("*.py")
        if "default_checkpoint" not in name.parts
    }
    assert expected_modules <= library, sorted(expected_modules - library)
    assert {f"ms_llava/{name}.py" for name in MODEL_FILES} <= library
    assert "ms_llava/model_cards/ms_llava_model_card.md" in library
    assert {"ms_llava/default_checkpoint/config.json", "ms_llava/default_checkpoint/model.safetensors"} <= library
    assert any(name.startswith("ms_llava/default_checkpoint/samples/") for name in library)
    experiment_code = [
        name for name in names if name.endswith(".py") and any(word in name for word in ("scopebench", "spatial"))
    ]
    assert not any(name.startswith("experiments/") for name in names) and experiment_code == [], experiment_code
    assert not any(name.startswith(("tests/", "benchmarks/", "docs/")) for name in names)
