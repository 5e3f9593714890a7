"""P×K identity sampling (data.images_per_id = K): the epoch plan, the datasets' labels, the engine, the config."""

import io
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tiny import TinyFaces, tiny_config
from tiny_experiment import tiny_experiment

import teachers
from distill.cli import main
from distill.data import ImageFolderDataset, RecordIODataset, write_insightface_rec
from distill.train.engine import Preempted, StageSpec, run_stage
from distill.train.epoch_plan import plan_epoch, plan_identity_epoch
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import CheckpointError, ConfigError

# 9 identities of uneven sizes, 3 of them smaller than K = 4; 40 images, a multiple of the batch (8)
SIZES = [1, 3, 5, 8, 2, 9, 4, 1, 7]
LABELS = np.repeat(np.arange(len(SIZES)) * 10 + 3, SIZES)  # ids need not be 0..n-1
SHUFFLED = np.random.default_rng(5).permutation(LABELS)  # nor images sorted by identity


def _indices(plan):
    return [i for batch in plan for i, _ in batch]


def _groups(plan, k):
    """Every batch cut into its groups of k (as label lists)."""
    return [[SHUFFLED[[i for i, _ in batch[g:g + k]]].tolist() for g in range(0, len(batch), k)] for batch in plan]


@pytest.mark.parametrize("k,batch", [(4, 8), (2, 4), (4, 4), (2, 8)])
def test_every_image_exactly_once_per_epoch(k, batch):
    for seed, epoch in [(0, 0), (0, 1), (3, 7)]:
        plan = plan_identity_epoch(SHUFFLED, batch, k, seed, epoch, flip=True)
        assert len(plan) == len(SHUFFLED) // batch and all(len(b) == batch for b in plan)
        assert sorted(_indices(plan)) == list(range(len(SHUFFLED)))


def test_dropped_images_are_fewer_than_a_global_batch_and_the_count_matches_plan_epoch():
    rng = np.random.default_rng(0)
    for trial in range(30):
        labels = rng.integers(0, rng.integers(1, 40), rng.integers(0, 300))
        k = int(rng.choice([2, 3, 4, 5]))
        batch, world = k * int(rng.integers(1, 6)), int(rng.integers(1, 4))
        plans = [plan_identity_epoch(labels, batch, k, trial, 0, True, r, world) for r in range(world)]
        seen = [i for p in plans for i in _indices(p)]
        assert len(seen) == len(set(seen))  # no image twice
        assert len(labels) - len(seen) < batch * world
        assert all(len(p) == len(plan_epoch(len(labels), batch, trial, 0, True, r, world)) for r, p in enumerate(plans))


