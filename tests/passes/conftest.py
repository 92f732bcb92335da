import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch and counts only its own compiles."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
