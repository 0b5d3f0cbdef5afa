"""Dataset layouts on disk -> which files are training, validation and labelled test images.

Detected from ``--data ROOT [--category NAME]`` (ROOT may also be the category folder itself):

* ``mvtec`` (MVTec AD, and VisA converted to it): ``train/good``, ``test/<type>/X.png`` and, for each type
  other than ``good``, ``ground_truth/<type>/X_mask.png`` (or ``X.png``, as anomalib's VisA conversion
  writes under ``ground_truth/bad``).
* ``mvtec_loco`` (MVTec LOCO AD): as ``mvtec`` with a folder ``ground_truth/<type>/X/`` of masks per image
  (``000.png``, ``001.png``, ... OR-ed; any non-zero pixel is a defect) and a ``validation/good`` split.
* ``mvtec_ad2`` (MVTec AD 2): ``train/good``, ``validation/good``, labelled test images in
  ``test_public/{good,bad}`` with masks in ``test_public/ground_truth/bad/X_mask.png``.
* ``visa`` (VisA as distributed): ``ROOT/split_csv/1cls.csv`` (columns object, split, label, image, mask;
  paths relative to ROOT) and ``--category`` one of its objects; anomalies get the type ``bad``, mask
  pixels are defects where non-zero.
* ``folder``: a folder of good images (recursive; training only), or, when ``data.normal_dir`` /
  ``data.abnormal_dir`` name folders under ROOT, good images in ``normal_dir``, defect images in
  ``abnormal_dir`` (type = its sub-folder, else its name) with masks of the same relative path in
  ``mask_dir`` (``X.png`` or ``X_mask.png``), and test goods from ``normal_test_dir`` (default: the
  held-back validation images, which then also calibrate the threshold).

A layout's ``validation/good`` folder, when present, is the held-back split for calibration (instead of
``data.val_fraction`` of ``train/good``). A defect type without a mask folder gives image labels only
(``TestItem.masks`` None): pixel metrics skip those images. A single missing mask inside a mask folder
is an error naming it.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from anoddpm.data.imageio import IMAGE_SUFFIXES, image_hw
from anoddpm.data.listing import list_images

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_DEFECT = "bad"


@dataclass(frozen=True)
class TestItem:
    """A labelled test image: masks () for good images, None for a defect image without a mask."""

    image: Path
    defect_type: str  # "good" or the defect type
    masks: tuple[Path, ...] | None
    name: str  # unique in the test set, e.g. "crack/003"

    @property
    def label(self) -> int:
        """0 good, 1 defective."""
        return int(self.defect_type != "good")


@dataclass(frozen=True)
class Layout:
    """Files of one category; paths in ``train``/``validation`` are named relative to ``root`` in fingerprints."""

    kind: str  # mvtec | mvtec_loco | mvtec_ad2 | visa | folder
    root: Path
    train: list[Path]
    validation: list[Path] = field(default_factory=list)  # empty = split data.val_fraction off ``train``
    test: list[TestItem] = field(default_factory=list)
    mask_rule: str = "half"  # half: grey > 127 is a defect; nonzero: any value > 0


def images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted ([] when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _categories(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())


def _visa_root(root: Path, category: str | None) -> tuple[Path, str] | None:
    """(VisA root, object) when ROOT (+ category) is a VisA tree as distributed."""
    if (root / VISA_CSV).is_file() and category:
        return root, category
    if (root.parent / VISA_CSV).is_file() and (root / "Data").is_dir() and category in (None, root.name):
        return root.parent, root.name
    return None


def _is_nfbs(root: Path) -> bool:
    return next(root.glob("*/sub-*_T1w_brain.nii.gz"), None) is not None


def resolve_category_root(root: str | Path, category: str | None) -> Path:
    """ROOT/category, or ROOT itself when it is a category, an NFBS folder or a plain image folder
    (for VisA as distributed: the VisA root)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data root not found: {root}")
    if not root.is_dir():
        raise ValueError(f"data root {root} is not a folder")
    visa = _visa_root(root, category)
    if visa is not None:
        return visa[0]
    if category:
        if (root / category).is_dir():
            return resolve_category_root(root / category, None)
        if root.name == category and ((root / "train").is_dir() or _is_nfbs(root)):
            return root
        available = _categories(root)
        raise ValueError(f"unknown category {category!r} under {root}; available: "
                         f"{', '.join(available) if available else '(none: ROOT holds no <category>/train)'}")
    if (root / "train").is_dir() or _is_nfbs(root):
        return root
    if any((root / d).is_dir() for d in ("test", "test_public", "ground_truth")):
        raise ValueError(f"{root} has test/ or ground_truth/ but no train/good folder")
    available = _categories(root)
    if available:
        raise ValueError(f"{root} holds categories ({', '.join(available)}); pass --category")
    if not list_images([root])[0]:
        raise ValueError(f"{root} is neither an MVTec category (no train/), an NFBS folder, "
                         f"nor a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    return root


def _check_sizes(image: Path, masks: tuple[Path, ...]) -> None:
    hw = image_hw(image)
    for mask in masks:
        if image_hw(mask) != hw:
            raise ValueError(f"mask {mask} is {image_hw(mask)} (h, w) but its image {image} is {hw}")


def _masks_for(image: Path, type_gt: Path, stem: str) -> tuple[Path, ...]:
    """The mask file(s) of one defect image in its type's mask folder; FileNotFoundError naming the expected one."""
    folder = type_gt / stem
    if folder.is_dir():
        masks = tuple(images_in(folder))
        if not masks:
            raise FileNotFoundError(f"mask folder {folder} for test image {image} holds no images")
        return masks
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        if (type_gt / name).is_file():
            return (type_gt / name,)
    raise FileNotFoundError(f"mask {type_gt / f'{stem}_mask.png'} (or {stem}.png, or a folder {stem}/ of masks) "
                            f"for test image {image} not found")


def _typed_test_items(test: Path, gt: Path) -> list[TestItem]:
    """test/<type>/X with ground truth gt/<type>/...: every type other than good needs masks when gt/<type> exists."""
    items = []
    type_dirs = sorted(p for p in test.iterdir() if p.is_dir() and p != gt) if test.is_dir() else []
    for type_dir in type_dirs:
        kind = type_dir.name
        for img in images_in(type_dir):
            masks: tuple[Path, ...] | None = ()
            if kind != "good":
                masks = _masks_for(img, gt / kind, img.stem) if (gt / kind).is_dir() else None
                _check_sizes(img, masks or ())
            items.append(TestItem(img, kind, masks, f"{kind}/{img.stem}"))
    return items


def _train_good(cat_root: Path) -> list[Path]:
    good = cat_root / "train" / "good"
    files = images_in(good)
    if not files:
        raise ValueError(f"{good} is missing or holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _mvtec_family(cat_root: Path, with_test: bool = True) -> Layout:
    train, validation = _train_good(cat_root), images_in(cat_root / "validation" / "good")
    if (cat_root / "test_public").is_dir():
        public = cat_root / "test_public"
        test = _typed_test_items(public, public / "ground_truth") if with_test else []
        return Layout("mvtec_ad2", cat_root, train, validation, test)
    gt = cat_root / "ground_truth"
    loco = gt.is_dir() and any(p.is_dir() for t in gt.iterdir() if t.is_dir() for p in t.iterdir())
    test = _typed_test_items(cat_root / "test", gt) if with_test else []
    return Layout("mvtec_loco" if loco else "mvtec", cat_root, train, validation, test,
                  "nonzero" if loco else "half")


def _visa(root: Path, category: str) -> Layout:
    csv_path = root / VISA_CSV
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("object") == category]
    if not rows:
        raise ValueError(f"{csv_path} lists no images of object {category!r}")
    train, test = [], []
    for row in rows:
        image = root / row["image"]
        if not image.is_file():
            raise FileNotFoundError(f"image {image} listed in {csv_path} not found")
        if row["split"] == "train" and row["label"] == "normal":
            train.append(image)
        elif row["split"] == "test":
            defect = row["label"] != "normal"
            masks: tuple[Path, ...] | None = ()
            if defect:
                masks = (root / row["mask"],) if row.get("mask") else None
                if masks and not masks[0].is_file():
                    raise FileNotFoundError(f"mask {masks[0]} for test image {image} (listed in {csv_path}) not found")
                _check_sizes(image, masks or ())
            kind = VISA_DEFECT if defect else "good"
            test.append(TestItem(image, kind, masks, f"{kind}/{image.stem}"))
    if not train:
        raise ValueError(f"{csv_path} lists no normal training images of object {category!r}")
    return Layout("visa", root, sorted(train), [], test, "nonzero")


def _named_folders(root: Path, normal: str, abnormal: str, mask_dir: str, normal_test: str) -> Layout:
    def folder(name: str, what: str) -> Path:
        path = root / name
        if not path.is_dir():
            raise FileNotFoundError(f"{what} folder {path} not found")
        return path

    train = list_images([folder(normal, "data.normal_dir (--normal-dir)")])[0] if normal else []
    if not train:
        raise ValueError(f"no good training images: set --normal-dir to a folder of images under {root}")
    test = []
    if normal_test:
        good_dir = folder(normal_test, "data.normal_test_dir (--normal-test-dir)")
        test += [TestItem(p, "good", (), f"good/{p.relative_to(good_dir).with_suffix('').as_posix()}")
                 for p in list_images([good_dir])[0]]
    if abnormal:
        bad_dir = folder(abnormal, "data.abnormal_dir (--abnormal-dir)")
        masks_root = folder(mask_dir, "data.mask_dir (--mask-dir)") if mask_dir else None
        for img in list_images([bad_dir])[0]:
            rel = img.relative_to(bad_dir)
            kind = rel.parts[0] if len(rel.parts) > 1 else bad_dir.name
            masks = None if masks_root is None else _masks_for(img, masks_root / rel.parent, img.stem)
            _check_sizes(img, masks or ())
            test.append(TestItem(img, kind, masks, f"{kind}/{rel.with_suffix('').as_posix()}"))
    return Layout("folder", root, train, [], test)


def discover(root: str | Path, category: str | None, normal_dir: str = "", abnormal_dir: str = "",
             mask_dir: str = "", normal_test_dir: str = "", with_test: bool = True) -> Layout:
    """The image layout of ROOT (+ category): see the module docstring. NFBS volumes are not an image layout
    (``anoddpm.data.datasets`` reads them); ValueError/FileNotFoundError name the folder or file at fault. Without
    `with_test` the MVTec family's test set is not read (training needs none: a missing test mask is no error)."""
    if normal_dir or abnormal_dir:
        base = Path(root) / category if category else Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data root not found: {base}")
        return _named_folders(base, normal_dir, abnormal_dir, mask_dir, normal_test_dir)
    cat_root = resolve_category_root(root, category)
    visa = _visa_root(Path(root), category)
    if visa is not None:
        return _visa(*visa)
    if (cat_root / "train").is_dir():
        return _mvtec_family(cat_root, with_test)
    return Layout("folder", cat_root, list_images([cat_root])[0])