def test_each_batch_is_p_groups_of_k_and_leftovers_are_merged_as_documented():
    k, batch = 4, 8
    sizes = dict(zip(np.arange(len(SIZES)) * 10 + 3, SIZES, strict=True))
    pure, merged = Counter(), []
    for groups in _groups(plan_identity_epoch(SHUFFLED, batch, k, 0, 0, flip=False), k):
        assert len(groups) == batch // k and all(len(g) == k for g in groups)
        for g in groups:
            if len(set(g)) == 1:
                pure[g[0]] += 1
            else:
                merged.append(g)
    # an identity of c images gives c // K groups of its own; the rest (c % K) goes to merged groups
    assert pure == Counter({a: c // k for a, c in sizes.items() if c // k})
    assert len(merged) == sum(c % k for c in sizes.values()) // k
    runs = Counter()
    for g in merged:  # runs of >= 2 identities, each contiguous, shorter than K, of an identity with a leftover
        starts = [i for i in range(k) if i == 0 or g[i] != g[i - 1]]
        assert len(starts) >= 2 and len(starts) == len(set(g))
        for a in set(g):
            assert g.count(a) < k and sizes[a] % k
            runs[a] += 1
    assert all(n <= 2 for n in runs.values())  # an identity's leftovers lie in at most two merged groups
    # identities of fewer than K images take part (here nothing is dropped)
    assert {a for a, c in sizes.items() if c < k} <= {a for g in merged for a in g}


def test_identities_with_multiples_of_k_images_give_pure_groups_only():
    labels = np.repeat(np.arange(10), np.arange(1, 11) * 2)  # 110 images, every identity a multiple of 2
    plan = plan_identity_epoch(labels, 10, 2, 1, 0, flip=True)
    assert len(plan) == 11
    for batch in plan:
        ids = labels[[i for i, _ in batch]]
        assert (ids[0::2] == ids[1::2]).all()


def test_deterministic_for_seed_and_epoch_and_different_across_epochs():
    a = plan_identity_epoch(SHUFFLED, 8, 4, 0, 1, flip=True)
    assert a == plan_identity_epoch(SHUFFLED.copy(), 8, 4, 0, 1, flip=True)
    assert a != plan_identity_epoch(SHUFFLED, 8, 4, 0, 2, flip=True)
    assert a != plan_identity_epoch(SHUFFLED, 8, 4, 1, 1, flip=True)
    flips = [f for b in a for _, f in b]
    assert 0 < sum(flips) < len(flips)
    assert all(f == 0 for b in plan_identity_epoch(SHUFFLED, 8, 4, 0, 1, flip=False) for _, f in b)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_take_whole_groups_and_together_form_the_global_batch(world):
    labels = np.repeat(np.arange(30), 4)  # 120 images
    k, batch = 2, 4
    glob = plan_identity_epoch(labels, batch * world, k, 0, 3, True)  # one process with the global batch
    ranks = [plan_identity_epoch(labels, batch, k, 0, 3, True, r, world) for r in range(world)]
    assert all(len(p) == len(glob) == 120 // (batch * world) for p in ranks)
    for b, whole in enumerate(glob):
        assert [x for p in ranks for x in p[b]] == whole
        for p in ranks:
            ids = labels[[i for i, _ in p[b]]]
            assert (ids[0::2] == ids[1::2]).all()  # whole identity groups on every rank


def test_fewer_identities_than_groups_per_batch_still_fill_batches():
    labels = np.repeat([0, 1], [9, 7])  # 2 identities, a batch asks for 4 groups of 2
    plan = plan_identity_epoch(labels, 8, 2, 0, 0, True)
    assert len(plan) == 2 and sorted(_indices(plan)) == list(range(16))
    assert plan_identity_epoch(np.zeros(0, np.int64), 8, 2, 0, 0, True) == []
    with pytest.raises(ValueError, match="divide"):
        plan_identity_epoch(labels, 8, 3, 0, 0, True)


# ---- labels() of the training sets -----------------------------------------------------------------------------

def test_datasets_give_their_labels_in_index_order_without_decoding(tmp_path):
    tiny = TinyFaces(classes=3, per_class=2)
    assert tiny.labels().dtype == np.int64 and tiny.labels().tolist() == [tiny.item(i, False)[1] for i in range(6)]
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 0, 0)).save(png, format="PNG")
    classes = [0, 0, 0, 1, 3, 3]  # class 2 has no images
    write_insightface_rec(tmp_path / "rec", [(c, png.getvalue()) for c in classes], num_classes=4, image_size=8)
    ds = RecordIODataset(tmp_path / "rec", flip=False)
    assert ds.labels().dtype == np.int64 and ds.labels().tolist() == classes
    assert ds.labels().tolist() == [ds.item(i, False)[1] for i in range(len(ds))]
    for name, n in (("bob", 2), ("alice", 1), ("carol", 3)):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for j in range(n):
            Image.new("RGB", (8, 8), (j, 0, 0)).save(tmp_path / "tree" / name / f"{j}.png")
    ds = ImageFolderDataset(tmp_path / "tree")
    assert ds.labels().dtype == np.int64 and ds.labels().tolist() == [0, 1, 1, 2, 2, 2]
    assert ds.labels().tolist() == [label for _, label in ds.samples]


# ---- the engine -------------------------------------------------------------------------------------------------

class _Recorded(TinyFaces):
    """TinyFaces that records the items the loader asked for and can send SIGUSR1 to itself at one of them."""

    def __init__(self, signal_at=None, **kw):
        super().__init__(**kw)
        self.seen, self.signal_at = [], signal_at

    def item(self, index, flip):
        self.seen.append(index)
        if len(self.seen) == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # preemption: last.pt at the next step, then Preempted
        return super().item(index, flip)


def _stage(tmp, data, **data_cfg):
    cfg = tiny_config(data=data_cfg, train={"max_steps": 10, "checkpoint_every": 5})
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    torch.manual_seed(123)
    teacher = teachers.build_teacher(cfg.teacher.spec())
    return run_stage(cfg, spec, str(tmp), data, {}, teacher=teacher, progress=False)


def test_training_with_images_per_id_resumes_bit_for_bit_and_refuses_another_k(tmp_path):
    # 6 identities of 16 images: 96 images, 6 batches of 4 groups of 4 an epoch; 10 steps cross an epoch
    whole = _Recorded(classes=6)
    _stage(tmp_path / "whole", whole, images_per_id=4)
    labels = whole.labels()
    for b in range(10):
        ids = labels[whole.seen[16 * b:16 * (b + 1)]].reshape(4, 4)
        assert (ids == ids[:, :1]).all()  # the engine trained on P×K batches
    assert sorted(whole.seen[:96]) == list(range(96))  # the first epoch saw every image once
    cut = _Recorded(classes=6, signal_at=16 * 2 + 3)  # during step 3: last.pt at step 3, mid-epoch
    with pytest.raises(Preempted):
        _stage(tmp_path / "cut", cut, images_per_id=4)
    assert safe_torch_load(tmp_path / "cut" / "last.pt")["step"] == 3
    rest = _Recorded(classes=6)
    _stage(tmp_path / "cut", rest, images_per_id=4)
    assert cut.seen[:48] + rest.seen == whole.seen  # the resumed run saw exactly the remaining batches
    a = safe_torch_load(tmp_path / "whole" / "student.pt")["state_dict"]
    b = safe_torch_load(tmp_path / "cut" / "student.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    (tmp_path / "cut" / "result.json").unlink()
    with pytest.raises(CheckpointError, match="images_per_id differ"):
        _stage(tmp_path / "cut", TinyFaces(classes=6), images_per_id=2)
    with pytest.raises(CheckpointError, match="images_per_id differ"):
        _stage(tmp_path / "cut", TinyFaces(classes=6))


def test_dry_run_with_images_per_id_passes(tmp_path, capsys, monkeypatch):
    import distill.train.engine
    calls = []

    def spy(labels, batch_size, k, *args):
        calls.append((len(labels), batch_size, k))
        return plan_identity_epoch(labels, batch_size, k, *args)

    monkeypatch.setattr(distill.train.engine, "plan_identity_epoch", spy)
    path = tmp_path / "tiny.yaml"
    exp = tiny_experiment(tmp_path / "data", train={"max_steps": 2}, tracking={"wandb": "disabled"},
                          data={"images_per_id": 8})  # 24 = 3 identities x 8 (teacher.train too)
    path.write_text(yaml.safe_dump(exp))
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "dry run passed" in out and "gen2 ok" in out
    # every stage (teacher, baseline, gen1, gen2) planned 2 groups of 2 on the stand-in's 4 x 2 images
    assert set(calls) == {(8, 4, 2)} and len(calls) == 4
    assert main(["run", str(path), "data.images_per_id=5", "--dry-run"]) == 2
    assert "must divide train.batch_size (24)" in capsys.readouterr().err


# ---- the config -------------------------------------------------------------------------------------------------

def test_images_per_id_config_errors_name_key_value_and_fix():
    assert tiny_config().data.images_per_id is None
    assert tiny_config(data={"images_per_id": 4}).data.images_per_id == 4
    with pytest.raises(ConfigError, match=r"key 'data.images_per_id' must be 2 or more .* got 1; write null"):
        tiny_config(data={"images_per_id": 1})
    with pytest.raises(ConfigError, match=r"'data.images_per_id' must be int, got 2.5"):
        tiny_config(data={"images_per_id": 2.5})
    with pytest.raises(ConfigError, match=r"'data.images_per_id' \(3\) must divide train.batch_size \(16\).*"
                                          r"set data.images_per_id: 2, or a train.batch_size that is a multiple of 3"):
        tiny_config(data={"images_per_id": 3})
    with pytest.raises(ConfigError, match=r"\(8\) must divide teacher.train.batch_size \(12\).*images_per_id: 4"):
        tiny_config(data={"images_per_id": 8}, teacher={"train": {"batch_size": 12}})
    with pytest.raises(ConfigError, match=r"\(2\) must divide teacher.train.batch_size \(9\).*images_per_id: null"):
        tiny_config(data={"images_per_id": 2}, teacher={"train": {"batch_size": 9}})


@pytest.mark.parametrize("grouped,world", [(0.5, 1), (0.5, 2), (0.25, 1)])
def test_mixed_batches_hold_groups_then_single_images_every_image_once(grouped, world):
    """data.grouped_fraction: G = round(f * batch / K) groups of K same-identity images, then shuffled singles."""
    labels = np.repeat(np.arange(20), 8)  # 20 identities x 8 images, batch 16, K = 4
    rng = np.random.default_rng(1)
    labels = labels[rng.permutation(len(labels))]
    batch, k = 16, 4
    groups = round(grouped * batch / k)
    plans = [plan_identity_epoch(labels, batch, k, 3, 0, True, r, world, grouped_fraction=grouped)
             for r in range(world)]
    seen = [i for p in plans for i in _indices(p)]
    assert len(seen) == len(set(seen))  # no image twice
    assert all(len(p) == len(plan_epoch(len(labels), batch, 3, 0, True, r, world)) for r, p in enumerate(plans))
    assert all(len(b) == batch for p in plans for b in p)
    for p in plans:
        for b in p:
            ids = labels[[i for i, _ in b]]
            for g in range(groups):  # the groups first: K images of one identity each
                assert len(set(ids[g * k:(g + 1) * k])) == 1
    singles = [labels[[i for i, _ in b]][groups * k:] for p in plans for b in p]
    assert np.mean([len(set(s)) for s in singles]) > 0.7 * (batch - groups * k)  # shuffled: mostly distinct people
    again = plan_identity_epoch(labels, batch, k, 3, 0, True, 0, world, grouped_fraction=grouped)
    assert again == plans[0]  # a pure function of (seed, epoch): resume stays exact
    assert again != plan_identity_epoch(labels, batch, k, 3, 1, True, 0, world, grouped_fraction=grouped)


def test_grouped_fraction_config_errors_name_key_value_and_fix():
    assert tiny_config(data={"images_per_id": 4, "grouped_fraction": 0.5}).data.grouped_fraction == 0.5
    with pytest.raises(ConfigError, match=r"'data.grouped_fraction' \(0.5\) mixes .* data.images_per_id is not set"):
        tiny_config(data={"grouped_fraction": 0.5})
    with pytest.raises(ConfigError, match=r"'data.grouped_fraction' must be a number in \(0, 1\].*got 1.5"):
        tiny_config(data={"images_per_id": 4, "grouped_fraction": 1.5})
    with pytest.raises(ConfigError, match=r"\(0.05\) leaves no group of 4 images in a batch of 16: raise it to at "
                                          r"least 0.25"):
        tiny_config(data={"images_per_id": 4, "grouped_fraction": 0.05})
