"""Shared fixtures: tiny synthetic data sets in each real on-disk format.

Session-scoped and written once under pytest's tmp folder. Treat them as read-only: a test
that needs to damage files should copy one first (``tests.helpers.copy_dataset``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.data.synth import synthesize
from tests.helpers import SYNTH_N, SYNTH_SIZE


def _make(tmp_path_factory: pytest.TempPathFactory, fmt: str) -> Path:
    out = tmp_path_factory.mktemp("synth") / fmt
    return synthesize(fmt, out, n_images=SYNTH_N[fmt], image_size=SYNTH_SIZE, seed=0)


@pytest.fixture(scope="session")
def synth_ham_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HAM10000 as HF parquet shards (data/{train,validation,test}-*.parquet)."""
    return _make(tmp_path_factory, "ham-hf")


@pytest.fixture(scope="session")
def synth_ham_dataverse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HAM10000 Dataverse layout: HAM10000_metadata.csv + HAM10000_images_part_{1,2}/."""
    return _make(tmp_path_factory, "ham-dataverse")


@pytest.fixture(scope="session")
def synth_isic2020(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SIIM-ISIC 2020 layout: train.csv + train/<image_name>.dcm (RGB, InstitutionName)."""
    return _make(tmp_path_factory, "isic2020")


@pytest.fixture(scope="session")
def synth_fedisic2019(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLamby Fed-ISIC2019 layout: train_test_split + preprocessed JPEGs + metadata CSV."""
    return _make(tmp_path_factory, "fedisic2019")
