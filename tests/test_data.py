"""data: layouts, clear errors, deterministic val split, fingerprint, test set, NFBS volumes."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from anoddpm.config import Config
from anoddpm.data.datasets import load_test_set, load_training_data, resolve_category_root

CFG = Config().override("data", image_size=32, channels=1)


def _copy(synth_root, tmp_path):
    shutil.copytree(synth_root, tmp_path / "ds")
    return tmp_path / "ds"


def test_val_split_deterministic_and_disjoint(synth_root):
    train, val, fp = load_training_data(CFG, synth_root, "synthetic", seed=0)
    train2, val2, fp2 = load_training_data(CFG, synth_root / "synthetic", None, seed=0)
    _, val3, fp3 = load_training_data(CFG, synth_root, "synthetic", seed=1)
    assert (len(train), len(val)) == (8, 4)  # 10% of 12 rounds to 1, raised to min_val_images=4
    assert val.names == val2.names and train.names == train2.names and fp["sha256"] == fp2["sha256"]
    assert val3.names != val.names and fp3["sha256"] == fp["sha256"]
    assert not set(train.names) & set(val.names)
    assert sorted(train.names + val.names) == [f"train/good/{i:03d}.png" for i in range(12)]
    assert fp["n_train"] == 8 and fp["n_val"] == 4 and fp["val_files"] == sorted(val.names)
    x = train[0]
    assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape == (1, 32, 32)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_val_fraction_zero_and_texture_augmentation(synth_root):
    cfg = CFG.override("data", val_fraction=0.0, augment="texture", channels=3)
    train, val, _ = load_training_data(cfg, synth_root, "synthetic", seed=0)
    assert len(val) == 0 and len(train) == 12
    base = torch.from_numpy(train.arrays[0])
    assert base.shape == (3, 32, 32)
    variants = [torch.rot90(b, k, (1, 2)) for b in (base, base.flip(2)) for k in range(4)]
    seen = set()
    for _ in range(30):
        x = train[0]
        matches = [i for i, v in enumerate(variants) if torch.equal(x, v)]
        assert matches  # every augmented view is a flip/rot90 of the image
        seen.add(matches[0])
    assert len(seen) >= 6  # of the 8: the flips and turns are drawn together, not as one shared coin


def test_flips_augmentation_keeps_the_texture_orientation(synth_root):
    cfg = CFG.override("data", augment="flips")
    train, _, _ = load_training_data(cfg, synth_root, "synthetic", seed=0)
    base = torch.from_numpy(train.arrays[0])
    variants = [base, base.flip(1), base.flip(2), base.flip(1).flip(2)]  # no rot90: a direction stays a direction
    seen = set()
    for _ in range(30):
        x = train[0]
        matches = [i for i, v in enumerate(variants) if torch.equal(x, v)]
        assert matches
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_fingerprint_stable_across_copies_and_sensitive_to_bytes(synth_root, tmp_path):
    ds = _copy(synth_root, tmp_path)
    fp = load_training_data(CFG, synth_root, "synthetic", 0)[2]
    fp_copy = load_training_data(CFG, ds, "synthetic", 0)[2]
    assert fp["sha256"] == fp_copy["sha256"] and fp["root"] != fp_copy["root"]
    img = ds / "synthetic" / "train" / "good" / "003.png"
    a = np.asarray(Image.open(img)).copy()
    a[0, 0] ^= 1
    Image.fromarray(a).save(img)
    assert load_training_data(CFG, ds, "synthetic", 0)[2]["sha256"] != fp["sha256"]


def test_test_set(synth_root):
    samples = load_test_set(CFG, synth_root, "synthetic")
    assert len(samples) == 12 and len({s.name for s in samples}) == 12
    assert sum(s.label for s in samples) == 8
    for s in samples:
        img, mask = s.image, s.mask
        assert img.shape == (1, 32, 32) and img.dtype == np.float32 and mask.shape == (32, 32) and mask.dtype == bool
        assert mask.any() == bool(s.label) and (s.defect_type == "good") == (s.label == 0)
        assert (s.mask_path is None) == (s.label == 0)


@pytest.mark.parametrize("breakage, error, pattern", [
    ("missing_mask", FileNotFoundError, r"crack/000_mask.png.*crack/000.png"),
    ("mask_size", ValueError, r"hole/001_mask.png.*hole/001.png"),
    ("empty_train", ValueError, "train/good"),
    ("no_train", ValueError, "no train/good"),
])
def test_layout_errors_before_training_or_evaluation(synth_root, tmp_path, breakage, error, pattern):
    cat = _copy(synth_root, tmp_path) / "synthetic"
    if breakage == "missing_mask":
        (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
    elif breakage == "mask_size":
        Image.new("L", (31, 32)).save(cat / "ground_truth" / "hole" / "001_mask.png")
    elif breakage == "empty_train":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
    else:
        shutil.rmtree(cat / "train")
    if breakage in ("missing_mask", "mask_size"):  # training never reads the test set; evaluate refuses it
        load_training_data(CFG, cat.parent, "synthetic", 0)
        with pytest.raises(error, match=pattern):
            load_test_set(CFG, cat.parent, "synthetic")
        return
    with pytest.raises(error, match=pattern):
        load_training_data(CFG, cat.parent, "synthetic", 0)


def test_root_and_category_errors(synth_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_category_root(tmp_path / "nowhere", None)
    with pytest.raises(ValueError, match="available: synthetic"):
        resolve_category_root(synth_root, "carpet")
    with pytest.raises(ValueError, match="--category"):
        resolve_category_root(synth_root, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        resolve_category_root(tmp_path / "empty", None)


@pytest.mark.parametrize("policy", ["resize", "crop", "pad"])
def test_plain_folder_with_odd_sizes(tmp_path, policy):
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(256, 181), (181, 256), (96, 256), (64, 64), (100, 90)]):
        folder = tmp_path / "imgs" / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = Config().override("data", image_size=48, channels=3, resize_policy=policy, val_fraction=0.2,
                            min_val_images=1)
    train, val, fp = load_training_data(cfg, tmp_path / "imgs", None, seed=0)
    assert (len(train), len(val)) == (4, 1) and fp["kind"] == "folder"
    assert all(x.shape == (3, 48, 48) for x in [*train, *val])
    assert load_test_set(cfg, tmp_path / "imgs", None) == []


def _brain_volume(rng, shape=(20, 24, 16), lesion=False):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = (x ** 2 + y ** 2 + z ** 2) < 0.8
    vol = np.where(brain, 300 + 50 * rng.standard_normal(shape), 0).astype(np.float32)
    vol[brain & (rng.random(shape) < 0.002)] = 5000  # outliers clipped by the percentile normalisation
    seg = None
    if lesion:
        seg = ((x - 0.2) ** 2 + (y - 0.1) ** 2 + (z - 0.0) ** 2 < 0.06).astype(np.uint8)
        vol[seg > 0] = 600
    return vol, brain.astype(np.uint8), seg


def _nifti(path, data):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


@pytest.fixture(scope="module")
def nfbs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nfbs") / "NFBS_Dataset"
    rng = np.random.default_rng(0)
    for sid in ("A001", "A002", "A003"):
        vol, brain, _ = _brain_volume(rng)
        _nifti(root / sid / f"sub-{sid}_ses-NFB3_T1w_brain.nii.gz", vol)
        _nifti(root / sid / f"sub-{sid}_ses-NFB3_T1w_brainmask.nii.gz", brain)
        _nifti(root / sid / f"sub-{sid}_ses-NFB3_T1w.nii.gz", vol + 10)
    vol, brain, seg = _brain_volume(rng, lesion=True)
    _nifti(root / "anomalous" / "L01" / "case.nii.gz", vol)
    _nifti(root / "anomalous" / "L01" / "case_seg.nii.gz", seg)
    return root


def test_nfbs_training_slices(nfbs_root):
    cfg = CFG.override("data", val_fraction=0.3, min_val_images=1)
    train, val, fp = load_training_data(cfg, nfbs_root, None, seed=0)
    assert fp["kind"] == "nfbs" and fp["n_files"] == 3 and len(fp["val_files"]) == 1
    per_subject = len(train) // 2
    assert len(train) == 2 * per_subject and len(val) == per_subject and 4 <= per_subject < 16
    assert not {n.split("/")[0] for n in train.names} & {n.split("/")[0] for n in val.names}
    x = torch.stack(list(train))
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) <= 1.0
    inside = x[x > 0]
    assert 0.3 < float(inside.mean()) < 0.7  # 5000-valued outliers did not squash the brain into ~0.06


def test_nfbs_anomalous_test_set(nfbs_root):
    samples = load_test_set(CFG, nfbs_root, None)
    labels = np.array([s.label for s in samples])
    assert 0 < labels.sum() < len(samples)
    for s in samples:
        assert s.image.shape == (1, 32, 32) and s.mask.shape == (32, 32)
        assert s.mask.any() == bool(s.label) and s.defect_type == ("lesion" if s.label else "good")
    lesion = next(s for s in samples if s.label)
    assert lesion.image[0][lesion.mask].mean() > lesion.image[0][~lesion.mask & (lesion.image[0] > 0)].mean()


def test_test_samples_pickle(synth_root, nfbs_root):
    import pickle

    for s in (load_test_set(CFG, synth_root, "synthetic")[-1], load_test_set(CFG, nfbs_root, None)[0]):
        copy = pickle.loads(pickle.dumps(s))
        np.testing.assert_array_equal(copy.image, s.image)
        np.testing.assert_array_equal(copy.mask, s.mask)


def test_infer_channels_follows_the_training_images(synth_root, tmp_path):
    from PIL import Image

    from anoddpm.data.datasets import infer_channels

    assert infer_channels(synth_root, "synthetic") == 1
    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(colour / "a.png")
    assert infer_channels(colour, None) == 3
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(colour / "0.png")  # grey stored as RGB sorts first
    assert infer_channels(colour, None) == 1
