"""Verification metrics reproduce insightface's numbers; embedding, NaN handling and `distill eval` work."""

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

import distill.eval.verification as evaluate
from distill.cli import main
from distill.eval.verification import (
    THRESHOLDS,
    EvaluationError,
    embed_pairs,
    evaluate_sets,
    tar_at_far_pairs,
    verification_metrics,
)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_eval", REPO / "benchmarks" / "bench_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the protocol


def test_reproduces_insightface_numbers_on_fixture(fixtures):
    case = np.load(fixtures / "verification_protocol" / "case_3000_pairs.npz")
    m = verification_metrics(case["emb_orig"], case["emb_flip"], case["issame"])
    assert abs(m["acc_mean"] - float(case["acc_mean"])) < 1e-9
    assert abs(m["acc_std"] - float(case["acc_std"])) < 1e-9
    assert m["xnorm"] == pytest.approx(float(case["xnorm"]), rel=1e-4)
    assert m["pairs"] == 3000 and m["folds"] == 10
    assert 0.0 <= m["threshold"] < 4.0
    negatives = int((~case["issame"]).sum())
    assert m["tar_at_far"]["1e-3"]["negatives"] == negatives
    assert m["tar_at_far"]["1e-3"]["tar"] is not None and m["tar_at_far"]["1e-3"]["far"] <= 1e-3
    assert m["tar_at_far"]["1e-4"]["tar"] is None  # 1,487 impostor pairs cannot measure 1e-4


def test_perfectly_separable_pairs_give_accuracy_one():
    # genuine pairs: identical one-hot vectors (distance exactly 0); impostors: different one-hots (exactly 2)
    n, dim = 20, 64
    issame = np.arange(n) % 2 == 0
    emb = np.zeros((2 * n, dim), dtype=np.float32)
    for k in range(n):
        emb[2 * k, k] = 3.0
        emb[2 * k + 1, k if issame[k] else k + n] = 3.0
    m = verification_metrics(emb, emb.copy(), issame)
    assert m["acc_mean"] == 1.0 and m["acc_std"] == 0.0
    # distance 0 is not < 0.00, so the first threshold that accepts every genuine pair is 0.01
    assert m["threshold"] == pytest.approx(0.01)
    assert m["xnorm"] == pytest.approx(3.0)


