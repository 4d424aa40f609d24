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
