"""Shared fixtures: small synthetic fastMRI-format datasets, generated once per test session."""

from __future__ import annotations

import pytest

from mriadv.data.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """3 training and 2 validation volumes of 4 slices, 64x64 crops (k-space 128 x 74)."""
    return generate(
        tmp_path_factory.mktemp("synthetic") / "data", SyntheticSpec(volumes=3, val_volumes=2, slices=4, size=64)
    )
