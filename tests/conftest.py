import os

import pytest
import torch

# Without a GPU the Triton backend runs under its interpreter; it must be set before any
# @triton.jit decorates a kernel, so before fused_balance.kernels is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to busy neighbours. Modules opt
    in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    """``backend_device``: a test taking it runs once per (backend, device type) pair this
    machine can run (shared.backend_device_pairs), with ids like ``cpp-cpu``."""
    if "backend_device" in metafunc.fixturenames:
        from shared import backend_device_pairs

        pairs = backend_device_pairs()
        metafunc.parametrize("backend_device", pairs, ids=[f"{b}-{d}" for b, d in pairs])
