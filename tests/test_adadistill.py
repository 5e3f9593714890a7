"""AdaDistill: class centres pulled toward the teacher (hand-computed, each reading of its options), the loss that
replaces classification, gradients to the student only, sharded centres, a class seen twice (one process and two
gloo ranks), and real stages: frozen centres that move only by the blend, resumed exactly; trained centres.
The authors' numbers: tests/test_reference_adadistill.py."""

import math
import multiprocessing
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from tiny import TinyFaces, tiny_config, whole_and_resumed

import teachers
from distill.losses.adadistill import AdaDistill
from distill.losses.distillation import DistillationObjective
from distill.losses.heads import create_head
from distill.losses.registry import check_loss_options, create_distill_loss, loss_options, requirements
from distill.train.engine import StageSpec, run_stage
from distill.utils.checkpoint import safe_torch_load
from distill.utils.errors import ConfigError


def _head(weight):
    head = create_head("arcface", weight.shape[1], weight.shape[0], s=64.0, m=0.45)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def test_the_options_and_their_defaults_are_the_authors():
    assert loss_options("adadistill") == {"centre_update": "raw", "train_centres": False, "same_class": "last"}


def test_the_raw_centre_update_by_hand():
    """The default (the authors' code): the raw centre is blended, W ← α W + (1 − α) t̂, its norm kept in it.
    2-d: class 1's centre (norm 3) at 0°, the teacher at 90°, the student at 60°: cos(ŝ, t̂) = 1/2,
    cos(W, t̂) = 0 -> clipped to 1e-6, α = 1e-6. Class 0 (not in the batch) is untouched."""
    head = _head(torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]]))
    student = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    teacher = torch.tensor([[0.0, 5.0]])
    alpha = AdaDistill().update_centres(head, student, torch.tensor([1]), teacher)
    assert alpha.tolist() == pytest.approx([1e-6])
    assert head.weight[1].tolist() == pytest.approx([3e-6, 1 - 1e-6], abs=1e-7)
    assert head.weight[0].tolist() == [0.0, 2.0] and head.weight[2].tolist() == [-1.0, 0.0]

    # centre (2, 2) at 45° to the teacher, student aligned with it: α = 1 · cos 45° = a
    head = _head(torch.tensor([[2.0, 2.0], [3.0, 0.0]]))
    alpha = AdaDistill().update_centres(head, torch.tensor([[0.0, 1.0]]), torch.tensor([0]), torch.tensor([[0.0, 2.0]]))
    a = math.sqrt(0.5)
    assert alpha.tolist() == pytest.approx([a])
    assert head.weight[0].tolist() == pytest.approx([2 * a, 2 * a + (1 - a)])


def test_the_normalised_centre_update_by_hand():
    """centre_update normalised: W ← α Ŵ + (1 − α) t̂ (the centre's norm does not matter). The cases above."""
    head = _head(torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]]))
    student = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    alpha = AdaDistill(centre_update="normalised").update_centres(head, student, torch.tensor([1]),
                                                                  torch.tensor([[0.0, 5.0]]))
    assert alpha.tolist() == pytest.approx([1e-6])
    assert head.weight[1].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-7)

    head = _head(torch.tensor([[2.0, 2.0], [3.0, 0.0]]))
    AdaDistill(centre_update="normalised").update_centres(head, torch.tensor([[0.0, 1.0]]), torch.tensor([0]),
                                                          torch.tensor([[0.0, 2.0]]))
    a = math.sqrt(0.5)
    assert head.weight[0].tolist() == pytest.approx([a * a, a * a + (1 - a)])


