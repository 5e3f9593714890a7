"""IJB-B/IJB-C template verification (distill/eval/ijb.py, distill ijb) and the synthetic IJB set
(distill data synth-ijb)."""

import json
import shutil

import numpy as np
import pytest
import torch

import distill.eval.ijb
from distill.cli import main
from distill.data.align import ARCFACE_TEMPLATE, estimate_similarity
from distill.data.ijb import read_ijb_meta
from distill.data.synth_ijb import IDENTITY_OFFSET, write_synthetic_ijb
from distill.eval.far import IJB_FARS, far_key
from distill.eval.ijb import roc_auc, roc_curve, tar_at_fars_roc, template_features
from distill.models.files import save_student
from distill.models.registry import create_model

FAR_KEYS = ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


# --------------------------------------------------------------------------- pooling by hand


def _scores_of(feats, templates, medias, pairs, **kwargs):
    ids, tf = template_features(np.asarray(feats, np.float32), np.asarray(templates), np.asarray(medias), **kwargs)
    rows = np.searchsorted(ids, np.asarray(pairs))
    return (tf[rows[:, 0]] * tf[rows[:, 1]]).sum(axis=1), ids, tf


# Template 7: a still (media 10, detector score 0.5) and a video (media 11, three frames).
# Template 9: one still that reuses media id 10 (a media id is only unique within its template).
FEATS = [[2, 0], [0, 3], [0, 1], [0, 2], [3, 4]]
TEMPLATES = [7, 7, 7, 7, 9]
MEDIAS = [10, 11, 11, 11, 10]
DETECTOR = np.array([0.5, 1.0, 0.5, 1.0, 1.0], np.float32)
PAIR = [[7, 9]]


def test_pooling_by_hand_n1_d1():
    # still: 0.5 * (2, 0) = (1, 0); video: mean of (0, 3), (0, 0.5), (0, 2) = (0, 5.5/3); template 7 = (1, 5.5/3)
    scores, ids, tf = _scores_of(FEATS, TEMPLATES, MEDIAS, PAIR, scores=DETECTOR)
    t7 = np.array([1.0, 5.5 / 3]) / np.hypot(1.0, 5.5 / 3)
    np.testing.assert_allclose(tf[0], t7, rtol=1e-6)
    np.testing.assert_allclose(tf[1], [0.6, 0.8], rtol=1e-6)  # (3, 4) / 5
    assert list(ids) == [7, 9]
    np.testing.assert_allclose(scores, [t7 @ [0.6, 0.8]], rtol=1e-6)


def test_pooling_by_hand_without_detector_score_or_with_normalised_images():
    # D0: still (2, 0), video mean (0, 2): template 7 = (2, 2)
    scores, _, _ = _scores_of(FEATS, TEMPLATES, MEDIAS, PAIR)
    np.testing.assert_allclose(scores, [(0.6 + 0.8) / np.sqrt(2)], rtol=1e-6)
    # N0 D1: still (1, 0) * 0.5; frames (0, 1) * (1, 0.5, 1), mean (0, 2.5/3): template 7 = (0.5, 2.5/3)
    scores, _, _ = _scores_of(FEATS, TEMPLATES, MEDIAS, PAIR, scores=DETECTOR, norm_score=False)
    np.testing.assert_allclose(scores, [(0.5 * 0.6 + 2.5 / 3 * 0.8) / np.hypot(0.5, 2.5 / 3)], rtol=1e-6)


def test_pooling_leaves_out_invalid_images_and_an_empty_template_scores_zero():
    valid = np.array([True, True, False, True, False])  # one frame and template 9's only image missing
    scores, _, tf = _scores_of(FEATS, TEMPLATES, MEDIAS, PAIR, valid=valid)
    np.testing.assert_allclose(tf[0], np.array([2.0, 2.5]) / np.hypot(2.0, 2.5), rtol=1e-6)  # video: mean(3, 2)
    assert not tf[1].any() and scores[0] == 0.0


def test_pooling_refuses_nan_and_unnormalisable_zero_features():
    with pytest.raises(distill.eval.ijb.EvaluationError, match="image 2 contains NaN"):
        template_features(np.array([[1, 0], [0, 1], [np.nan, 0]], np.float32), [1, 1, 2], [1, 2, 3])
    with pytest.raises(distill.eval.ijb.EvaluationError, match="all zeros"):
        template_features(np.array([[1, 0], [0, 0]], np.float32), [1, 2], [1, 2], norm_score=False)


