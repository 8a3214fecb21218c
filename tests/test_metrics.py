"""Metrics: brute-force and scikit-image references on real and random labels, the CLI."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from skimage.metrics import adapted_rand_error, variation_of_information

from ssn_deploy import metrics
from ssn_deploy.cli import main
from ssn_deploy.errors import InvalidInputError, ShapeMismatchError, VoxelSizeError
from ssn_deploy.metrics import Contingency, contingency, evaluate
from tests.conftest import sha256

LABELS = "volumes/labels/neuron_ids"
GLIA = 135478  # thin catch-all body of fib_medulla_250 (see the data README)
CROP = np.s_[100:148, :160, :160]  # holds gt-0 voxels and ~4 % glia
TOL = 1e-9


@pytest.fixture(scope="module")
def gt_full(medulla_250: Path) -> np.ndarray:
    with h5py.File(medulla_250, "r") as f:
        return f[LABELS][:]


@pytest.fixture(scope="module")
def gt_crop(gt_full: np.ndarray) -> np.ndarray:
    crop = gt_full[CROP].copy()
    assert np.count_nonzero(crop == 0) and np.count_nonzero(crop == GLIA)
    return crop


def largest_bodies(gt: np.ndarray, n: int) -> np.ndarray:
    ids, sizes = np.unique(gt[gt != 0], return_counts=True)
    return ids[np.argsort(sizes)[::-1][:n]]


def merge_bodies(gt: np.ndarray, pairs: int, first: int = 0) -> np.ndarray:
    """Merge pairs of large bodies: ranks (first, first+1), (first+2, first+3), ..."""
    seg = gt.copy()
    big = largest_bodies(gt, first + 2 * pairs)[first:]
    for keep, gone in zip(big[0::2], big[1::2], strict=True):
        seg[gt == gone] = keep
    return seg


def split_bodies(gt: np.ndarray, n: int, first: int = 0, into: np.ndarray | None = None):
    """Cut bodies of size ranks first..first+n-1 by the plane x = middle of their extent.

    The cuts are written into ``into`` (a copy of gt by default), so merges and splits of
    different bodies compose.
    """
    seg = gt.copy() if into is None else into.copy()
    x = np.arange(gt.shape[2])[None, None, :]
    for i, body in enumerate(largest_bodies(gt, first + n)[first:]):
        inside = gt == body
        middle = np.flatnonzero(inside.any(axis=(0, 1))).mean()
        seg[inside & (x > middle)] = np.uint64(10**12 + i)
    return seg


def relabel(gt: np.ndarray, seed: int) -> np.ndarray:
    """The same partition under random new ids (0 moves to a random id too)."""
    ids, inverse = np.unique(gt, return_inverse=True)
    new = np.random.default_rng(seed).choice(2**40, size=ids.size, replace=False)
    return new.astype(np.uint64)[inverse].reshape(gt.shape)


def add_noise(gt: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Give a random fraction of voxels the id of a random body, or 0."""
    rng = np.random.default_rng(seed)
    seg = gt.copy()
    hit = rng.random(gt.shape) < fraction
    seg[hit] = rng.choice(np.r_[0, np.unique(gt)], size=np.count_nonzero(hit))
    return seg


def skimage_scores(seg: np.ndarray, gt: np.ndarray, ignore: tuple[int, ...] = ()) -> dict:
    """Our report's keys from scikit-image (whose precision and recall are swapped, #6485).

    scikit-image sizes dense marginals by the largest id, so seg ids are made consecutive
    first (relabelling a segmentation changes no metric).
    """
    seg = np.unique(seg, return_inverse=True)[1].reshape(seg.shape)
    labels = [0, *ignore]
    split, merge = variation_of_information(gt, seg, ignore_labels=labels)
    are, recall, precision = adapted_rand_error(gt, seg, ignore_labels=labels)
    return {
        "voi_split": split,
        "voi_merge": merge,
        "arand": are,
        "rand_precision": precision,
        "rand_recall": recall,
    }


def assert_close(ours: dict, reference: dict, tol: float = TOL) -> None:
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=tol, rel=0), key


# --- identity on real labels ---------------------------------------------------------------------


def test_gt_against_itself_is_perfect_on_the_whole_volume(gt_full: np.ndarray) -> None:
    report = evaluate(gt_full, gt_full)
    assert report["voi_split"] == report["voi_merge"] == report["arand"] == 0.0
    assert report["rand_precision"] == report["rand_recall"] == 1.0
    assert report["cremi_score"] == 0.0
    assert report["n_split_bodies"] == report["n_merged_segments"] == 0
    assert report["n_gt_bodies"] == report["n_seg_segments"] == 525
    assert report["n_voxels_evaluated"] == gt_full.size - 250
    assert report["n_voxels_ignored"] == 250
    assert report["ignored_ids"] == [0]


