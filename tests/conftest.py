"""Shared test fixtures.

Conformance data: every fixture set under ``../shared/fixtures/`` (a folder holding ``tiny_config.json``), plus
any set or folder of sets named in ``VARGPT_FIXTURE_DIRS`` (``os.pathsep``-separated; e.g. sets made by
``../shared/official-harness/make_fixtures.py``). Every test that uses ``fixtures_dir`` (directly or through
``fixture_config`` / ``fixture_weights`` / a model built from them) runs once per set and per torch thread count
(1 and 2), so a set added later is tested without code changes.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
CONFORMANCE_THREADS = (1, 2)
# A float32 VAE decode vs the published one: the reference decode itself carries 1.8e-5 of float32 rounding (vs a
# float64 decode of the same codes), and a float32 decode lands anywhere within that scale depending on the conv
# algorithm picked for the thread count / memory layout: compare decodes at the fixture's own error scale.
VAE_DECODE_TOL = dict(atol=5e-5, rtol=1e-4)


def fixture_sets() -> list[Path]:
    """Every conformance fixture set: folders with a ``tiny_config.json`` under the shared root and the extra roots."""
    roots = [SHARED_FIXTURES] + [Path(p) for p in os.environ.get("VARGPT_FIXTURE_DIRS", "").split(os.pathsep) if p]
    sets: list[Path] = []
    for root in roots:
        found = [root] if (root / "tiny_config.json").is_file() else sorted(
            p.parent for p in root.glob("*/tiny_config.json"))
        sets += [p.resolve() for p in found if p.resolve() not in sets]
    return sets


def _set_id(path: Path) -> str:
    return path.name if path.parent.resolve() == SHARED_FIXTURES.resolve() else f"{path.parent.name}/{path.name}"


def pytest_generate_tests(metafunc):
    if "fixtures_dir" in metafunc.fixturenames:  # conformance tests: also under 1 and 2 torch threads
        metafunc.parametrize("torch_threads", CONFORMANCE_THREADS, indirect=True,
                             ids=[f"{n}thr" for n in CONFORMANCE_THREADS])


@pytest.fixture(scope="session", params=fixture_sets() or [None], ids=lambda p: "none" if p is None else _set_id(p))
def fixtures_dir(request) -> Path:
    if request.param is None:
        pytest.fail(f"no conformance fixture set found under {SHARED_FIXTURES} (the repo expects ../shared beside it)")
    return request.param


@pytest.fixture(scope="session")
def fixture_config(fixtures_dir):
    from vargpt.config import official_fixture_config

    return official_fixture_config(fixtures_dir / "tiny_config.json")


@pytest.fixture(scope="session")
def fixture_weights(fixtures_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(fixtures_dir / "tiny_weights.safetensors")


def assert_close_recorded(record_property, name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float,
                          rtol: float) -> None:
    """``torch.testing.assert_close`` that also records the worst difference and its bound as a test property
    (``benchmarks/conformance_report.py`` tabulates them over every fixture set and thread count)."""
    diff = (got.detach().double() - ref.double()).abs()
    ratio = (diff / (atol + rtol * ref.double().abs())).max().item()
    record_property(name, f"max|diff| {diff.max().item():.3g}; worst diff/bound {ratio:.3g} "
                          f"(atol {atol:g}, rtol {rtol:g})")
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol)


def load_fixture(fixtures_dir: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(fixtures_dir / f"{name}.safetensors")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def torch_threads(request) -> int:
    """Intra-op threads of a test: 1 unless parametrized (the conformance tests run under 1 and 2)."""
    return getattr(request, "param", 1)


@pytest.fixture(autouse=True)
def _threads(torch_threads):
    """Tests run single-threaded by default: the models are tiny, one intra-op thread is fastest (much faster on
    a loaded machine). Conformance tests also run with 2 threads: their tolerances must not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny VARGPT saved in our layout (for pipeline and CLI tests)."""
    from vargpt.config import tiny_config
    from vargpt.models.vargpt import VARGPT

    torch.manual_seed(0)
    return VARGPT(tiny_config()).save_pretrained(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def fixture_model(fixtures_dir, fixture_config):
    """The conformance fixture's weights in our VARGPT (CPU), once per test module."""
    from vargpt.models.vargpt import VARGPT

    return VARGPT.from_pretrained(fixtures_dir, config=fixture_config,
                                  weights=fixtures_dir / "tiny_weights.safetensors", device="cpu")


@pytest.fixture(scope="module")
def tiny_model():
    """A randomly initialised tiny VARGPT (seed 0), once per test module."""
    from vargpt.config import tiny_config
    from vargpt.models.vargpt import VARGPT

    torch.manual_seed(0)
    return VARGPT(tiny_config())


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


def write_shapesworld(root: Path, tasks: Sequence[str], size: int = 64) -> list:
    """ShapesWorld train records i = 0, 1, ... of ``tasks[i]`` (records.jsonl + images) under ``root``, read back."""
    import json

    from vargpt.data.records import read_records
    from vargpt.data.shapesworld import make_record

    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, task in enumerate(tasks):
        rec, images = make_record(i, split="train", tasks=(task,), size=size)
        for rel, img in images.items():
            img.save(root / rel)
        rows.append(rec)
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_records(root / "records.jsonl", "shapesworld")