# --------------------------------------------------------------------------- ROC and TAR@FAR


def test_roc_curve_as_sklearn_on_its_documented_example_and_on_ties():
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert roc_auc(fpr, tpr) == 0.75
    fpr, tpr, thr = roc_curve([1, 0, 1, 0, 1, 0], [0.9, 0.9, 0.5, 0.5, 0.5, 0.1])  # tied scores are one point
    np.testing.assert_allclose(fpr, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])


def test_roc_drops_only_points_on_straight_stretches():
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.2
    scores = np.round(rng.normal(size=3000) + labels, 1)  # many ties
    fpr, tpr, thr = roc_curve(labels, scores)
    # the full curve: one point per distinct score
    full_thr = np.unique(scores)[::-1]
    full_tpr = np.array([(scores[labels] >= t).mean() for t in full_thr])
    full_fpr = np.array([(scores[~labels] >= t).mean() for t in full_thr])
    kept = np.searchsorted(-full_thr, -thr[1:])
    np.testing.assert_allclose(fpr[1:], full_fpr[kept])
    np.testing.assert_allclose(tpr[1:], full_tpr[kept])
    assert len(thr) < len(full_thr)  # straight stretches were dropped ...
    full_auc = roc_auc(np.r_[0, full_fpr], np.r_[0, full_tpr])
    assert roc_auc(fpr, tpr) == pytest.approx(full_auc, abs=1e-12)  # ... without changing the area


def test_tar_is_read_at_the_nearest_fpr_and_the_higher_point_on_a_tie():
    # 4 genuine, 1000 impostor pairs, by score: G G I G I*9 G I*990. The ROC's corners:
    # fpr 0, 0, 0, .001, .001, .01, .01, 1 and tpr 0, .25, .5, .5, .75, .75, 1, 1
    scores = np.r_[1.0, 0.99, 0.98, 0.97, np.linspace(0.96, 0.88, 9), 0.5, np.linspace(0.4, 0.0, 990)]
    labels = np.r_[1, 1, 0, 1, np.zeros(9), 1, np.zeros(990)]
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.001, 0.001, 0.01, 0.01, 1])
    np.testing.assert_allclose(tpr, [0, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1])
    tars = tar_at_fars_roc(fpr, tpr)
    assert list(tars) == FAR_KEYS == [far_key(f) for f in IJB_FARS]
    # 1e-6 .. 1e-4 are nearest fpr 0 (best of its points: .5); 1e-3 and 1e-2 hit two points each, the higher
    # wins; 0.1 is nearer 0.01 than 1
    assert tars == {"1e-6": 0.5, "1e-5": 0.5, "1e-4": 0.5, "1e-3": 0.75, "1e-2": 1.0, "1e-1": 1.0}
    assert roc_auc(fpr, tpr) == pytest.approx(0.001 * 0.5 + 0.009 * 0.75 + 0.99)


def test_roc_needs_both_kinds_of_pairs_and_finite_scores():
    with pytest.raises(distill.eval.ijb.EvaluationError, match="no impostor"):
        roc_curve([1, 1], [0.5, 0.2])
    with pytest.raises(distill.eval.ijb.EvaluationError, match="NaN"):
        roc_curve([1, 0], [np.nan, 0.2])


# --------------------------------------------------------------------------- the synthetic set, end to end


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ijb") / "synth"
    write_synthetic_ijb(root, templates=20, seed=3)
    return root


@pytest.fixture
def ijb_copy(ijb_root, tmp_path):
    """A copy of the synthetic set a test may damage."""
    return shutil.copytree(ijb_root, tmp_path / "ijb")


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    folder = tmp_path_factory.mktemp("students")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("vargfacenet", input_size=32, multiplier=0.25, last_channels=32, units=(1, 1, 1),
                             embedding_size=16)
        (folder / f"s{seed}").mkdir()
        save_student(folder / f"s{seed}" / "student.pt", model, "vargfacenet")
        paths.append(str(folder / f"s{seed}" / "student.pt"))
    return paths