def test_relabelled_gt_scores_zero(gt_crop: np.ndarray) -> None:
    report = evaluate(relabel(gt_crop, seed=1), gt_crop, ignore_ids=[GLIA])
    assert report["voi"] == report["arand"] == 0.0
    assert report["ignored_ids"] == [0, GLIA]


# --- agreement with scikit-image on perturbed real labels ---------------------------------------

PERTURBATIONS = {
    "merged": lambda gt: merge_bodies(gt, 3),
    "split": lambda gt: split_bodies(gt, 4),
    "merged+split": lambda gt: split_bodies(gt, 3, first=4, into=merge_bodies(gt, 2)),
    "relabelled": lambda gt: relabel(gt, seed=2),
    "noise": lambda gt: add_noise(gt, 0.05, seed=3),
    "all zero": np.zeros_like,
    "shifted": lambda gt: np.roll(gt, 2, axis=2),
}


@pytest.mark.parametrize("ignore", [(), (GLIA,)], ids=["gt0", "gt0+glia"])
@pytest.mark.parametrize("name", PERTURBATIONS)
def test_agrees_with_skimage(gt_crop: np.ndarray, name: str, ignore: tuple[int, ...]) -> None:
    seg = PERTURBATIONS[name](gt_crop)
    ours = evaluate(seg, gt_crop, ignore_ids=ignore)
    assert_close(ours, skimage_scores(seg, gt_crop, ignore))
    assert ours["voi"] == pytest.approx(ours["voi_split"] + ours["voi_merge"], abs=1e-15)
    assert ours["cremi_score"] == pytest.approx(math.sqrt(ours["voi"] * ours["arand"]))


def test_perturbations_move_the_right_metric(gt_crop: np.ndarray) -> None:
    merged = evaluate(merge_bodies(gt_crop, 3), gt_crop)
    assert merged["voi_split"] == 0.0 and merged["voi_merge"] > 0.0
    assert merged["rand_recall"] == 1.0 and merged["rand_precision"] < 1.0
    split = evaluate(split_bodies(gt_crop, 4), gt_crop)
    assert split["voi_merge"] == 0.0 and split["voi_split"] > 0.0
    assert split["rand_precision"] == 1.0 and split["rand_recall"] < 1.0


def test_predicted_zero_is_an_ordinary_segment(gt_crop: np.ndarray) -> None:
    """An empty prediction is one maximal merge: penalised, never rewarded."""
    report = evaluate(np.zeros_like(gt_crop), gt_crop)
    _, sizes = np.unique(gt_crop[gt_crop != 0], return_counts=True)
    p = sizes / sizes.sum()
    assert report["voi_split"] == 0.0
    assert report["voi_merge"] == pytest.approx(-np.sum(p * np.log2(p)), abs=TOL)
    assert report["arand"] > 0.5
    assert report["n_seg_segments"] == 1 and report["n_merged_segments"] == 1
    assert report["n_voxels_evaluated"] == np.count_nonzero(gt_crop)


def test_split_and_merge_counts(gt_crop: np.ndarray) -> None:
    assert evaluate(split_bodies(gt_crop, 4), gt_crop)["n_split_bodies"] == 4
    assert evaluate(merge_bodies(gt_crop, 3), gt_crop)["n_merged_segments"] == 3
    both = split_bodies(gt_crop, 5, first=4, into=merge_bodies(gt_crop, 2))
    report = evaluate(both, gt_crop)
    assert (report["n_split_bodies"], report["n_merged_segments"]) == (5, 2)


def test_boundary_shift_is_not_counted_as_split_or_merge(gt_crop: np.ndarray) -> None:
    """Majority overlaps ignore voxels handed to a neighbour along the boundaries."""
    report = evaluate(np.roll(gt_crop, 1, axis=2), gt_crop)
    assert report["voi"] > 0.1
    assert report["n_split_bodies"] == report["n_merged_segments"] == 0


def test_min_overlap_skips_small_pieces() -> None:
    gt = np.ones((1, 10, 30), np.uint32)
    seg = gt.copy()
    seg[:, :, 25:] = 2  # a 50-voxel piece of body 1
    assert evaluate(seg, gt)["n_split_bodies"] == 0
    assert evaluate(seg, gt, min_overlap=50)["n_split_bodies"] == 1


