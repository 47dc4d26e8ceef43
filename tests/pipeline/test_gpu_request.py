"""A step given GPUs fails at once when torch sees none, instead of training on the CPU for hours."""

from __future__ import annotations

import inspect

import pytest
import torch

from components.extract import extract
from components.pretrain import pretrain
from slicefm.edge.kfp_io import MissingGPUError, require_gpus


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
@pytest.mark.parametrize("component", [pretrain, extract])
def test_gpu_step_without_a_visible_gpu_fails_before_any_work(component):
    # Inputs that would fail later anyway: the GPU check must come first, with its own message.
    with pytest.raises(MissingGPUError, match=r"requested 1 GPU\(s\) but torch sees 0.*driver"):
        params = inspect.signature(component.python_func).parameters
        component.python_func(**{**dict.fromkeys(params), "gpus": 1})


def test_no_gpu_requested_needs_none():
    require_gpus(0)
    if torch.cuda.is_available():
        require_gpus(torch.cuda.device_count())
    else:
        with pytest.raises(MissingGPUError):
            require_gpus(2)
