"""PartialFC's class sampling against arcface_torch's PartialFC_V2 (issue 38: "PartialFC sampling" agrees).

Source: deepinsight/insightface @ 531cb1e61682b4c953c0d352925075340d6e4145, recognition/arcface_torch/
partial_fc_v2.py, `PartialFC_V2.sample` and `PartialFC_V2.forward` with `DistCrossEntropyFunc`, the margin by
recognition/arcface_torch/losses.py `CombinedMarginLoss` (master). Their code was re-typed and run once outside
this repository, one rank, on the CPU in float64 (the collectives are identities with one rank; `.cuda()` dropped;
their float32 loss buffer made float64, nothing else changed); only its outputs are here. docs/reference_numbers.md
has the recipe.

Recipe: `torch.manual_seed(5)`; W = randn(20, 8); embeddings = W[labels] + randn(6, 8) (float64); the head's
centres set to W; `torch.manual_seed(7)` immediately before the forward, whose only random draw is the sampling's
`torch.rand(num_local)` (float32, the CPU generator) in both codes, so the kept classes are the same ones.
On a GPU they are not: arcface_torch draws on the CPU generator and copies to the GPU, ours draws on the GPU's
generator (no host copy); the rule (every positive, then the highest random scores) is the same.
"""

import pytest
import torch

from distill.losses.heads import create_head

LABELS = [2, 5, 5, 11, 17, 2]   # repeated labels: 4 distinct positives


def close(expected):
    return pytest.approx(expected, rel=1e-6, abs=1e-9)


def sampled_forward(name, sample_rate, labels, **options):
    """(head, labels, loss, embedding grad) of a training-mode head with the recipe's inputs and seeds."""
    torch.manual_seed(5)
    weight = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.tensor(labels)
    embeddings = (weight[labels] + torch.randn(6, 8, dtype=torch.float64)).requires_grad_()
    head = create_head(name, 8, 20, sample_rate=sample_rate, **options).double().train()
    with torch.no_grad():
        head.weight.copy_(weight)
    torch.manual_seed(7)
    loss, _ = head(embeddings, labels)
    loss.backward()
    return head, labels, loss, embeddings.grad


def assert_reference(head, labels, loss, grad, kept, remapped, expected):
    """The kept classes, the labels as rows of the kept centres (the head's own remap, torch.searchsorted), the loss,
    the embeddings' gradient (sum, norm, first entries) and the centres' gradient (which rows, sum, norm)."""
    value, grad_sum, grad_norm, first, weight_sum, weight_norm = expected
    assert head.sampled_classes.tolist() == kept
    assert torch.searchsorted(head.sampled_classes, labels).tolist() == remapped
    assert loss.item() == close(value)
    assert grad.sum().item() == close(grad_sum) and grad.norm().item() == close(grad_norm)
    assert grad[0, :3].tolist() == close(first)
    # only the kept rows of the centres receive gradient, and it is theirs
    with_grad = (head.weight.grad.abs().sum(1) > 0).nonzero().view(-1).tolist()
    assert with_grad == kept
    assert head.weight.grad.sum().item() == close(weight_sum)
    assert head.weight.grad.norm().item() == close(weight_norm)


KEPT = [2, 3, 5, 7, 9, 10, 11, 16, 17, 18]   # int(0.5 · 20) = 10: the 4 positives and 6 drawn
REMAPPED = [0, 2, 2, 6, 8, 0]                 # LABELS as rows of the kept centres


@pytest.mark.parametrize("name", ["arcface", "combined"])
def test_arcface_straight_through_sampling_matches_partial_fc_v2(name):
    """PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), 8, 20, sample_rate=0.5) on the recipe: the kept classes,
    the remapped labels, the loss and the gradients (embeddings, centres). Ours: `arcface` and `combined` (its
    defaults m1 1, m2 0.5, m3 0 are arcface), straight_through (arcface_torch's gradient)."""
    head, labels, loss, grad = sampled_forward(name, 0.5, LABELS, straight_through=True)
    assert_reference(head, labels, loss, grad, KEPT, REMAPPED, (
        5.18495782727046, -3.02006150634089, 4.88671007288271,
        [0.02313608322513, -0.036049482965015, -0.092894105896794], -4.17443626611552, 6.3796634933415))


def test_cosface_sampling_matches_partial_fc_v2():
    """PartialFC_V2(CombinedMarginLoss(64, 1, 0, 0.4), 8, 20, sample_rate=0.5) on the recipe. Ours: `cosface`."""
    head, labels, loss, grad = sampled_forward("cosface", 0.5, LABELS)
    assert_reference(head, labels, loss, grad, KEPT, REMAPPED, (
        5.03243239100959, -2.81232921022855, 4.82987172163391,
        [0.014666459630259, -0.022852540832142, -0.058887567129102], -4.27774198275436, 6.2613013598924))


def test_softmax_sampling_matches_partial_fc_v2():
    """PartialFC_V2(CombinedMarginLoss(64, 1, 0, 0), 8, 20, sample_rate=0.5) (arccos, + 0, cos: the normalised
    softmax, whose straight-through gradient is the true one) on the recipe. Ours: `softmax`."""
    head, labels, loss, grad = sampled_forward("softmax", 0.5, LABELS)
    assert_reference(head, labels, loss, grad, KEPT, REMAPPED, (
        0.0318482104500061, 0.0564674245143804, 0.446110028109738,
        [1.24e-13, -1.92e-13, -4.96e-13], -0.142831835314512, 0.666286859509452))


def test_more_positives_than_the_sample_size_keeps_exactly_the_positives_as_partial_fc_v2():
    """sample_rate 0.2 (int(0.2 · 20) = 4 classes) with 6 distinct labels: PartialFC_V2 keeps the positives alone
    (`index = positive`), and so do we. Labels 0 4 8 12 16 19, cosface, same recipe otherwise."""
    positives = [0, 4, 8, 12, 16, 19]
    head, labels, loss, grad = sampled_forward("cosface", 0.2, positives)
    assert_reference(head, labels, loss, grad, positives, [0, 1, 2, 3, 4, 5], (
        14.3667174889783, -4.3731349047907, 6.31574670893828,
        [-0.966092829850476, 0.509358005668726, 0.712116321714148], -0.323723892099929, 9.48538361314263))
