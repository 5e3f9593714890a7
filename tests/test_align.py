"""Face alignment (distill/data/align.py): the similarity transform, the OpenCV-style warp, align_face."""

import numpy as np
import pytest

from distill.data.align import ARCFACE_TEMPLATE, LandmarkError, align_face, estimate_similarity, warp_affine
from distill.utils.errors import DataFormatError


def _closed_form_similarity(src, dst) -> np.ndarray:
    """Least-squares rotation + scale + translation by another route: points as complex numbers,
    dst ≈ a·src + b, a = Σ conj(src_c)·dst_c / Σ |src_c|² (c: centred). A proper similarity by construction."""
    s = src[:, 0] + 1j * src[:, 1]
    d = dst[:, 0] + 1j * dst[:, 1]
    sc, dc = s - s.mean(), d - d.mean()
    a = (np.conj(sc) * dc).sum() / (np.abs(sc) ** 2).sum()
    b = d.mean() - a * s.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def test_scale_and_translation_recovered_exactly():
    dst = 2.0 * ARCFACE_TEMPLATE + np.array([3.0, -4.0])
    np.testing.assert_allclose(estimate_similarity(ARCFACE_TEMPLATE, dst), [[2, 0, 3], [0, 2, -4]], atol=1e-12)


def test_quarter_turn_recovered_exactly():
    # (x, y) -> (-y + 100, x - 7): a 90° rotation (y points down, so clockwise on screen) and a shift
    src = ARCFACE_TEMPLATE
    dst = np.stack([-src[:, 1] + 100.0, src[:, 0] - 7.0], axis=1)
    np.testing.assert_allclose(estimate_similarity(src, dst), [[0, -1, 100], [1, 0, -7]], atol=1e-12)


def test_noisy_points_give_the_least_squares_similarity():
    rng = np.random.default_rng(0)
    for _ in range(20):
        src = rng.uniform(0, 200, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))  # unrelated points: only a least-squares fit exists
        np.testing.assert_allclose(estimate_similarity(src, dst), _closed_form_similarity(src, dst), atol=1e-9)


def test_mirrored_points_give_a_rotation_never_a_reflection():
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0]) + np.array([112.0, 0.0])
    m = estimate_similarity(mirrored, ARCFACE_TEMPLATE)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, _closed_form_similarity(mirrored, ARCFACE_TEMPLATE), atol=1e-9)


def test_collinear_but_distinct_points_still_give_a_transform():
    src = np.array([[10.0, 10], [20, 20], [30, 30], [40, 40], [50, 50]])
    m = estimate_similarity(src, ARCFACE_TEMPLATE)  # as scikit-image: the rotation is still unique
    np.testing.assert_allclose(m, _closed_form_similarity(src, ARCFACE_TEMPLATE), atol=1e-9)


@pytest.mark.parametrize("landmarks, words", [
    (np.full((5, 2), 40.0), "coincide"),
    (np.zeros((5, 2)), "coincide"),
    (np.where(np.arange(10).reshape(5, 2) == 3, np.nan, ARCFACE_TEMPLATE), "NaN"),
    (ARCFACE_TEMPLATE[:4], "shape"),
])
def test_degenerate_landmarks_raise_a_data_error(landmarks, words):
    with pytest.raises(LandmarkError, match=words) as info:
        estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    assert isinstance(info.value, DataFormatError)
    with pytest.raises(LandmarkError, match=words):
        align_face(np.zeros((50, 50, 3), np.uint8), landmarks)


def _ramp_image():
    return (np.arange(20 * 30 * 3).reshape(20, 30, 3) % 251).astype(np.uint8)


def test_integer_translation_moves_pixels_and_blacks_the_rest():
    img = _ramp_image()
    out = warp_affine(img, np.array([[1.0, 0, 2], [0, 1, 3]]), 12)
    np.testing.assert_array_equal(out[3:, 2:], img[:9, :10])  # dst(x, y) = src(x - 2, y - 3)
    assert not out[:3].any() and not out[:, :2].any()


def test_upscaling_a_linear_ramp_interpolates_exactly():
    img = np.tile((np.arange(16) * 10).astype(np.uint8)[None, :, None], (4, 1, 3))  # 0, 10, ..., 150 along x
    out = warp_affine(img, np.array([[2.0, 0, 0], [0, 2, 0]]), 8)  # dst(x, y) = src(x/2, y/2)
    np.testing.assert_array_equal(out[0, :, 0], np.arange(8) * 5)  # half-way points are exact means
    np.testing.assert_array_equal(out[:, 3, 1], [15] * 7 + [8])  # row y=7 samples y=3.5: half black, 7.5 -> 8
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)


