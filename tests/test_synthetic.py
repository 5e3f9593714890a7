"""Synthetic faces: deterministic bytes, insightface layout, held-out pairs, ensure_synthetic, CLI synth/inspect,
learnability."""

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main
from distill.data import RecordIO, RecordIODataset, load_verification_bin, synthetic
from distill.data.face_render import render_image
from distill.data.synthetic import VAL_BIN, VAL_PAIRS, ensure_synthetic, generate, read_manifest
from distill.utils.errors import ConfigError

TINY = dict(ids=5, images_per_id=3, size=32, pairs=10, seed=7, holdout_ids=4)


def _hashes(folder) -> dict:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))}


def _looks_like(decoded, rendered, other) -> bool:
    """JPEG moves a noisy 32-px image by a few levels; another rendering is far further away."""
    near = np.abs(decoded.astype(np.float64) - rendered).mean()
    return near < 10 and near < 0.3 * np.abs(decoded.astype(np.float64) - other).mean()


def _pairs_table(folder) -> list:
    lines = (folder / VAL_PAIRS).read_text().splitlines()
    assert lines[0] == "identity_a\timage_a\tidentity_b\timage_b\tissame"
    return [tuple(int(v) for v in line.split("\t")) for line in lines[1:]]


@pytest.mark.parametrize("size", [32, 48, 112])
def test_render_image_is_a_deterministic_rgb_face_at_any_size(size):
    img = render_image(3, 11, 2, size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert img.std() > 10  # a picture, not a flat fill
    assert np.array_equal(img, render_image(3, 11, 2, size))
    assert not np.array_equal(img, render_image(3, 11, 3, size))  # another image of the same person differs


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    generate(tmp_path / "a", workers=1, **TINY)
    generate(tmp_path / "b", workers=2, **TINY)
    first = _hashes(tmp_path / "a")
    assert set(first) == {"train.rec", "train.idx", "property", VAL_BIN, VAL_PAIRS, "synth.json"}
    assert first == _hashes(tmp_path / "b")
    generate(tmp_path / "c", workers=1, **{**TINY, "seed": 8})
    assert _hashes(tmp_path / "c")["train.rec"] != first["train.rec"]


def test_training_set_is_insightface_layout_readable_by_recordio(tmp_path):
    generate(tmp_path, workers=1, **TINY)
    rec = RecordIO(tmp_path)
    assert len(rec) == 15 and rec.num_classes == 5 and rec.identity_keys is not None
    assert list(rec.labels()) == [c for c in range(5) for _ in range(3)]
    assert (tmp_path / "property").read_text() == "5,32,32"
    # Key 1 is image 0 of identity 0, key 5 image 1 of identity 1, as rendered.
    assert rec.image(1).shape == (32, 32, 3)
    assert _looks_like(rec.image(1), render_image(7, 0, 0, 32), render_image(7, 0, 1, 32))
    assert _looks_like(rec.image(5), render_image(7, 1, 1, 32), render_image(7, 1, 0, 32))
    img, label, index, _ = RecordIODataset(tmp_path)[4]
    assert img.shape == (3, 32, 32) and label == 1 and index == 4


def test_pairs_are_balanced_and_come_only_from_held_out_identities(tmp_path):
    params = {**TINY, "pairs": 40}
    manifest = generate(tmp_path, workers=1, **params)
    assert manifest["holdout_identities"] == [5, 9] and manifest["train_identities"] == [0, 5]
    images, issame = load_verification_bin(tmp_path / VAL_BIN)
    table = _pairs_table(tmp_path)
    assert len(images) == 80 and len(issame) == len(table) == 40
    assert [bool(row[4]) for row in table] == list(issame)
    assert issame.sum() == 20
    assert all(issame[k:k + 4].sum() == 2 for k in range(0, 40, 4))  # every contiguous fold is balanced
    for a, _ia, b, _ib, same in table:
        assert 5 <= a < 9 and 5 <= b < 9  # never a training identity (0..4)
        assert (a == b) == bool(same)
    images_seen = {(a, ia) for a, ia, *_ in table} | {(b, ib) for _, _, b, ib, _ in table}
    assert len(images_seen) == 80  # every image in the .bin is a distinct rendering
    a, ia, b, ib, _ = table[1]
    assert _looks_like(images[2], render_image(7, a, ia, 32), render_image(7, b, ib, 32))
    assert _looks_like(images[3], render_image(7, b, ib, 32), render_image(7, a, ia, 32))


def test_ensure_synthetic_is_a_no_op_for_the_same_parameters(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    manifest = ensure_synthetic(out, workers=1, **TINY)
    before = {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)}

    def refuse(*args, **kwargs):
        raise AssertionError("generate must not run when synth.json matches")

    monkeypatch.setattr(synthetic, "generate", refuse)
    assert ensure_synthetic(out, workers=1, **TINY) == manifest
    assert {name: (out / name).stat().st_mtime_ns for name in os.listdir(out)} == before


def test_ensure_synthetic_regenerates_when_parameters_change(tmp_path):
    out = tmp_path / "synth"
    ensure_synthetic(out, workers=1, **TINY)
    old = _hashes(out)
    manifest = ensure_synthetic(out, workers=1, **{**TINY, "ids": 6})
    assert manifest["params"]["ids"] == 6 and read_manifest(out)["params"]["ids"] == 6
    assert RecordIO(out).num_classes == 6 and _hashes(out)["train.rec"] != old["train.rec"]
    assert sorted(os.listdir(tmp_path)) == ["synth"]  # no temporary or old folders left behind


def test_interrupted_generation_keeps_the_old_dataset_and_leaves_no_partial_one(tmp_path, monkeypatch):
    out = tmp_path / "synth"
    ensure_synthetic(out, workers=1, **TINY)
    old = _hashes(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_verification_bin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(out, workers=1, **{**TINY, "seed": 9})
    assert _hashes(out) == old
    assert sorted(os.listdir(tmp_path)) == ["synth"]
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "fresh", workers=1, **TINY)
    assert not (tmp_path / "fresh").exists()


def test_generate_over_an_older_dataset_drops_its_manifest_until_done(tmp_path, monkeypatch):
    generate(tmp_path, workers=1, **TINY)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_verification_bin", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, workers=1, **{**TINY, "ids": 6})
    # train.rec now holds 6 identities: the old synth.json must not vouch for it any more.
    assert read_manifest(tmp_path) is None
    assert not synthetic.synthetic_is_current(tmp_path, **TINY)


def test_ensure_synthetic_never_overwrites_a_folder_that_is_not_synthetic(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a synthetic dataset"):
        ensure_synthetic(tmp_path, workers=1, **TINY)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad, key", [({"pairs": 9}, "pairs"), ({"size": 8}, "size"), ({"ids": 0}, "ids"),
                                      ({"holdout_ids": 1}, "holdout_ids"), ({"seed": -1}, "seed")])