def test_bad_option_values_are_refused_naming_the_allowed_ones():
    for options, message in (({"centre_update": "unit"}, "centre_update must be 'raw' or 'normalised', got 'unit'"),
                             ({"same_class": "first"}, "same_class must be 'last' or 'mean', got 'first'"),
                             ({"train_centres": "no"}, "train_centres must be true or false, got 'no'")):
        with pytest.raises(ValueError, match=message):
            AdaDistill(**options)
    with pytest.raises(ConfigError, match=r"key 'distill.terms\[0\]': distillation loss 'adadistill' refuses these "
                                          r"options: centre_update must be 'raw' or 'normalised', got 'unit'"):
        check_loss_options("adadistill", {"centre_update": "unit"}, "distill.terms[0]")
    with pytest.raises(ConfigError, match=r"key 'distill.terms\[0\].train_centres'.*takes true or false"):
        check_loss_options("adadistill", {"train_centres": "no"}, "distill.terms[0]")


def test_two_samples_of_one_identity_average_their_updates():
    """same_class mean: the mean of the two updated centres."""
    head = _head(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # α = 1 for the first (all aligned), 1e-6 for the second
    AdaDistill(same_class="mean").update_centres(head, student, torch.tensor([0, 0]), teacher)
    assert head.weight[0].tolist() == pytest.approx([(1 + 1e-6) / 2, (1 - 1e-6) / 2], abs=1e-7)


def test_a_class_seen_twice_keeps_the_last_samples_update():
    """same_class last (the default): both samples read the centre as it was; the later one's update is written.
    Class 0 at samples 0 and 2 (α = 1, then 1e-6), class 1 at sample 1, in either order."""
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    head = _head(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    AdaDistill().update_centres(head, student, torch.tensor([0, 1, 0]), teacher)
    assert head.weight[0].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-7)  # the last: to the teacher
    a = math.sqrt(0.5)
    assert head.weight[1].tolist() == pytest.approx([a, a + 1 - a])  # α = cos 45°
    head = _head(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    AdaDistill().update_centres(head, student.flip(0), torch.tensor([0, 1, 0]), teacher.flip(0))
    assert head.weight[0].tolist() == [1.0, 0.0]  # the last now has α = 1: the centre stays


def test_a_rank_updates_only_the_centres_it_holds():
    """Rank 1 of 2 holding classes 2 and 3 (simulated: the head's shard bounds); labels 0 and 3 in the batch."""
    head = _head(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    head.class_start, head.num_local_classes = 2, 2
    AdaDistill().update_centres(head, torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 3]),
                                torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    assert head.weight[0].tolist() == [1.0, 0.0]  # class 2: not in the batch
    assert head.weight[1].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-7)  # class 3 moved to the teacher


# two gloo ranks: rank 0 holds classes 0-1, rank 1 classes 2-3; class 0 is in both ranks' batches
_CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
_BATCHES = [(torch.tensor([0, 2]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])),
            (torch.tensor([0, 3]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 2.0]]))]


