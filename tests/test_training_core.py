"""pipeline.core.training, property-tested: the split never puts a file on both sides, patches sit
inside the image on the stride grid, augmentation moves image and labels together, the confusion
matrix counts every labelled pixel once and the metrics read from it are the textbook ones."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.core.training import (
    IGNORE,
    augment,
    class_metrics,
    class_weights,
    confusion,
    draw_block,
    label_classes,
    normalisation,
    patch_origins,
    split_by_file,
    unknown_ids,
)


@given(n=st.integers(2, 40), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 10**6))
def test_the_split_is_by_whole_files_and_neither_side_is_empty(n: int, fraction: float, seed: int) -> None:
    names = [f"f{i}.tif" for i in range(n)]
    training, validation = split_by_file(names, fraction, seed)
    assert sorted(training + validation) == sorted(names) and not set(training) & set(validation)
    assert training and validation
    assert split_by_file(names, fraction, seed) == (training, validation)  # the seed decides


def test_chosen_validation_files_and_a_single_file() -> None:
    assert split_by_file(["a", "b", "c"], 0.5, 0, ["b"]) == (["a", "c"], ["b"])
    assert split_by_file(["a"], 0.5, 0) == (["a"], [])  # the driver says the validation split is empty


@given(
    rows=st.integers(16, 300), cols=st.integers(16, 300), patch=st.sampled_from([16, 32]),
    stride=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 1000), balanced=st.booleans(),
)  # fmt: skip
def test_patches_lie_inside_on_the_stride_grid(
    rows: int, cols: int, patch: int, stride: int, seed: int, balanced: bool
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (rows, cols)).astype(np.uint8) if balanced else None
    if rows < patch or cols < patch:
        return
    for r, c in patch_origins((rows, cols), patch, stride, 20, rng, labels, 3):
        assert 0 <= r <= rows - patch and 0 <= c <= cols - patch
        assert r % stride == 0 and c % stride == 0


def test_balanced_patches_find_a_rare_class() -> None:
    labels = np.zeros((512, 512), np.uint8)
    labels[300:304, 100:104] = 1  # 16 pixels of 262144
    rng = np.random.default_rng(0)
    plain = patch_origins(labels.shape, 32, 4, 200, rng)
    balanced = patch_origins(labels.shape, 32, 4, 200, rng, labels, 2)

    def hits(origins: list[tuple[int, int]]) -> int:
        return sum(bool((labels[r : r + 32, c : c + 32] == 1).any()) for r, c in origins)

    assert hits(balanced) >= 80 and hits(plain) < hits(balanced) / 4


@settings(max_examples=50)
@given(seed=st.integers(0, 10**6), jitter=st.sampled_from([0.0, 0.2]), per_band=st.booleans())
def test_augmentation_moves_image_and_labels_together(seed: int, jitter: float, per_band: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (12, 12)).astype(np.uint8)
    labels[0, 0], labels[0, 1] = 0, 3  # two values at least: the fits below are defined
    image = np.stack([labels.astype(np.float32), labels.astype(np.float32) * 2])
    out, moved = augment(image, labels, np.random.default_rng(seed + 1), flips=True, rot90=True, jitter=jitter,
                         per_band=per_band)  # fmt: skip
    if jitter == 0:
        assert np.array_equal(out[0], moved) and np.array_equal(out[1], moved * 2.0)
        return
    fits = []
    for band in out:  # a gain and an offset: still a linear function of the same labels
        fitted = np.polyfit(moved.ravel().astype(float), band.ravel(), 1)
        assert np.allclose(np.polyval(fitted, moved.astype(float)), band, atol=1e-4)
        fits.append(fitted)
    if not per_band:  # one gain and offset for every band: the bands keep their ratio of gains (colour)
        assert np.isclose(fits[1][0], 2 * fits[0][0], rtol=1e-4) and np.isclose(fits[1][1], fits[0][1], atol=1e-4)


@given(
    truth=arrays(np.uint8, (30,), elements=st.sampled_from([0, 1, 2, IGNORE])),
    predicted=arrays(np.uint8, (30,), elements=st.integers(0, 2)),
)
def test_the_confusion_matrix_counts_every_labelled_pixel_once(truth: np.ndarray, predicted: np.ndarray) -> None:
    matrix = confusion(predicted, truth, 3)
    assert matrix.sum() == (truth != IGNORE).sum()
    for t in range(3):
        for p in range(3):
            assert matrix[t, p] == ((truth == t) & (predicted == p)).sum()
    for k, row in enumerate(class_metrics(matrix)):
        tp = ((truth == k) & (predicted == k)).sum()
        fp = ((truth != k) & (truth != IGNORE) & (predicted == k)).sum()
        fn = ((truth == k) & (predicted != k)).sum()
        assert row["pixels"] == tp + fn
        if tp + fp + fn:
            assert np.isclose(row["iou"], tp / (tp + fp + fn)) and np.isclose(row["dice"], 2 * tp / (2 * tp + fp + fn))
        else:
            assert row["iou"] is None and row["dice"] is None


def test_label_values_map_noisy_mask_values_to_the_nearest_class() -> None:
    jpeg_mask = np.array([[0, 3, 120, 140, 250, 255]], np.uint8)
    assert label_classes(jpeg_mask, [0, 255], 2).tolist() == [[0, 0, 0, 1, 1, 1]]
    floats = np.array([[0.0, 1.0, np.nan, 2.5, -1.0, 300.0]])
    ids = label_classes(floats, None, 2)
    assert ids[0, :2].tolist() == [0, 1] and ids[0, 2] == IGNORE
    assert unknown_ids(ids, 2) == [254]  # fractional, negative, too large: never a real class


def test_class_weights_and_normalisation() -> None:
    counts = np.array([900, 100, 0])
    weights = class_weights(counts)
    assert np.isclose((weights * counts).sum() / counts.sum(), 1) and np.isclose(weights[1], 9 * weights[0])
    assert weights[2] == 0
    values = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 10.0]])
    mean, std = normalisation(values.sum(1), (values**2).sum(1), np.array([4, 4]))
    assert np.allclose(mean, [2.5, 10]) and np.isclose(std[0], np.std(values[0])) and std[1] == 1.0


@given(
    shape=st.tuples(st.integers(8, 40), st.integers(16, 80), st.integers(16, 80)),
    patch=st.tuples(st.sampled_from([4, 8]), st.sampled_from([8, 16]), st.sampled_from([8, 16])),
    stride=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000), balanced=st.booleans(),
)  # fmt: skip
def test_volume_patches_lie_inside_on_the_stride_grid(
    shape: tuple[int, int, int], patch: tuple[int, int, int], stride: int, seed: int, balanced: bool
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, shape).astype(np.uint8) if balanced else None
    for corner in patch_origins(shape, patch, stride, 10, rng, labels, 3):
        assert len(corner) == 3
        for at, n, p in zip(corner, shape, patch, strict=True):
            assert 0 <= at <= n - p and at % stride == 0


@settings(max_examples=30)
@given(seed=st.integers(0, 10**6))
def test_volume_augmentation_moves_image_and_labels_together(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (4, 6, 6)).astype(np.uint8)
    image = labels[None].astype(np.float32)
    out, moved = augment(image, labels, np.random.default_rng(seed + 1), flips=True, rot90=True, jitter=0.0)
    assert out.shape == (1, 4, 6, 6) and np.array_equal(out[0], moved)
    assert sorted(moved[0].ravel()) in [sorted(labels[0].ravel()), sorted(labels[-1].ravel())]  # slices stay slices


def test_blocks_are_drawn_per_class_in_proportion_to_their_pixels() -> None:
    counts = np.array([[10, 0], [30, 0], [0, 5], [0, 0]])
    rng = np.random.default_rng(0)
    draws = [draw_block(counts, rng) for _ in range(4000)]
    classes = np.array([k for k, _ in draws])  # type: ignore[misc]
    blocks = np.array([b for _, b in draws])  # type: ignore[misc]
    assert 0.45 < (classes == 1).mean() < 0.55  # each class present, uniformly
    assert set(blocks[classes == 1]) == {2} and 3 not in set(blocks)
    assert 0.70 < (blocks[classes == 0] == 1).mean() < 0.80  # 30 of the class's 40 pixels
    assert draw_block(np.zeros((3, 2)), rng) is None
