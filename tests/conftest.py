"""Shared fixtures: small synthetic fastMRI-format datasets, generated once per test session."""

from __future__ import annotations

import pytest

from mriadv.config import TrainConfig
from mriadv.data.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """3 training and 2 validation volumes of 4 slices, 64x64 crops (k-space 128 x 74)."""
    return generate(
        tmp_path_factory.mktemp("synthetic") / "data", SyntheticSpec(volumes=3, val_volumes=2, slices=4, size=64)
    )


@pytest.fixture(scope="session")
def tiny_config():
    """A factory of small CPU configs for a data folder: ``tiny_config(root, **overrides)``, with
    64x64 crops, a 4-channel U-Net of 2 pools, a 4-channel generator, batches of 2 and epsilon 20
    (squared L2 in the seed's 320x320 units) unless overridden."""

    def make(root, **overrides) -> TrainConfig:
        base = dict(
            data=str(root),
            crop_size=64,
            unet_chans=4,
            unet_pools=2,
            gen_chans=4,
            batch_size=2,
            epsilon=20.0,
            device="cpu",
        )
        return TrainConfig.from_dict({**base, **overrides})

    return make