def test_matches_loop_reference_with_uneven_folds_and_distances_on_thresholds(monkeypatch):
    """1,003 pairs: sklearn's KFold gives the first 3 folds 101 pairs, the rest 100. A third of the
    distances sit exactly on a threshold or one float step either side of it, where a vectorised
    comparison that rounds differently from `dist < threshold` would miscount."""
    rng = np.random.default_rng(3)
    n = 1003
    issame = rng.random(n) < 0.5
    dist = np.clip(np.where(issame, rng.normal(0.9, 0.35, n), rng.normal(1.6, 0.35, n)), 0, 3.99)
    on_grid = rng.choice(n, n // 3, replace=False)
    dist[on_grid] = THRESHOLDS[np.round(dist[on_grid] * 100).astype(int)]
    dist[on_grid[::3]] = np.nextafter(dist[on_grid[::3]], 0)
    dist[on_grid[1::3]] = np.nextafter(dist[on_grid[1::3]], 4)

    monkeypatch.setattr(evaluate, "pair_distances", lambda a, b: dist)
    emb = np.ones((2 * n, 4), dtype=np.float32)
    m = verification_metrics(emb, emb, issame)
    ref_acc, ref_thr = _bench_module().reference_accuracies(dist, issame)
    assert 0.7 < m["acc_mean"] < 0.99  # a real threshold choice, not a trivial one
    assert m["acc_mean"] == float(np.mean(ref_acc))
    assert m["acc_std"] == float(np.std(ref_acc))
    assert m["threshold"] == float(np.mean(ref_thr))


def test_tar_at_far_on_a_constructed_roc():
    # 2,000 impostors at 1.000, 1.001, ...: FAR 1e-3 allows 2 false accepts, so the threshold is the
    # third impostor distance (1.002) and exactly 2 impostors (1.000, 1.001) are accepted.
    neg = 1.0 + 0.001 * np.arange(2000)
    # 100 genuine pairs: 40 clearly below, 1 exactly at the threshold (rejected: dist < threshold), 59 above
    pos = np.concatenate([np.linspace(0.2, 0.9, 40), [neg[2]], np.linspace(1.1, 2.0, 59)])
    dist = np.concatenate([neg, pos])
    issame = np.concatenate([np.zeros(neg.size, bool), np.ones(pos.size, bool)])
    r = tar_at_far_pairs(dist, issame, 1e-3)
    assert r == {"tar": 0.40, "far": 0.001, "threshold": neg[2], "negatives": 2000}
    # at FAR 1e-2, 20 false accepts: threshold 1.020 now admits the genuine pair at 1.002 too
    assert tar_at_far_pairs(dist, issame, 1e-2) == {"tar": 0.41, "far": 0.01, "threshold": neg[20], "negatives": 2000}


def test_tar_at_far_is_none_with_fewer_than_one_over_far_negatives():
    dist = np.linspace(0, 3, 1999)
    issame = np.arange(1999) < 1000  # 999 impostor pairs
    assert tar_at_far_pairs(dist, issame, 1e-3) == {"tar": None, "far": None, "threshold": None, "negatives": 999}
    issame = np.arange(1999) < 999  # exactly 1,000 impostors: one false accept allowed, measurable
    r = tar_at_far_pairs(dist, issame, 1e-3)
    assert r["negatives"] == 1000 and r["tar"] == 1.0 and r["far"] == 0.001


def test_nan_embeddings_are_an_error_not_an_accuracy():
    emb = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    emb[7, 3] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        verification_metrics(emb, emb, np.ones(20, bool))


# --------------------------------------------------------------------------- embedding


class PixelProbe(nn.Module):
    """Embedding = per-channel mean, then (left half - right half) of channel 0; records how it was run."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), tuple(x.shape)))
        w = x.shape[3] // 2
        side = x[:, 0, :, :w].mean(dim=(1, 2)) - x[:, 0, :, w:].mean(dim=(1, 2))
        return self.scale * torch.cat([x.mean(dim=(2, 3)), side[:, None]], dim=1)


def test_embed_pairs_normalises_flips_and_restores_train_mode():
    img = np.full((16, 16, 3), 51, np.uint8)  # (51/255 - 0.5)/0.5 = -0.6
    img[:, :8, 0] = 255  # channel 0: left half +1.0, right half -0.6
    images = [img] * 6
    model = PixelProbe().train()
    orig, flip = embed_pairs(model, images, 16, batch_size=4, progress=False)
    assert orig.shape == flip.shape == (6, 4) and orig.dtype == np.float32
    np.testing.assert_allclose(orig[:, 1:3], -0.6, atol=1e-6)
    np.testing.assert_allclose(orig[:, 0], (1.0 - 0.6) / 2, atol=1e-6)
    np.testing.assert_allclose(orig[:, 3], 1.6, atol=1e-6)
    np.testing.assert_allclose(flip[:, 3], -1.6, atol=1e-6)  # the flip is horizontal
    np.testing.assert_allclose(flip[:, :3], orig[:, :3], atol=1e-6)
    assert model.training  # restored
    assert {c[:2] for c in model.calls} == {(False, False)}  # eval mode, no gradients
    assert [c[2][0] for c in model.calls] == [4, 4, 2, 2]  # batches of 4, orig then flip


def test_embed_pairs_resizes_short_side_and_centre_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :20, 0] = 255  # red | green | blue thirds... the centre 40 columns are green
    img[:, 20:60, 1] = 255
    img[:, 60:, 2] = 255
    model = PixelProbe()
    orig, _ = embed_pairs(model, [img, np.full((20, 20, 3), 255, np.uint8)], 20, progress=False)
    assert model.calls[0][2] == (2, 3, 20, 20)
    # 40x80 -> 20x40, centre crop 20x20 keeps the green middle (bicubic rings a little at its edges)
    assert orig[0, 1] > 0.9 and orig[0, 0] < -0.9 and orig[0, 2] < -0.9
    np.testing.assert_allclose(orig[1, :3], 1.0, atol=1e-6)


def test_embed_pairs_names_model_and_set_when_embeddings_are_nan():
    class Broken(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))

    images = [np.zeros((8, 8, 3), np.uint8)] * 20
    with pytest.raises(EvaluationError, match=r"model r100-diverged .*NaN.* of lfw"):
        evaluate_sets(Broken(), {"lfw": (images, np.ones(10, bool))}, 8, progress=False,
                      model_name="r100-diverged")


# --------------------------------------------------------------------------- distill eval


@pytest.fixture
def tiny_student(tmp_path):
    from distill.models.files import save_student
    from distill.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("vargfacenet", input_size=32, multiplier=0.25, last_channels=32, units=(1, 1, 1),
                           embedding_size=16)
    path = tmp_path / "student.pt"
    save_student(path, model, "vargfacenet")
    return path


def _row(table: str, name: str) -> list:
    line = next(line for line in table.splitlines() if line.startswith(name + " "))
    return re.split(r"\s{2,}", line.strip())


def test_distill_eval_table_and_json_agree(tiny_student, fixtures, capsys):
    bin_path = str(fixtures / "verification_bin" / "py3.bin")
    assert main(["eval", str(tiny_student), "--bin", bin_path, "--json", "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["py3"]
    m = results["py3"]
    assert m["pairs"] == 21 and 0.0 <= m["acc_mean"] <= 1.0 and m["xnorm"] > 0
    assert m["tar_at_far"]["1e-3"] == {"tar": None, "far": None, "threshold": None,
                                       "negatives": m["tar_at_far"]["1e-3"]["negatives"]}

    assert main(["eval", str(tiny_student), "--bin", bin_path, "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "TAR@FAR=1e-3" in table and "TAR@FAR=1e-4" in table
    assert "VAL@FAR=1e-3, insightface (%)" in table and "its calculate_val (10 folds" in table
    name, acc, threshold, xnorm, tar3, tar4, val = _row(table, "py3")
    v = m["insightface_val"]
    assert val == f"{100 * v['val_mean']:.3f} ± {100 * v['val_std']:.3f} (FAR {v['far_mean']:.2g})"
    assert acc == f"{100 * m['acc_mean']:.3f} ± {100 * m['acc_std']:.3f}"
    assert float(threshold) == pytest.approx(m["threshold"], abs=5e-4)
    assert float(xnorm) == pytest.approx(m["xnorm"], abs=5e-5)
    assert tar3 == tar4 == "n/a"


def test_distill_eval_asks_for_input_size_when_unknown(tiny_student, fixtures, monkeypatch, capsys):
    import distill.models.files

    monkeypatch.setattr(distill.models.files, "load_model", lambda *a, **k: (PixelProbe(), None))
    bin_path = str(fixtures / "verification_bin" / "py3.bin")
    assert main(["eval", "some-model", "--bin", bin_path]) == 2
    assert "--input-size" in capsys.readouterr().err


def test_distill_eval_refuses_two_sets_with_one_name(tiny_student, fixtures, tmp_path, capsys):
    other = tmp_path / "py3.bin"
    other.write_bytes((fixtures / "verification_bin" / "py3.bin").read_bytes())
    code = main(["eval", str(tiny_student), "--bin", str(fixtures / "verification_bin" / "py3.bin"),
                 "--bin", str(other)])
    assert code == 2 and "named 'py3'" in capsys.readouterr().err


def test_distill_eval_refuses_a_malicious_bin_without_running_it(tiny_student, fixtures, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(tmp_path)  # the payload would `touch PWNED_BY_PICKLE` in the working directory
    assert main(["eval", str(tiny_student), "--bin", str(fixtures / "verification_bin" / "evil.bin")]) == 2
    assert "evil.bin" in capsys.readouterr().err
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


# --------------------------------------------------------------------------- insightface's calculate_val


def test_insightface_val_on_a_hand_worked_case():
    """10 folds of 10 pairs (5 genuine, 5 impostor); one impostor, in fold 0, lies exactly on grid threshold
    g = VAL_THRESHOLDS[1500], the others 0.3 or more above it.
    Folds 1-9: their training split holds that impostor (1 of 45), so the FAR is 0 at g (dist < g is false) and
    1/45 one grid step later: the interpolated threshold is g + 1e-3 * 45 * step = g + 0.000045. Their genuine
    pairs at g + 0.00004 are accepted, at g + 0.00005 rejected: VAL 4/5; no impostor accepted.
    Fold 0: its training split's nearest impostors (9 of 45) are at g + 0.3, so the threshold lies above every
    genuine pair (VAL 1) and above its own impostor at g (FAR 1/5).
    VAL mean (1 + 9 x 0.8) / 10 = 0.82, std sqrt((1 + 9 x 0.64) / 10 - 0.82^2) = 0.06, FAR mean 0.2 / 10."""
    from distill.eval.verification import VAL_THRESHOLDS, insightface_val

    g, step = VAL_THRESHOLDS[1500], VAL_THRESHOLDS[1501] - VAL_THRESHOLDS[1500]
    dist, issame = [], []
    for fold in range(10):
        genuine = [1.0, 1.0, 1.0, g + 0.00004, g + 0.00005]
        impostor = [g if fold == 0 else g + 0.3, g + 0.5, g + 0.6, g + 0.7, g + 0.8]
        dist += genuine + impostor
        issame += [True] * 5 + [False] * 5
    assert g + 0.00004 < g + 1e-3 * 45 * step < g + 0.00005  # the case is built around that threshold
    m = insightface_val(np.array(dist), np.array(issame))
    assert m["val_mean"] == pytest.approx(0.82) and m["val_std"] == pytest.approx(0.06)
    assert m["far_mean"] == pytest.approx(0.02)
    # a FAR no training split reaches (above 100%): insightface's threshold 0.0, nothing accepted
    never = insightface_val(np.array(dist), np.array(issame), far_target=1.5)
    assert never["val_mean"] == 0.0 and never["far_mean"] == 0.0


def test_insightface_val_matches_its_loop_on_random_pairs():
    """insightface's calculate_val written as it is (a loop over 4,000 thresholds per fold, interpolation
    between the last threshold below the target FAR and the first at or above it) on 1,003 random pairs."""
    from distill.eval.verification import N_FOLDS, VAL_THRESHOLDS, _fold_sizes, insightface_val

    rng = np.random.default_rng(3)
    issame = rng.random(1003) < 0.5
    dist = np.where(issame, rng.normal(0.9, 0.25, 1003), rng.normal(1.6, 0.2, 1003)).clip(0, 3.99)
    bounds = np.concatenate([[0], np.cumsum(_fold_sizes(1003, N_FOLDS))])
    vals, fars = [], []
    for f in range(N_FOLDS):
        test = np.zeros(1003, bool)
        test[bounds[f]:bounds[f + 1]] = True
        train_neg = dist[~test & ~issame]
        far_train = np.array([np.sum(train_neg < t) / train_neg.size for t in VAL_THRESHOLDS])
        hi = next(i for i, v in enumerate(far_train) if v >= 1e-3)
        lo = hi - 1
        thr = VAL_THRESHOLDS[lo] + (1e-3 - far_train[lo]) / (far_train[hi] - far_train[lo]) \
            * (VAL_THRESHOLDS[hi] - VAL_THRESHOLDS[lo])
        acc = dist[test] < thr
        vals.append(np.sum(acc & issame[test]) / np.sum(issame[test]))
        fars.append(np.sum(acc & ~issame[test]) / np.sum(~issame[test]))
    m = insightface_val(dist, issame)
    assert m["val_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
    assert m["val_std"] == pytest.approx(np.std(vals), abs=1e-12)
    assert m["far_mean"] == pytest.approx(np.mean(fars), abs=1e-12)
    assert 0.0 < m["val_mean"] < 1.0
