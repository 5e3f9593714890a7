"""Verification .bin sets: all three real pickle styles read exactly, malicious pickles refused unrun, bad files fail
clearly."""

import hashlib
import io
import json
import pickle
import pickletools

import numpy as np
import pytest
from PIL import Image

from distill.data import load_verification_bin, write_verification_bin
from distill.data.verification import read_verification_pickle
from distill.utils.errors import DataFormatError, UnsafeFileError


def sha1(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture
def bins(fixtures):
    return fixtures / "verification_bin"


@pytest.fixture
def truth(bins):
    return json.loads((bins / "truth.json").read_text())


def jpeg(seed, size=24):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("style", ["py2", "py3", "ndarray"])
def test_every_style_matches_truth(bins, truth, style):
    images, issame = load_verification_bin(bins / f"{style}.bin")
    assert issame.dtype == bool and issame.tolist() == truth["issame"] and len(issame) == 21
    assert len(images) == 42
    for i, img in enumerate(images):
        assert img.shape == (112, 112, 3) and img.dtype == np.uint8
        assert sha1(img) == truth["rgb_sha1"][i], f"image {i}"  # libjpeg-exact, as OpenCV decodes
        assert img.mean() == pytest.approx(truth["rgb_mean"][i], abs=1e-9)


def test_py2_file_really_holds_python2_strings(bins):
    # Guards the fixture's meaning: plain pickle.load of a Python 2 str pickle fails on non-ASCII bytes.
    ops = {op.name for op, _, _ in pickletools.genops((bins / "py2.bin").read_bytes())}
    assert "BINSTRING" in ops and "BINBYTES" not in ops


def test_evil_bin_is_refused_and_runs_nothing(bins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeFileError) as err:
        load_verification_bin(bins / "evil.bin")
    message = str(err.value)
    assert str(bins / "evil.bin") in message and "posix.system" in message and "Nothing was executed" in message
    assert isinstance(err.value, ValueError)
    assert not list(tmp_path.rglob("PWNED_BY_PICKLE"))
    assert not (bins / "PWNED_BY_PICKLE").exists()


class _Boom:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_other_code_running_pickles_are_refused(tmp_path, protocol):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([jpeg(0), _Boom()], [True]), protocol=protocol))
    with pytest.raises(UnsafeFileError, match=r"bad\.bin: refused to load: .*'(builtins|__builtin__)\.eval'"):
        load_verification_bin(path)


def test_numpy_arrays_pickled_by_current_numpy_load(tmp_path):
    # numpy 2 names numpy._core.multiarray._reconstruct; the fixture (numpy 1.x) names numpy.core.
    data = [jpeg(i) for i in range(4)]
    path = tmp_path / "np.bin"
    for protocol in (2, 3, 4):
        arrays = [np.frombuffer(d, dtype=np.uint8) for d in data]
        path.write_bytes(pickle.dumps((arrays, np.array([True, False])), protocol=protocol))
        encoded, issame = read_verification_pickle(path)
        assert encoded == data and issame == [True, False]


def test_object_arrays_are_not_admitted(tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(pickle.dumps(([np.array([b"x"], dtype=object)] * 2, [True]), protocol=2))
    with pytest.raises(DataFormatError, match=r"obj\.bin: not a valid pickle .*not uint8 or bool"):
        load_verification_bin(path)


def test_write_verification_bin_round_trip(tmp_path):
    data = [jpeg(i) for i in range(6)]
    path = tmp_path / "set.bin"
    write_verification_bin(path, data, [True, False, True])
    assert pickletools.genops(path.read_bytes()).__next__()[1] == 4  # PROTO 4
    encoded, issame = read_verification_pickle(path)
    assert encoded == data and issame == [True, False, True]
    images, issame = load_verification_bin(path)
    assert issame.tolist() == [True, False, True]
    for img, d in zip(images, data, strict=True):
        assert np.array_equal(img, np.asarray(Image.open(io.BytesIO(d)).convert("RGB")))
    with pytest.raises(ValueError, match="3 pairs need 6 images, got 5"):
        write_verification_bin(path, data[:5], [True, False, True])


def test_truncated_bin(bins, tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes((bins / "py3.bin").read_bytes()[:50000])
    with pytest.raises(DataFormatError, match=r"cut\.bin: truncated .*near byte \d+ of 50000"):
        load_verification_bin(path)


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 a jpeg, not a pickle", b"", b"hello world\n"])
def test_not_a_pickle(tmp_path, content):
    path = tmp_path / "junk.bin"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=r"junk\.bin: (not a valid pickle|truncated)"):
        load_verification_bin(path)


def test_trailing_bytes_after_the_pickle(bins, tmp_path):
    path = tmp_path / "two.bin"
    path.write_bytes((bins / "py3.bin").read_bytes() + b"extra")
    with pytest.raises(DataFormatError, match=r"two\.bin: the pickle ends at byte 159441 but the file holds 159446"):
        load_verification_bin(path)


def test_pair_count_and_image_count_disagree(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps(([jpeg(i) for i in range(5)], [True, False]), protocol=4))
    with pytest.raises(DataFormatError, match=r"odd\.bin: 2 pairs in issame need 4 images, but the file holds 5"):
        load_verification_bin(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        (([b"a", b"b"], [True], "extra"), "expected the 2-tuple .* tuple of length 3"),
        ({"bins": []}, "expected the 2-tuple .* dict"),
        (([b"a", 7], [True]), "image 1 is a int"),
        (([b"a", b"b"], ["yes"]), r"issame\[0\] is 'yes'"),
    ],
)
def test_wrong_structure(tmp_path, obj, message):
    path = tmp_path / "shape.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(DataFormatError, match=r"shape\.bin: " + message):
        load_verification_bin(path)


def test_undecodable_image_names_the_index(tmp_path):
    path = tmp_path / "broken.bin"
    write_verification_bin(path, [jpeg(0), jpeg(1), jpeg(2), b"\xff\xd8\xff garbage"], [True, False])
    with pytest.raises(DataFormatError, match=r"broken\.bin: image 3 \(pair 1\): cannot decode image"):
        load_verification_bin(path)