def _ijb(capsys, *argv):
    code = main(["ijb", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv) -> dict:
    code, out, err = _ijb(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_synthetic_set_is_deterministic_and_in_insightface_layout(ijb_root, tmp_path):
    again = tmp_path / "again"
    manifest = write_synthetic_ijb(again, templates=20, seed=3)
    for name in ("meta/ijbc_name_5pts_score.txt", "meta/ijbc_face_tid_mid.txt", "meta/ijbc_template_pair_label.txt",
                 "loose_crop/1.jpg", f"loose_crop/{manifest['images']}.jpg"):
        assert (again / name).read_bytes() == (ijb_root / name).read_bytes(), name
    meta = read_ijb_meta(ijb_root)
    assert len(meta.names) == manifest["images"] and len(meta.pairs) == 20 * 19 // 2
    assert meta.labels.sum() == 10 and ((meta.scores > 0.5) & (meta.scores <= 1)).all()
    assert np.unique(meta.templates).size == 20 and np.unique(meta.medias).size == manifest["medias"]
    assert any(np.bincount(meta.medias)[m] > 1 for m in meta.medias)  # videos: several frames per media
    # the landmarks describe a face: after the similarity, each lies within a few pixels of the ArcFace template
    for i in range(0, len(meta.names), 7):
        m = estimate_similarity(meta.landmarks[i], ARCFACE_TEMPLATE)
        moved = meta.landmarks[i] @ m[:, :2].T + m[:, 2]
        assert np.abs(moved - ARCFACE_TEMPLATE).max() < 12, (meta.names[i], moved)
    assert IDENTITY_OFFSET >= 10 ** 6  # far from the identities distill data synth trains on


def test_cli_synth_ijb_writes_the_set_once(tmp_path, capsys):
    assert main(["data", "synth-ijb", str(tmp_path / "s"), "--templates", "4", "--seed", "1", "--target", "ijbb"]) == 0
    assert "4 templates of 2 people, 6 template pairs (2 genuine)" in capsys.readouterr().out
    assert (tmp_path / "s" / "meta" / "ijbb_template_pair_label.txt").is_file()
    assert main(["data", "synth-ijb", str(tmp_path / "s"), "--templates", "4", "--seed", "1", "--target", "IJBB"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_distill_ijb_end_to_end_json_cache_and_features(ijb_root, students, tmp_path, capsys, monkeypatch):
    cache, scores_path = tmp_path / "feats.npy", tmp_path / "scores.npy"
    first = _json(capsys, students[0], "--root", ijb_root, "--workers", "2", "--cache", cache, "--scores", scores_path)
    assert set(first["tar_at_far"]) == set(FAR_KEYS)
    assert all(0.0 <= v <= 1.0 for v in first["tar_at_far"].values()) and 0.0 <= first["auc"] <= 1.0
    meta = read_ijb_meta(ijb_root)
    assert (first["images"], first["templates"], first["pairs"]) == (len(meta.names), 20, 190)
    assert first["mode"] == "N1 D1 F2" and first["missing_images"] == 0
    scores = np.load(scores_path)
    assert scores.shape == (190,) and np.isfinite(scores).all()
    assert np.load(cache).shape[0] == len(meta.names) and (tmp_path / "feats.npy.json").is_file()

    # the cache is reused: nothing is embedded again, the numbers are the same
    monkeypatch.setattr(distill.eval.ijb, "embed_images", lambda *a, **k: pytest.fail("embedded again"))
    # (distill.cli.ijb may import it inside the function that uses it: then the line above covers it)
    monkeypatch.setattr("distill.cli.ijb.embed_images", lambda *a, **k: pytest.fail("embedded again"), raising=False)
    assert _json(capsys, students[0], "--root", ijb_root, "--cache", cache) == first
    # the cached features scored as external features give the same numbers
    external = _json(capsys, "--features", cache, "--root", ijb_root, "--scores", tmp_path / "ext.npy")
    assert external.pop("mode") == "N1 D1" and external == {k: v for k, v in first.items() if k != "mode"}
    np.testing.assert_array_equal(np.load(tmp_path / "ext.npy"), scores)
    # a cache made with flip is not used for --no-flip
    code, _, err = _ijb(capsys, students[0], "--root", ijb_root, "--cache", cache, "--no-flip")
    assert code == 2 and "flip: cached True, now False" in err


def test_a_small_set_is_aligned_once_a_process_for_every_next_model(ijb_root, students, monkeypatch):
    from distill.data.ijb import AlignedFaces
    from distill.models.files import load_student

    meta = read_ijb_meta(ijb_root)
    models = [load_student(p)[0].eval() for p in students]
    monkeypatch.setattr(distill.eval.ijb, "_aligned", {})
    first = [distill.eval.ijb.embed_images(m, meta, 32, workers=0, progress=False) for m in models]
    assert not np.array_equal(first[0], first[1])
    # another model on the same set: no image is read again, and the features are those of a fresh read
    monkeypatch.setattr(AlignedFaces, "__getitem__", lambda *a: pytest.fail("read again"))
    again = [distill.eval.ijb.embed_images(m, meta, 32, workers=0, progress=False) for m in models]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # another size (or root, selection, landmarks) is not the kept set; nor is a set over the byte limit
    with pytest.raises(pytest.fail.Exception, match="read again"):
        distill.eval.ijb.embed_images(models[0], meta, 24, workers=0, progress=False)
    monkeypatch.setattr(distill.eval.ijb, "_KEEP_ALIGNED_BYTES", 1)
    monkeypatch.setattr(distill.eval.ijb, "_aligned", {})
    with pytest.raises(pytest.fail.Exception, match="read again"):
        distill.eval.ijb.embed_images(models[0], meta, 32, workers=0, progress=False)


def test_flags_change_the_numbers_as_documented(ijb_root, ijb_copy, students, tmp_path, capsys):
    feats = tmp_path / "f.npy"
    _json(capsys, students[0], "--root", ijb_root, "--workers", "0", "--cache", feats)

    def scores(root, *flags, results=None):
        out = tmp_path / "s.npy"
        result = _json(capsys, "--features", feats, "--root", root, "--scores", out, *flags)
        if results is not None:
            results.append((result["tar_at_far"], result["auc"]))
        return np.load(out)

    base = scores(ijb_root)
    assert not np.allclose(scores(ijb_root, "--no-detector-score"), base)  # the synthetic scores differ per image
    assert not np.allclose(scores(ijb_root, "--no-norm-score"), base)
    # with one detector score for every image, weighting by it changes nothing (templates are normalised)
    path = ijb_copy / "meta" / "ijbc_name_5pts_score.txt"
    path.write_text("".join(line.rsplit(" ", 1)[0] + " 0.9\n" for line in path.read_text().splitlines()))
    results = []
    # equal up to float32 rounding (features are pooled in float32, as eval_ijbc.py pools them)
    np.testing.assert_allclose(scores(ijb_copy, "--no-detector-score", results=results),
                               scores(ijb_copy, results=results), rtol=0, atol=1e-6)
    assert results[0] == results[1]
    # without the flip the features are the image's alone
    no_flip = _json(capsys, students[0], "--root", ijb_root, "--workers", "0", "--no-flip",
                    "--cache", tmp_path / "noflip.npy")
    assert no_flip["mode"] == "N1 D1 F0"
    assert not np.allclose(np.load(tmp_path / "noflip.npy"), np.load(feats))


def test_table_plot_and_several_models(ijb_root, students, tmp_path, capsys):
    code, out, err = _ijb(capsys, *students, "--root", ijb_root, "--workers", "0", "--plot", tmp_path / "roc.png",
                          "--scores", tmp_path / "scores.npy")
    assert code == 0, err
    assert "IJBC 1:1 verification, N1 D1 F2" in out and "TAR@FAR=1e-6 (%)" in out and "AUC (%)" in out
    assert "s0-student " in out and "s1-student " in out  # both are student.pt: named by their folders
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "scores.s0-student.npy").shape == (190,)
    assert not np.array_equal(np.load(tmp_path / "scores.s0-student.npy"), np.load(tmp_path / "scores.s1-student.npy"))
    both = _json(capsys, *students, "--root", ijb_root, "--workers", "0")
    assert list(both) == students and all(set(r["tar_at_far"]) == set(FAR_KEYS) for r in both.values())


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _fails(capsys, *argv) -> str:
    code, _, err = _ijb(capsys, *argv)
    assert code == 2, err
    assert err.startswith("distill ijb: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_meta_file_is_named(ijb_copy, capsys):
    (ijb_copy / "meta" / "ijbc_template_pair_label.txt").unlink()
    assert "ijbc_template_pair_label.txt: the template pair file not found" in _fails(
        capsys, "--features", "x.npy", "--root", ijb_copy)
    assert "ijbb_name_5pts_score.txt: the landmark file not found" in _fails(
        capsys, "--features", "x.npy", "--root", ijb_copy, "--target", "ijbb")


def test_missing_image_is_named_or_skipped_and_counted(ijb_copy, students, capsys):
    (ijb_copy / "loose_crop" / "5.jpg").unlink()
    err = _fails(capsys, students[0], "--root", ijb_copy, "--workers", "0")
    assert "1 of" in err and "are missing (first: 5.jpg)" in err and "--skip-missing" in err
    result = _json(capsys, students[0], "--root", ijb_copy, "--workers", "0", "--skip-missing")
    assert result["missing_images"] == 1 and np.isfinite(result["auc"])


def test_landmark_line_with_wrong_count_names_file_and_line(ijb_copy, capsys):
    path = ijb_copy / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    tokens = lines[2].split()
    lines[2] = " ".join(tokens[:5] + tokens[6:])  # one coordinate short
    path.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, "--features", "x.npy", "--root", ijb_copy)
    assert "ijbc_name_5pts_score.txt:3: 10 values after the image name; expected 11" in err


def test_pair_naming_an_unknown_template_names_it(ijb_copy, capsys):
    path = ijb_copy / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "99999 1 0\n")
    err = _fails(capsys, "--features", "x.npy", "--root", ijb_copy)
    assert "ijbc_template_pair_label.txt:191: template 99999 is not in" in err


def test_degenerate_landmarks_are_named(ijb_copy, capsys):
    path = ijb_copy / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[0] = " ".join([lines[0].split()[0]] + ["50.0"] * 10 + ["0.9"])
    path.write_text("\n".join(lines) + "\n")
    err = _fails(capsys, "--features", "x.npy", "--root", ijb_copy)
    assert "ijbc_name_5pts_score.txt:1: image 1.jpg has 5 landmarks at one point" in err


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_unreadable_image_is_named(ijb_copy, students, capsys, damage):
    image = ijb_copy / "loose_crop" / "4.jpg"
    image.write_bytes(b"not an image at all" if damage == "text" else image.read_bytes()[:400])
    err = _fails(capsys, students[0], "--root", ijb_copy, "--workers", "0")
    assert "loose_crop/4.jpg: cannot decode image" in err and "replace it from the IJB download" in err


def test_bad_features_and_arguments(ijb_root, tmp_path, capsys):
    np.save(tmp_path / "short.npy", np.ones((3, 8), np.float32))
    assert "array of shape (3, 8)" in _fails(capsys, "--features", tmp_path / "short.npy", "--root", ijb_root)
    assert "nothing to evaluate" in _fails(capsys, "--root", ijb_root)
    assert "--cache stores" in _fails(capsys, "--features", tmp_path / "short.npy", "--root", ijb_root,
                                      "--cache", tmp_path / "c.npy")
    assert "IJB folder not found" in _fails(capsys, "--features", "x.npy", "--root", tmp_path / "nowhere")


def test_an_onnx_model_scores_like_the_student_it_was_exported_from(ijb_root, students, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from distill.deploy.export import export_onnx
    from distill.models.files import load_model

    model, size = load_model(students[0])
    onnx_path = export_onnx(model, tmp_path / "student.onnx", size)
    _json(capsys, students[0], "--root", ijb_root, "--workers", "0", "--cache", tmp_path / "torch.npy")
    from_onnx = _json(capsys, onnx_path, "--root", ijb_root, "--workers", "0", "--cache", tmp_path / "onnx.npy")
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), np.load(tmp_path / "torch.npy"), rtol=1e-4, atol=1e-5)
    assert from_onnx["mode"] == "N1 D1 F2" and set(from_onnx["tar_at_far"]) == set(FAR_KEYS)


# --------------------------------------------------------------------------- benchmarks/bench_ijb.py


def test_bench_ijb_json_quick_measures_the_set_it_read(ijb_root, students, capsys):
    """bench_ijb.py --json in this process: every image of the set is decoded, run through the
    model and embedded end to end, and the ratio is the documented one; bad arguments are refused by name."""
    import importlib.util

    from conftest import REPO
    spec = importlib.util.spec_from_file_location("bench_ijb", REPO / "benchmarks" / "bench_ijb.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--student", students[0], "--root", str(ijb_root), "--threads", "1", "--workers", "0",
                           "--batch-size", "16", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == len(read_ijb_meta(ijb_root, "IJBC").names)
    assert result["threads"] == 1 and result["workers"] == 0 and result["input_size"] == 32
    for what in ("decode", "model", "embed"):
        assert result[f"{what}_s"] > 0
        assert result[f"{what}_img_s"] == pytest.approx(result["images"] / result[f"{what}_s"])
    assert result["ratio"] == pytest.approx(result["embed_s"] / (result["decode_s"] + 2 * result["model_s"]))
    for argv, key in ((["--threads", "0"], "--threads: must be at least 1, got 0"),
                      (["--workers", "-1"], "--workers: must be at least 0, got -1"),
                      (["--student", "missing.pt"], "missing.pt")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert key in capsys.readouterr().err
