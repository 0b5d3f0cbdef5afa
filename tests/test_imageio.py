"""imageio: modes, bit depths, EXIF, errors, pixel limit, the three resize policies."""
import numpy as np
import pytest
from PIL import Image

from anoddpm.data.imageio import image_hw, load_image, preprocess, preprocess_mask, read_image, read_mask, save_png, to_uint8
from anoddpm.data.listing import list_images


def test_16bit_png_scaled_to_unit_range(tmp_path):
    a = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png", channels=1)
    assert out.shape == (1, 3, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_8bit_grey_and_rgb_conversions(tmp_path):
    Image.fromarray(np.full((4, 5), 51, np.uint8)).save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png", channels=3)
    assert rgb.shape == (4, 5, 3)
    np.testing.assert_allclose(rgb, 0.2, atol=1e-6)
    Image.fromarray(np.stack([np.full((4, 5), v, np.uint8) for v in (255, 0, 0)], -1)).save(tmp_path / "r.png")
    grey = read_image(tmp_path / "r.png", channels=1)
    np.testing.assert_allclose(grey, 0.299, atol=1e-5)


def test_palette_rgba_la_cmyk(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[:, :3] = (255, 0, 0)
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 6), 7, np.uint8)])).save(tmp_path / "a.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    Image.fromarray(np.full((6, 6), 128, np.uint8)).convert("LA").save(tmp_path / "la.png")
    for name in ("p.png", "a.png"):
        out = read_image(tmp_path / name, channels=3)
        np.testing.assert_allclose(out[0, 0], [1, 0, 0], atol=1e-6)
        np.testing.assert_allclose(out[0, 5], [0, 0, 0], atol=1e-6)
    assert abs(read_image(tmp_path / "c.jpg", channels=3)[0, 0, 0] - 1.0) < 0.05
    np.testing.assert_allclose(read_image(tmp_path / "la.png", channels=1), 128 / 255, atol=1e-6)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((2, 4), np.uint8)
    a[0, 0] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "e.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "e.jpg", channels=1)
    assert out.shape == (4, 2, 1)
    assert image_hw(tmp_path / "e.jpg") == (4, 2)
    assert out[0, 1, 0] > 0.5 and out[0, 0, 0] < 0.5  # top-left went to top-right


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_bad_files_raise_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.png"):
        read_image(path, channels=1)


def test_truncated_png_raises(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.png"):
        read_image(tmp_path / "t.png", channels=1)


def test_missing_file_and_pixel_limit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png", channels=1)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(tmp_path / "big.png", channels=1, max_pixels=9999)
    assert read_image(tmp_path / "big.png", channels=1, max_pixels=10000).shape == (100, 100, 1)


def _erode(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    out[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return out


@pytest.mark.parametrize("policy", ["resize", "crop", "pad"])
@pytest.mark.parametrize("hw", [(181, 256), (256, 100), (40, 40), (20, 30)])
def test_policies_shape_range_and_mask_alignment(policy, hw):
    h, w = hw
    rng = np.random.default_rng(0)
    img = rng.random((h, w, 3)).astype(np.float32) * 0.5
    mask = np.zeros((h, w), bool)
    mask[h // 3: h // 2, w // 4: w // 2] = True
    img[mask] = 1.0
    out, m = preprocess(img, 64, policy), preprocess_mask(mask, 64, policy)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32 and m.shape == (64, 64) and m.dtype == bool
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert m.any()
    inner = _erode(_erode(m))  # the bilinear filter blurs about two output pixels
    assert inner.any()
    assert out[:, inner].min() > 0.8  # the bright square lands exactly where the mask says
    assert out[:, ~m].mean() < 0.35


def test_geometry_of_crop_and_pad():
    img = np.zeros((100, 200, 1), np.float32)
    img[:, :50] = 1.0  # left quarter bright
    crop = preprocess(img, 50, "crop")[0]  # 50x100 -> centre 50 columns: cols 25..75 of 100
    assert crop[:, 2:20].max() < 0.05 and crop[:, 0].max() < 0.3
    pad = preprocess(img, 50, "pad")[0]  # 25x50 placed in rows 12..37, edge-padded
    np.testing.assert_allclose(pad[0], pad[12], atol=1e-6)
    assert pad[:, :10].min() > 0.95 and pad[:, 40:].max() < 0.05
    resized = preprocess(img, 50, "resize")[0]
    assert resized[:, :10].min() > 0.95 and resized[:, 15:].max() < 0.05


def test_unknown_policy():
    with pytest.raises(ValueError, match="resize_policy"):
        preprocess(np.zeros((8, 8, 1), np.float32), 8, "stretch")


def test_mask_roundtrip_and_load_image(tmp_path):
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    save_png(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    save_png(tmp_path / "i.png", np.full((3, 10, 12), 0.5, np.float32))
    out = load_image(tmp_path / "i.png", 1, 16, "resize")
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out, 128 / 255, atol=1e-5)
    assert to_uint8(np.array([[0.0, 0.5, 1.0, 2.0]])).tolist() == [[0, 128, 255, 255]]


def test_list_images(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for rel in ("d/b.png", "d/sub/a.JPG", "d/notes.txt", "d/.hidden.png", "x.bmp", "y.csv"):
        (tmp_path / rel).write_bytes(b"x")
    images, skipped = list_images([tmp_path / "d", tmp_path / "x.bmp", tmp_path / "y.csv", tmp_path / "gone.png"])
    assert images == sorted([tmp_path / "d/b.png", tmp_path / "d/sub/a.JPG", tmp_path / "x.bmp"])
    assert {p.name for p, _ in skipped} == {"notes.txt", "y.csv", "gone.png"}
    assert dict((p.name, why) for p, why in skipped)["gone.png"] == "not found"