def test_bad_parameters_are_config_errors_naming_the_key(tmp_path, bad, key):
    with pytest.raises(ConfigError, match=key):
        generate(tmp_path, workers=1, **{**TINY, **bad})


def test_default_holdout_is_a_tenth_of_the_identities_and_at_least_ten():
    assert synthetic.synthetic_params(ids=50)["holdout_ids"] == 10
    assert synthetic.synthetic_params(ids=500)["holdout_ids"] == 50
    assert synthetic.synthetic_params(ids=500, holdout_ids=7)["holdout_ids"] == 7


def test_cli_synth_then_inspect_end_to_end(tmp_path, capsys):
    out = tmp_path / "faces"
    args = ["data", "synth", str(out), "--ids", "4", "--images-per-id", "5", "--size", "48", "--pairs", "6",
            "--seed", "2", "--holdout-ids", "3", "--workers", "1"]
    assert main(args) == 0
    assert "20 images of 4 identities (48x48)" in capsys.readouterr().out
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out

    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", str(out), "--grid", str(grid), "--rows", "3", "--cols", "4"]) == 0
    report = capsys.readouterr().out
    assert "insightface layout" in report and "identities    4" in report
    assert "images        20" in report and "min 5 / median 5 / max 5" in report and "48x48" in report
    with Image.open(grid) as im:
        im.verify()
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size == (4 * 50 + 2, 3 * 50 + 2)  # 4 images x 3 identities, 2-px gaps
        pixels = np.asarray(im.convert("RGB"))
    assert pixels[2:50, 2:50].std() > 10  # a face was drawn, not a blank tile

    assert main(["data", "inspect", str(out / VAL_BIN), "--grid", str(tmp_path / "pairs.png")]) == 0
    report = capsys.readouterr().out
    assert "pairs         6 (3 same, 3 different)" in report
    with Image.open(tmp_path / "pairs.png") as im:
        im.verify()


def test_cli_inspect_reads_an_image_folder_tree(tmp_path, capsys):
    for person, count in (("alice", 2), ("bob", 3)):
        (tmp_path / "tree" / person).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(render_image(0, len(person), i, 40)).save(tmp_path / "tree" / person / f"{i}.png")
    assert main(["data", "inspect", str(tmp_path / "tree")]) == 0
    report = capsys.readouterr().out
    assert "image folder tree" in report and "identities    2" in report and "min 2 / median 2.5 / max 3" in report


def test_cli_reports_bad_parameters_without_a_traceback(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "x"), "--pairs", "3"]) == 2
    assert "pairs = 3" in capsys.readouterr().err


# ---- learnability --------------------------------------------------------------------------------

