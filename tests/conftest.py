"""Test environment: offline hubs, offline wandb, one thread, Triton's CPU interpreter.

The variables are set before any test module imports torch or defines a Triton kernel;
Triton's interpreter only where no GPU is visible (on a GPU the `gpu` tests run compiled).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """One token cache for the whole session, so the bundled corpus is tokenised once."""
    if "ATTNLAB_CACHE" not in os.environ:
        os.environ["ATTNLAB_CACHE"] = str(tmp_path_factory.mktemp("attnlab_cache"))
    yield
