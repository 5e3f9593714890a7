"""Identity-per-folder image trees as training sets, and open_training_set picking the right reader."""


import numpy as np
import pytest
import torch
from PIL import Image

from distill.data import ImageFolderDataset, RecordIODataset, open_training_set
from distill.utils.errors import DataFormatError


def save(path, seed, fmt="JPEG", mode="RGB", size=20):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "faces"
    pixels = {
        ("carol", "a.jpg"): save(root / "carol" / "a.jpg", 1),
        ("alice", "x.png"): save(root / "alice" / "x.png", 2, fmt="PNG"),
        ("alice", "y.JPG"): save(root / "alice" / "y.JPG", 3),
        ("bob", "sub/grey.png"): save(root / "bob" / "sub" / "grey.png", 4, fmt="PNG", mode="L"),
    }
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root, pixels


def test_classes_sorted_by_folder_and_items_follow_the_contract(tree):
    root, pixels = tree
    ds = ImageFolderDataset(root, flip=False)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3 and len(ds) == 4
    expected = [("alice", "x.png"), ("alice", "y.JPG"), ("bob", "sub/grey.png"), ("carol", "a.jpg")]
    for i, (name, file) in enumerate(expected):
        img, label, index, flipped = ds[i]
        assert (label, index, flipped) == (ds.classes.index(name), i, False)
        rgb = torch.from_numpy(pixels[(name, file)].copy()).permute(2, 0, 1).float()
        assert torch.equal(img, (rgb / 255 - 0.5) / 0.5)  # grey images come out as 3-channel RGB
        assert torch.equal(ds.get(i, True), img.flip(-1))
    assert ImageFolderDataset(root, input_size=32).get(0, False).shape == (3, 32, 32)


def test_random_flips_follow_torch_seed(tree):
    ds = ImageFolderDataset(tree[0], flip=True)
    torch.manual_seed(3)
    a = [ds[i % 4][3] for i in range(32)]
    torch.manual_seed(3)
    b = [ds[i % 4][3] for i in range(32)]
    assert a == b and 0 < sum(a) < 32
    with pytest.raises(IndexError):
        ds[4]


def test_empty_and_malformed_trees(tmp_path):
    with pytest.raises(DataFormatError, match="not a folder"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"empty: no identity folders found"):
        ImageFolderDataset(tmp_path / "empty")
    save(tmp_path / "flat" / "one.jpg", 0)
    with pytest.raises(DataFormatError, match=r"holds 1 images directly"):
        ImageFolderDataset(tmp_path / "flat")
    save(tmp_path / "gaps" / "dave" / "a.jpg", 0)
    (tmp_path / "gaps" / "erin").mkdir()
    (tmp_path / "gaps" / "erin" / "readme.md").write_text("x")
    with pytest.raises(DataFormatError, match=r"gaps: 1 identity folder\(s\) hold no images \(erin\)"):
        ImageFolderDataset(tmp_path / "gaps")


def test_unreadable_image_names_path_and_index(tree):
    root, _ = tree
    (root / "bob" / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ds = ImageFolderDataset(root)
    i = [p for p, _ in ds.samples].index(str(root / "bob" / "zz.jpg"))
    with pytest.raises(DataFormatError, match=rf"bob/zz\.jpg \(image {i} of .*faces\): cannot decode image"):
        ds[i]
    assert ds.get(0, False).shape == (3, 20, 20)  # the others still load


def test_open_training_set_picks_the_reader(tree, fixtures, tmp_path):
    assert isinstance(open_training_set(tree[0]), ImageFolderDataset)
    rec_dir = fixtures / "insightface_rec"
    for path in (rec_dir, rec_dir / "train.rec", rec_dir / "im2rec" / "train.rec"):
        ds = open_training_set(path, flip=False, input_size=56)
        assert isinstance(ds, RecordIODataset) and len(ds) == 24 and ds.num_classes == 6
        assert ds[0][0].shape == (3, 56, 56) and ds[0][3] is False
    with pytest.raises(DataFormatError, match="not a training set"):
        open_training_set(tmp_path / "nothing")
