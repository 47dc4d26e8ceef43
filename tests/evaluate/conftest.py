"""Heads this small spend their time in thread hand-offs: one thread is faster and immune to a busy host."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
