import pytest

from llava_checkpoints import QUIET, TINY_RESAMPLER
from ms_llava.compose import compose
from ms_llava.testing_utils import write_tiny_part


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """`parts(kind)`: the folder of a tiny part of `ms_llava.testing_utils.write_tiny_part` (written once)."""
    root, written = tmp_path_factory.mktemp("parts"), {}

    def get(kind: str):
        if kind not in written:
            written[kind] = write_tiny_part(root / kind, kind)
        return written[kind]

    return get


@pytest.fixture(scope="session")
def composed(parts, tmp_path_factory):
    """`composed(tower, llm)`: the folder of the tiny parts composed (seed 3, once per session)."""
    root, done = tmp_path_factory.mktemp("composed"), {}

    def get(tower: str, llm: str):
        if (tower, llm) not in done:
            done[tower, llm] = root / f"{tower}-{llm}"
            compose(parts(tower), parts(llm), done[tower, llm], seed=3, **TINY_RESAMPLER, **QUIET)
        return done[tower, llm]

    return get
