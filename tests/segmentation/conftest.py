"""Fixtures shared by the segmentation tests (each test module gets its own tiny SAM instance)."""

import pytest

from persam_dreambooth import PerSAM
from persam_dreambooth import testing as tiny


@pytest.fixture(scope="module")
def sam():
    return tiny.tiny_sam()


@pytest.fixture(scope="module")
def reference():
    """``(image (96, 128, 3) uint8, mask (96, 128) bool)``."""
    return tiny.synthetic_subject()


@pytest.fixture(scope="module")
def target_image():
    return tiny.synthetic_subject(80, 120, box_yx=(20, 50, 60, 100), seed=3)[0]  # non-square, subject moved


@pytest.fixture
def persam(sam, reference):
    """PerSAM on the tiny SAM with :func:`reference` set (a fresh object per test)."""
    model = PerSAM(sam)
    model.set_reference(*reference)
    return model