def test_warp_matches_pixels_printed_by_opencv():
    """cv2.warpAffine(img, M, (8, 8), borderValue=0.0) with OpenCV 4.10.0 on this image printed these (channel 0):
    a half-pixel shift (the border blends with black, halves round up) and a 30° rotation at scale 0.7."""
    img = _ramp_image()
    shifted = warp_affine(img, np.array([[1.0, 0, 2.5], [0, 1, 3]]), 8)[..., 0]
    assert shifted[3:5].tolist() == [[0, 0, 0, 2, 5, 8, 11, 14], [0, 0, 45, 92, 95, 98, 101, 104]]
    a, s = np.deg2rad(30), 0.7
    m = np.array([[s * np.cos(a), -s * np.sin(a), 6.25], [s * np.sin(a), s * np.cos(a), -1.5]])
    assert warp_affine(img, m, 8)[..., 0].tolist() == [
        [0, 0, 0, 0, 0, 31, 177, 124], [0, 0, 0, 0, 0, 110, 49, 98], [0, 0, 0, 0, 35, 167, 161, 100],
        [0, 0, 0, 39, 146, 85, 87, 206], [0, 0, 0, 62, 156, 197, 136, 78], [0, 0, 85, 183, 122, 76, 196, 190],
        [0, 0, 104, 145, 233, 175, 114, 116], [0, 17, 78, 158, 97, 106, 54, 165]]


def test_warp_of_a_float_or_grey_image_keeps_its_kind():
    grey = np.arange(36, dtype=np.float64).reshape(6, 6)
    out = warp_affine(grey, np.array([[1.0, 0, 0.5], [0, 1, 0]]), 4)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    np.testing.assert_allclose(out[1, 1:], [6.5, 7.5, 8.5])


def test_align_face_puts_the_landmarks_on_the_template():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (120, 150, 3)).astype(np.uint8)
    # a face at half the template's size, its template origin at (10, 20) of the image
    face = align_face(img, ARCFACE_TEMPLATE * 0.5 + np.array([10.0, 20.0]))
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    # aligned(x, y) = img(x/2 + 10, y/2 + 20): exact at even x, y
    np.testing.assert_array_equal(face[::2, ::2], img[20:76, 10:66])
    small = align_face(img, ARCFACE_TEMPLATE * 0.5 + np.array([10.0, 20.0]), size=56)
    np.testing.assert_array_equal(small, img[20:76, 10:66])


def test_pack_with_landmarks_aligns_raw_photos_into_a_training_set(tmp_path, capsys):
    """`distill data pack SRC OUT --landmarks FILE`: the synthetic IJB set's loose crops and landmarks, sorted into
    identity folders by template, become a 112x112 training set whose images are exactly align_face's output."""
    import shutil

    from distill.cli import main
    from distill.data import RecordIODataset
    from distill.data.images import decode_image, encode_jpeg
    from distill.data.synth_ijb import write_synthetic_ijb

    ijb = tmp_path / "ijb"
    write_synthetic_ijb(ijb, templates=4, seed=1)
    tid = dict(line.split()[:2] for line in (ijb / "meta" / "ijbc_face_tid_mid.txt").read_text().splitlines())
    src, lines = tmp_path / "photos", []
    for line in (ijb / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines():
        name = line.split()[0]
        (src / f"t{tid[name]}").mkdir(parents=True, exist_ok=True)
        shutil.copy(ijb / "loose_crop" / name, src / f"t{tid[name]}" / name)
        lines.append(f"t{tid[name]}/{line}")
    (tmp_path / "lm.txt").write_text("\n".join(lines) + "\n")
    assert main(["data", "pack", str(src), str(tmp_path / "out"), "--landmarks", str(tmp_path / "lm.txt")]) == 0
    assert "(112x112)" in capsys.readouterr().out
    packed = RecordIODataset(tmp_path / "out")
    assert len(packed) == len(lines) and (tmp_path / "out" / "property").read_text().strip().endswith("112,112")
    first = sorted(lines)[0].split()  # folder order, then file order: the first record
    photo = decode_image((src / first[0]).read_bytes(), first[0])
    expected = decode_image(encode_jpeg(align_face(photo, np.array(first[1:11], float).reshape(5, 2)), quality=95), "x")
    chw, _ = packed.load(0)
    assert np.array_equal(chw.permute(1, 2, 0).numpy(), expected)

    (tmp_path / "lm.txt").write_text("\n".join(lines[1:]) + "\n")  # one image without landmarks
    assert main(["data", "pack", str(src), str(tmp_path / "out2"), "--landmarks", str(tmp_path / "lm.txt")]) == 2
    assert f"no landmarks for 1 of {len(lines)} images, first " in capsys.readouterr().err
    (tmp_path / "lm.txt").write_text(lines[0].rsplit(" ", 3)[0] + "\n")  # too few values
    assert main(["data", "pack", str(src), str(tmp_path / "out3"), "--landmarks", str(tmp_path / "lm.txt")]) == 2
    assert f"{tmp_path / 'lm.txt'}: line 1: 8 values after the image name; expected 10" in capsys.readouterr().err
