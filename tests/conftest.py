"""Shared test fixtures: paths to the conformance data in ../shared/fixtures/official."""

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "official"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"conformance fixtures not found at {FIXTURES} (the repo expects ../shared beside it)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_config(fixtures_dir):
    from vargpt.config import official_fixture_config

    return official_fixture_config(fixtures_dir / "tiny_config.json")


@pytest.fixture(scope="session")
def fixture_weights(fixtures_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(fixtures_dir / "tiny_weights.safetensors")


def load_fixture(fixtures_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(fixtures_dir / f"{name}.safetensors")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run single-threaded: the models are tiny, one intra-op thread is fastest (much faster on a loaded
    machine), and float results do not depend on the core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny VARGPT saved in our layout (for pipeline and CLI tests)."""
    from vargpt.config import tiny_config
    from vargpt.models.vargpt import VARGPT

    torch.manual_seed(0)
    return VARGPT(tiny_config()).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `vargpt ARGV...` in-process; returns (exit code, stdout, stderr)."""
    from vargpt.cli import main

    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
