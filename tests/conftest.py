"""Suite-wide test setup.

`tests/` goes on sys.path so every test folder can import the shared real
servers and builders in `tests/support/` (importlib import mode does not add it). GPU tests
skip cleanly on machines without CUDA; browser tests without Chromium.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Appended, not prepended: a test folder named like another project's package
# (tests/kernels: Hugging Face's `kernels`) must never shadow it.
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = None if _cuda_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    skip_browser = (
        None if shutil.which("chromium") or os.path.exists("/usr/bin/chromium")
        else pytest.mark.skip(reason="needs Chromium at /usr/bin/chromium")
    )
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_browser is not None and "browser" in item.keywords:
            item.add_marker(skip_browser)


@pytest.fixture
def sim():
    """A `support.sim.Sim`: a small, exactly known run laid out on a timeline."""
    from support.sim import Sim

    return Sim()


@pytest.fixture
def make_sim():
    """The Sim class, for tests that build several runs (experiment and control)."""
    from support.sim import Sim

    return Sim
