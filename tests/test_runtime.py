import pytest
import torch

from vargpt.errors import InputError
from vargpt.runtime import resolve_device, resolve_dtype


def test_auto_on_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto picks cuda")
    dev = resolve_device("auto")
    assert dev.type == "cpu" and resolve_dtype("auto", dev) == torch.float32


def test_explicit_and_bad_names():
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("gpu0")
