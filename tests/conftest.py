import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tests/tiny_run.py's tiny BERT classifier folder (dropout 0.1) and labelled CSV, built once per session."""
    from tiny_run import tiny_data, tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return tiny_model(root / "model"), tiny_data(root / "data.csv")


@pytest.fixture
def one_thread():
    """MKL's FFT pays ~30 ms per call to wake a second thread on a busy 2-core box; tiny FFTs need one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Property-based fuzzing (tests/test_fuzz_*.py): deterministic in CI, larger on request.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test-only dependency
    pass
else:
    settings.register_profile(
        "rankwise-fuzz",
        derandomize=True,  # the same cases on every run: no flaky CI
        database=None,
        deadline=None,  # no wall-clock limits on a shared, loaded machine
        max_examples=int(os.environ.get("RANKWISE_FUZZ_EXAMPLES", "50")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
