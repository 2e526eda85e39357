import pytest

from vllm_fireattn import ops


def _kernel_skip_reason() -> str | None:
    reason = ops.unavailable_reason(check_device=True)
    return None if reason is None else f"GPU tier skipped: {reason}"


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords and item.get_closest_marker("cpu") is None:
            if reason is None:
                reason = _kernel_skip_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