def _best_threshold_accuracy(fa, fb, issame) -> float:
    """Verification accuracy at the best cosine threshold chosen on the pairs themselves: an optimistic
    score, which makes "the baselines stay below 0.7" a strong statement."""
    fa = fa / np.linalg.norm(fa, axis=1, keepdims=True)
    fb = fb / np.linalg.norm(fb, axis=1, keepdims=True)
    same = issame[np.argsort(-(fa * fb).sum(1))]
    # Calling the top j pairs "same": correct = same pairs among them + different pairs below them.
    correct = np.r_[0, np.cumsum(same)] + (~same).sum() - np.r_[0, np.cumsum(~same)]
    return correct.max() / len(same)


def _tiny_cnn(embedding=64):
    layers, channels = [], [3, 8, 16, 32]
    for cin, cout in zip(channels, channels[1:], strict=False):
        layers += [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, embedding))


def test_identities_are_learnable_but_not_from_raw_pixels(tmp_path):
    """60 training identities x 12 images and 600 pairs of 50 held-out identities at 32x32: raw pixels and a
    random CNN stay near chance, 200 steps of a tiny CNN classifier on the training identities do much better."""
    generate(tmp_path, ids=60, images_per_id=12, size=32, pairs=600, seed=0, holdout_ids=50, workers=1)
    rec = RecordIO(tmp_path)
    train = np.stack([rec.image(int(k)) for k in rec.keys])
    labels = torch.from_numpy(rec.labels())
    images, issame = load_verification_bin(tmp_path / VAL_BIN)
    pairs = np.stack(images)

    def tensor(x):
        return torch.from_numpy((x.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()

    def score(model):
        with torch.no_grad():
            emb = model.eval()(tensor(pairs)).numpy()
        return _best_threshold_accuracy(emb[0::2], emb[1::2], issame)

    raw = _best_threshold_accuracy(tensor(pairs[0::2]).flatten(1).numpy(), tensor(pairs[1::2]).flatten(1).numpy(),
                                   issame)
    torch.manual_seed(0)
    random_net = score(_tiny_cnn())

    net, head = _tiny_cnn(), torch.nn.Linear(64, 60)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=3e-3)
    x = tensor(train)
    for _ in range(200):
        batch = torch.randint(len(x), (32,))
        loss = torch.nn.functional.cross_entropy(head(net(x[batch])), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = score(net)

    print(f"raw pixels {raw:.3f}, random CNN {random_net:.3f}, trained CNN {trained:.3f}")
    assert raw < 0.7 and random_net < 0.7
    assert trained > 0.75 and trained > max(raw, random_net) + 0.12


# ------------------------------------------------------------------- distill run never replaces a dataset

def test_run_never_replaces_a_dataset_made_with_other_settings(tmp_path):
    out = tmp_path / "synth"
    ensure_synthetic(out, workers=1, **TINY)
    old = _hashes(out)
    with pytest.raises(ConfigError, match=r"holds a synthetic dataset made with other settings \(on disk "
                                          r"\{'ids': 5\}, data.synthetic asks for \{'ids': 6\}\); distill run never "
                                          r"replaces a dataset: give another data.train, or delete .*synth"):
        ensure_synthetic(out, workers=1, replace=False, **{**TINY, "ids": 6})
    assert _hashes(out) == old
    assert ensure_synthetic(out, workers=1, replace=False, **TINY)["params"]["ids"] == 5  # the same: used as is


def test_distill_run_stops_before_any_work_on_a_differing_dataset(tmp_path, monkeypatch, capsys):
    import yaml

    from distill.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "mine", "--ids", "5", "--images-per-id", "3", "--size", "32", "--pairs", "10",
                 "--seed", "7", "--holdout-ids", "4"]) == 0
    old = _hashes(tmp_path / "mine")
    exp = tmp_path / "x.yaml"
    exp.write_text(yaml.safe_dump({"name": "x", "data": {"train": "mine", "val": [], "input_size": 32,
                                                         "synthetic": {**TINY, "seed": 8}},
                                   "student": {"embedding_size": 32}, "generations": 0}))
    capsys.readouterr()
    assert main(["run", str(exp), "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert "never replaces a dataset" in err and "'seed': 7" in err and "'seed': 8" in err and "Traceback" not in err
    assert _hashes(tmp_path / "mine") == old and not (tmp_path / "run" / "baseline").exists()


def test_leftovers_of_a_killed_generation_are_cleaned_up_on_the_next_run(tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    partial = tmp_path / f".synth.partial-{dead}"
    partial.mkdir()
    (partial / "train.rec").write_bytes(b"half")
    ensure_synthetic(tmp_path / "synth", workers=1, **TINY)
    assert sorted(os.listdir(tmp_path)) == ["synth"]
    # killed between its two renames: the previous dataset sits in .old-<pid> and synth is gone
    os.replace(tmp_path / "synth", tmp_path / f".synth.old-{dead}")
    before = _hashes(tmp_path / f".synth.old-{dead}")
    ensure_synthetic(tmp_path / "synth", workers=1, replace=False, **TINY)
    assert sorted(os.listdir(tmp_path)) == ["synth"] and _hashes(tmp_path / "synth") == before