# --- brute force ---------------------------------------------------------------------------------


def brute_force(seg: np.ndarray, gt: np.ndarray, ignore: tuple[int, ...] = ()) -> dict:
    """Entropies from voxel counts and Rand scores from every pair of voxels, by loops."""
    skip = {0, *ignore}
    pairs = zip(seg.ravel().tolist(), gt.ravel().tolist(), strict=True)
    voxels = [(s, g) for s, g in pairs if g not in skip]
    n = len(voxels)
    joint = Counter(voxels)
    seg_size, gt_size = Counter(s for s, _ in voxels), Counter(g for _, g in voxels)

    def entropy(counts: Counter) -> float:
        return -sum(c / n * math.log2(c / n) for c in counts.values())

    same_both = same_seg = same_gt = 0
    for (s1, g1), (s2, g2) in itertools.permutations(voxels, 2):
        same_seg += s1 == s2
        same_gt += g1 == g2
        same_both += s1 == s2 and g1 == g2
    return {
        "voi_split": entropy(joint) - entropy(gt_size),
        "voi_merge": entropy(joint) - entropy(seg_size),
        "arand": 1 - (2 * same_both / (same_seg + same_gt) if same_seg + same_gt else 1.0),
        "rand_precision": same_both / same_seg if same_seg else 1.0,
        "rand_recall": same_both / same_gt if same_gt else 1.0,
        "n_voxels_evaluated": n,
    }


def scores_of(seg: np.ndarray, gt: np.ndarray, ignore: tuple[int, ...] = ()) -> dict:
    table = Contingency(ignore)
    table.update(seg, gt)
    return metrics.scores(table)


BIG_IDS = st.sampled_from([0, 1, 2, 3, 7, 2**31 + 5, 2**40, 2**63 + 11, 2**64 - 1])
LABEL_ARRAYS = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=LABEL_ARRAYS)
def test_brute_force_hypothesis(data: st.DataObject, shape: tuple[int, ...]) -> None:
    seg = data.draw(hnp.arrays(np.uint64, shape, elements=BIG_IDS))
    gt = data.draw(hnp.arrays(np.uint64, shape, elements=BIG_IDS))
    ignore = data.draw(st.sampled_from([(), (7,), (2**64 - 1, 3)]))
    assert_close(scores_of(seg, gt, ignore), brute_force(seg, gt, ignore))


@pytest.mark.parametrize(("seg_dtype", "gt_dtype"), [(np.int32, np.uint16), (np.int64, np.uint8)])
def test_brute_force_random_signed_ids(seg_dtype: type, gt_dtype: type) -> None:
    rng = np.random.default_rng(4)
    seg = rng.integers(-3, 4, size=(5, 6, 7)).astype(seg_dtype)
    gt = rng.integers(0, 5, size=(5, 6, 7)).astype(gt_dtype)
    assert_close(scores_of(seg, gt, (4,)), brute_force(seg, gt, (4,)))


