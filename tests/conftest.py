"""Suite-wide test setup.

`tests/` goes on sys.path so every test folder can import the shared real
servers in `tests/support/` (importlib import mode does not add it). GPU tests
skip cleanly on machines without CUDA; browser tests without Chromium.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Appended, not prepended: test folders share names with the packages they test
# (tests/kernels, tests/workloads) and must never shadow them.
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
