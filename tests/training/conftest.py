"""What the training tests share besides tests/conftest.py: `ms-llava train` through the command line's entry point."""

import pytest


@pytest.fixture
def run_train(run_cli):
    """`run_train(arguments) -> (exit status, stdout, stderr)` of `ms-llava train ARGUMENTS`, run in this process."""
    return lambda arguments: run_cli(["train", *arguments])