def test_brute_force_hashed_pair_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks whose dense key space is too large count pairs by hashing: same answer."""
    rng = np.random.default_rng(5)
    seg = rng.integers(0, 2**50, size=(6, 8, 9), dtype=np.uint64)
    gt = rng.integers(0, 300, size=(6, 8, 9), dtype=np.uint64)
    dense = scores_of(seg, gt)
    monkeypatch.setattr(metrics, "_DENSE_MAX", 0)
    hashed = scores_of(seg, gt)
    assert hashed == dense
    assert_close(hashed, brute_force(seg, gt))


def test_empty_table_and_all_ignored_volume() -> None:
    assert metrics.voi(Contingency()) == (0.0, 0.0)
    gt = np.zeros((2, 3, 4), np.uint64)
    with pytest.raises(InvalidInputError, match="nothing to evaluate"):
        evaluate(gt + 1, gt)


# --- chunked accumulation and merging -----------------------------------------------------------


def assert_same_table(a: Contingency, b: Contingency) -> None:
    for x, y in zip(a.pairs, b.pairs, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.n_ignored == b.n_ignored


@pytest.mark.parametrize("reduce_every_block", [False, True])
@pytest.mark.parametrize("chunk_shape", [(7, 33, 50), (1, 160, 160), (48, 5, 160), (4, 16, 12)])
def test_chunked_equals_one_shot(
    gt_crop: np.ndarray,
    chunk_shape: tuple[int, ...],
    reduce_every_block: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seg = add_noise(split_bodies(gt_crop, 2, first=4, into=merge_bodies(gt_crop, 2)), 0.02, 6)
    one_shot = contingency(seg, gt_crop, ignore_ids=[GLIA], chunk_shape=gt_crop.shape)
    if reduce_every_block:
        monkeypatch.setattr(metrics, "_PENDING_MIN", -(1 << 62))
    chunked = contingency(seg, gt_crop, ignore_ids=[GLIA], chunk_shape=chunk_shape)
    assert_same_table(chunked, one_shot)
    assert metrics.scores(chunked) == metrics.scores(one_shot)


@settings(max_examples=30, deadline=None)
@given(
    seg=hnp.arrays(np.uint32, (6, 5, 7), elements=st.integers(0, 9)),
    gt=hnp.arrays(np.uint32, (6, 5, 7), elements=st.integers(0, 9)),
    chunk_shape=st.tuples(*(st.integers(1, 7) for _ in range(3))),
)
def test_chunked_equals_one_shot_hypothesis(
    seg: np.ndarray, gt: np.ndarray, chunk_shape: tuple[int, int, int]
) -> None:
    assert_same_table(contingency(seg, gt, chunk_shape=chunk_shape), contingency(seg, gt))


def test_merged_tables_equal_one_table(gt_crop: np.ndarray) -> None:
    seg = add_noise(merge_bodies(gt_crop, 2), 0.05, seed=7)
    top = contingency(seg[:20], gt_crop[:20], ignore_ids=[GLIA])
    bottom = contingency(seg[20:], gt_crop[20:], ignore_ids=[GLIA])
    whole = contingency(seg, gt_crop, ignore_ids=[GLIA])
    assert_same_table(top.merge(bottom), whole)
    assert_same_table(bottom.merge(top), whole)
    assert_same_table(top.merge(Contingency([GLIA])), top)
    with pytest.raises(ValueError, match="different gt ids"):
        top.merge(Contingency())


def test_input_arrays_are_not_modified(gt_crop: np.ndarray) -> None:
    seg = split_bodies(gt_crop, 2)
    before = seg.copy(), gt_crop.copy()
    evaluate(seg, gt_crop, chunk_shape=(5, 40, 40))
    np.testing.assert_array_equal(seg, before[0])
    np.testing.assert_array_equal(gt_crop, before[1])


# --- input checks --------------------------------------------------------------------------------


class Labelled:
    """A minimal Volume look-alike: shape, dtype, slicing and a voxel size."""

    def __init__(self, array: np.ndarray, voxel_size: tuple[float, ...] | None) -> None:
        self.array, self.shape, self.dtype, self.voxel_size = (
            array,
            array.shape,
            array.dtype,
            voxel_size,
        )

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self.array[key]


def test_volume_like_objects_are_read_in_blocks(gt_crop: np.ndarray) -> None:
    seg = Labelled(merge_bodies(gt_crop, 1), (10.0, 10.0, 10.0))
    gt = Labelled(gt_crop, (10.0, 10.0, 10.0))
    assert evaluate(seg, gt, chunk_shape=(8, 64, 64)) == evaluate(seg.array, gt_crop)


@pytest.mark.parametrize(
    ("seg", "gt", "error", "message"),
    [
        (np.zeros((2, 3, 4), np.uint8), np.zeros((2, 3, 5), np.uint8), ShapeMismatchError,
         r"\(2, 3, 4\).*\(2, 3, 5\)"),
        (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.uint8), InvalidInputError,
         "must be integers"),
        (np.zeros((3, 4), np.uint8), np.zeros((3, 4), np.uint8), InvalidInputError,
         "expected 3"),
        (Labelled(np.ones((2, 3, 4), np.uint8), (40.0, 4.0, 4.0)),
         Labelled(np.ones((2, 3, 4), np.uint8), (10.0, 10.0, 10.0)), VoxelSizeError,
         "voxel sizes differ"),
    ],
    ids=["shape", "dtype", "rank", "voxel size"],
)  # fmt: skip
def test_input_errors(seg: object, gt: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        evaluate(seg, gt)


def test_unknown_voxel_size_is_not_an_error() -> None:
    seg = Labelled(np.ones((2, 3, 4), np.uint8), None)
    assert evaluate(seg, np.ones((2, 3, 4), np.uint8))["voi"] == 0.0


# --- CLI -----------------------------------------------------------------------------------------


def write_hdf(path: Path, array: np.ndarray, resolution: tuple[float, ...]) -> str:
    with h5py.File(path, "a") as f:
        f.create_dataset(LABELS, data=array, chunks=True)
        f[LABELS].attrs["resolution"] = resolution
    return f"{path}:{LABELS}"


def run_cli(*args: str) -> object:
    return CliRunner().invoke(main, ["evaluate", *args])


def assert_cli_error(result: object, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_cli_gt_against_itself(medulla_250: Path) -> None:
    digest = sha256(medulla_250)
    spec = f"{medulla_250}:{LABELS}"
    result = run_cli(spec, spec)
    assert result.exit_code == 0, result.output
    assert "VOI total" in result.stdout and "0.0000 bits" in result.stdout
    voi_line = next(line for line in result.stdout.splitlines() if "VOI total" in line)
    assert voi_line.split()[-2] == "0.0000"
    assert sha256(medulla_250) == digest


def test_cli_json_and_output_file(gt_crop: np.ndarray, tmp_path: Path) -> None:
    seg_spec = write_hdf(tmp_path / "seg.hdf", split_bodies(gt_crop, 3), (10.0, 10.0, 10.0))
    gt_spec = write_hdf(tmp_path / "gt.hdf", gt_crop, (10.0, 10.0, 10.0))
    digests = sha256(tmp_path / "gt.hdf"), sha256(tmp_path / "seg.hdf")
    out = tmp_path / "report.json"
    result = run_cli(seg_spec, gt_spec, "--ignore-id", str(GLIA), "--json", "--output", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["ignored_ids"] == [0, GLIA]
    assert report["voi_merge"] == 0.0 and report["voi_split"] > 0.0
    assert report["n_split_bodies"] == 3
    assert report["segmentation"] == seg_spec and report["ground_truth"] == gt_spec
    assert (sha256(tmp_path / "gt.hdf"), sha256(tmp_path / "seg.hdf")) == digests

    assert_cli_error(run_cli(seg_spec, gt_spec, "--output", str(out)), "--overwrite")
    assert run_cli(seg_spec, gt_spec, "--output", str(out), "--overwrite").exit_code == 0


def test_cli_zarr_segmentation(medulla_250: Path, gt_crop: np.ndarray, tmp_path: Path) -> None:
    from ssn_deploy.volumes import create_volume

    seg = merge_bodies(gt_crop, 2)
    volume = create_volume(
        str(tmp_path / "seg.zarr"), seg.shape, seg.dtype, voxel_size=(10, 10, 10)
    )
    volume[...] = seg
    gt_spec = write_hdf(tmp_path / "gt.hdf", gt_crop, (10.0, 10.0, 10.0))
    digests = sha256(tmp_path / "seg.zarr"), sha256(tmp_path / "gt.hdf")
    result = run_cli(str(tmp_path / "seg.zarr"), gt_spec, "--json")
    assert result.exit_code == 0, result.output
    assert_close(json.loads(result.stdout), skimage_scores(seg, gt_crop))
    assert (sha256(tmp_path / "seg.zarr"), sha256(tmp_path / "gt.hdf")) == digests


def test_cli_errors(medulla_250: Path, gt_crop: np.ndarray, tmp_path: Path) -> None:
    gt_spec = f"{medulla_250}:{LABELS}"
    digest = sha256(medulla_250)
    crop = write_hdf(tmp_path / "crop.hdf", gt_crop, (10.0, 10.0, 10.0))
    assert_cli_error(run_cli(crop, gt_spec), "(48, 160, 160)")
    assert_cli_error(run_cli(crop, gt_spec), "(250, 250, 250)")

    raw_float = write_hdf(tmp_path / "float.hdf", gt_crop.astype(np.float32), (10.0, 10.0, 10.0))
    assert_cli_error(run_cli(raw_float, crop), "ids must be integers")

    flat = write_hdf(tmp_path / "flat.hdf", gt_crop[0], (10.0, 10.0))
    assert_cli_error(run_cli(flat, crop), "expected 3 (z, y, x)")

    coarse = write_hdf(tmp_path / "coarse.hdf", gt_crop, (40.0, 4.0, 4.0))
    assert_cli_error(run_cli(coarse, crop), "voxel sizes differ")

    assert sha256(medulla_250) == digest


def test_cli_help_documents_metrics_and_zeros() -> None:
    result = CliRunner().invoke(main, ["evaluate", "--help"])
    text = " ".join(result.output.split())
    for phrase in ("Lower is better", "base 2", "H(SEG | GT)", "A 0 in SEG is one ordinary",
                   "GT voxels that are 0", "--ignore-id", "CREMI score"):  # fmt: skip
        assert phrase in text, phrase
