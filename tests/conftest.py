import os

from hypothesis import settings

# CI runs a fixed set of examples (reproducible results); a local run explores new ones each time.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


# Markers by the job of the test file, so a run can pick a part: `pytest -m "not docs"`, `pytest -m integration`.
_MARKERS = {
    "integration": ("test_integration_", "test_robustness_integrations", "test_hf_features", "test_vlm_analysis"),
    "docs": ("test_docs_",),
    "cli": ("test_cli", "test_generate"),
    "conformance": ("test_conformance", "test_properties"),
}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        module = item.path.stem
        for marker, prefixes in _MARKERS.items():
            if module.startswith(prefixes):
                item.add_marker(getattr(pytest.mark, marker))
