"""training/prepare_demo_data.py: the label edits, the T1 that follows them, the acquisition grids."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "training"))

import prepare_demo_data as data  # noqa: E402


def _brain_labels(size: int = 24) -> np.ndarray:
    """Nested balls: CSF core (ventricle), white matter around it, a grey rim, background outside."""
    distance = np.linalg.norm(np.indices((size,) * 3) - (size - 1) / 2, axis=0)
    labels = np.zeros((size,) * 3, np.uint8)
    labels[distance < 10] = 2
    labels[distance < 7] = 3
    labels[distance < 3] = 1
    return labels


@pytest.mark.parametrize(("kind", "grows", "shrinks"), [
    ("grow CSF", 1, 3), ("shrink CSF", 2, 1), ("thicken cortex", 2, 3), ("thin cortex", 3, 2)])
def test_each_edit_moves_one_tissue_boundary_and_keeps_the_brain_outline(kind, grows, shrinks):
    labels = _brain_labels()
    edited = data.edit_labels(labels, np.random.default_rng(0), kind)
    changed = edited != labels
    assert changed.any()
    assert (edited[changed] == grows).all() and (labels[changed] == shrinks).all()
    assert ((edited > 0) == (labels > 0)).all()  # background stays background


def test_the_t1_follows_an_edit_with_the_new_tissues_intensity():
    labels = _brain_labels()
    t1 = np.choose(labels, [0.0, 0.3, 0.6, 0.9]).astype(np.float32)
    edited = labels.copy()
    edited[(labels == 3) & (np.abs(np.indices(labels.shape)[0] - 11.5) < 2)] = 1  # a slab of white -> CSF
    result = data.edited_t1(t1, labels, edited, np.random.default_rng(0))
    inside = (edited == 1) & (labels == 3)
    core = inside & (np.abs(np.indices(labels.shape)[1] - 11.5) < 1)  # away from the blend's edges
    assert abs(np.median(result[core]) - 0.3) < 0.1
    far = np.abs(np.indices(labels.shape)[0] - 11.5) > 6
    assert np.array_equal(result[far], t1[far])  # nothing changes far from the edit
    assert result.min() >= 0 and result.max() <= 1


def test_acquisition_grid_is_oblique_anisotropic_and_covers_the_brain():
    mask = sitk.GetImageFromArray((_brain_labels(40) > 0).astype(np.float32))
    mask.SetSpacing((2.0, 2.0, 2.0))
    grid = data.acquisition_grid(mask, np.random.default_rng(3))
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    assert not np.allclose(np.abs(direction), np.eye(3))  # rotated
    assert max(grid.GetSpacing()) >= 2.0 and len(set(np.round(grid.GetSpacing(), 3))) > 1
    on_grid = sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    covered = sitk.GetArrayFromImage(on_grid).sum() * np.prod(grid.GetSpacing())
    assert covered == pytest.approx(sitk.GetArrayFromImage(mask).sum() * 8.0, rel=0.1)
