"""Skips GPU / extension tests with a reason instead of failing where they cannot run."""
import pytest
import torch

from flashattn_ext import _ops


def ext_skip_reason():
    if not _ops.HAS_CUDA_EXT:
        return f"flashattn_ext._C is not built or failed to import ({_ops._IMPORT_ERROR})"
    return None


def cuda_ext_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU (torch.cuda.is_available() is False)"
    if ext_skip_reason():
        return ext_skip_reason()
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"GPU compute capability {cap[0]}.{cap[1]} < 8.0"
    return None


def pytest_collection_modifyitems(config, items):
    reasons = {"requires_cuda_ext": cuda_ext_skip_reason(), "requires_ext": ext_skip_reason()}
    for marker, reason in reasons.items():
        if reason is None:
            continue
        skip = pytest.mark.skip(reason=f"{marker}: {reason}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)