def _two_rank_worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        head = create_head("arcface", 2, 4).double()
        head.load_full_weight(_CENTRES)
        labels, student, teacher = _BATCHES[rank]
        AdaDistill().update_centres(head, student.double(), labels, teacher.double())
        torch.save(head.full_weight(), tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_keep_the_last_write_of_the_global_batch(tmp_path):
    """Class 0: rank 0's sample (α = 1, the centre stays), then rank 1's (α = 1e-6, to its teacher): the global
    batch is the ranks' batches in rank order, so rank 1's write is kept, and both ranks' centres are those of one
    process holding all classes and the whole batch."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    torch.multiprocessing.start_processes(_two_rank_worker, args=(tmp_path,), nprocs=2, join=True, start_method=method)
    one = create_head("arcface", 2, 4).double()
    one.load_full_weight(_CENTRES)
    labels, student, teacher = (torch.cat(parts) for parts in zip(*_BATCHES, strict=True))
    AdaDistill().update_centres(one, student.double(), labels, teacher.double())
    assert one.weight[0].tolist() == pytest.approx([1e-6, 1 - 1e-6], abs=1e-9)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), one.weight.detach())


def test_it_replaces_the_classification_term_and_only_the_student_gets_gradients():
    torch.manual_seed(0)
    weight = torch.randn(5, 8)
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3])
    objective = DistillationObjective(_head(weight), loss="adadistill", alpha=7.0)
    total, logs = objective(student, labels, teacher)
    # what it computes: the plain head's loss after the same centre update; no alpha x term
    reference = _head(weight)
    AdaDistill().update_centres(reference, student.detach(), labels, teacher.detach())
    expected, _ = reference(student.detach(), labels)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert "loss_kd/adadistill" not in logs and 0 < logs["ada_alpha"].item() <= 1
    total.backward()
    assert student.grad.abs().sum() > 0 and objective.head.weight.grad.abs().sum() > 0 and teacher.grad is None
    assert requirements("adadistill").replaces_classification and requirements("adadistill").sizes == "same"
    assert isinstance(create_distill_loss("adadistill"), AdaDistill)


def _watch_stage(monkeypatch) -> tuple:
    """Record each step's centres before and after the blend, and the optimizers the stages build."""
    import distill.train.engine as engine

    blends, optimizers = [], []
    update, create = AdaDistill.update_centres, engine.create_optimizer

    def update_centres(self, head, *args):
        before = head.weight.detach().clone()
        alpha = update(self, head, *args)
        blends.append((before, head.weight.detach().clone(), head.weight))
        return alpha

    monkeypatch.setattr(AdaDistill, "update_centres", update_centres)
    monkeypatch.setattr(engine, "create_optimizer",
                        lambda *a, **k: optimizers.append(create(*a, **k)) or optimizers[-1])
    return blends, optimizers


def _optimised(optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def test_a_stage_with_adadistill_moves_the_centres_only_by_the_blend_and_resumes_exactly(tmp_path, monkeypatch):
    """train_centres false (the default): the head is frozen before the optimizer is built, so no SGD step moves
    the centres: each step starts from the centres the last blend left, and last.pt holds the last blend's."""
    cfg = tiny_config(distill={"loss": "adadistill"}, train={"max_steps": 4, "checkpoint_every": 2})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=7.0, generation=1)
    blends, optimizers = _watch_stage(monkeypatch)
    whole, _, again = whole_and_resumed(cfg, spec, teacher, tmp_path, monkeypatch)
    assert torch.equal(again["head_weight"], whole["head_weight"])
    assert all(torch.equal(again["model"][k], whole["model"][k]) for k in whole["model"])
    steps = blends[:4]  # the whole run's
    assert all(not torch.equal(before, after) for before, after, _ in steps)  # the blend moved them
    assert all(torch.equal(steps[k + 1][0], steps[k][1]) for k in range(3))  # and nothing else did
    assert torch.equal(whole["head_weight"], steps[-1][1])
    assert not any(p is blends[0][2] for p in _optimised(optimizers[0])) and not blends[0][2].requires_grad


def test_with_train_centres_true_sgd_moves_the_centres_too(tmp_path, monkeypatch):
    cfg = tiny_config(distill={"terms": [{"loss": "adadistill", "alpha": 1.0, "train_centres": True}]},
                      train={"max_steps": 1, "checkpoint_every": 1})
    teacher = teachers.build_teacher(cfg.teacher.spec())
    spec = StageSpec("gen1", "vargfacenet", cfg.student.model_kwargs(16), cfg.train, alpha=1.0, generation=1)
    blends, optimizers = _watch_stage(monkeypatch)
    run_stage(cfg, spec, str(tmp_path), TinyFaces(), {}, teacher=teacher, progress=False)
    (_, blended, weight), = blends
    assert any(p is weight for p in _optimised(optimizers[0])) and weight.requires_grad
    assert not torch.equal(safe_torch_load(tmp_path / "last.pt")["head_weight"], blended)  # SGD moved them after


def test_a_size_mismatch_is_an_error_even_with_a_projection():
    from distill.run.preflight import embedding_size_problem

    cfg = tiny_config(distill={"loss": "adadistill", "project": "linear"}, teacher={"embedding_size": 64})
    problem = embedding_size_problem(cfg, 64)
    assert "distill.loss adadistill moves the student's class centres" in problem
    assert "64" in problem and "32" in problem
    assert embedding_size_problem(tiny_config(distill={"loss": "cosine", "project": "linear"}), 64) is None
