"""Sub-center ArcFace against the authors' code (issue 39: each new head agrees with its authors' numbers).

Source: deepinsight/insightface @ 2365ddddef4414e6212379eebb741a3b5d19b319, recognition/SubCenter-ArcFace/
train_parall.py, `get_symbol_arcface` (loss_name margin_softmax, config.loss_K = 3 of sample_config.py, loss
'arcface': s 64, m1 1, m2 0.5, m3 0), with one context holding every class, and parall_module_local_v1.py's
`backward` (softmax of the logits minus the one-hot label, rescale_grad 1/batch: the gradient of the mean
cross-entropy). Their MXNet symbols were re-typed op for op in torch (L2Normalization mode 'instance',
FullyConnected without bias, reshape (-1, classes, K), max over axis 2, one_hot, arccos, + m2, cos, the one-hot
difference added back, × s) and run once outside this repository on the CPU in float64; only the outputs are here.

Recipe "subcenter" (docs/reference_numbers.md): `torch.manual_seed(12)`; W = randn(30, 8), row c·3 + j being class
c's sub-centre j (their fc7 weight layout, drop.py reads it as W.reshape(-1, K, 512)); labels (0, 3, 3, 7, 9, 1);
each sample near sub-centre (0, 1, 2, 0, 1, 2) of its class: embeddings W[3·label + j] + 0.5·randn(6, 8). Ours holds
W.reshape(10, 3, 8).
"""

import pytest
import torch

from distill.losses.heads import create_head
from distill.losses.heads_subcenter import SubCenterArcFace


def close(expected):
    return pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_subcenter_arcface_matches_the_authors_get_symbol_arcface():
    torch.manual_seed(12)
    weight = torch.randn(30, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    embeddings = (weight[3 * labels + torch.tensor([0, 1, 2, 0, 1, 2])]
                  + 0.5 * torch.randn(6, 8, dtype=torch.float64)).requires_grad_()
    head = create_head("subcenter_arcface", 8, 10).double()  # the defaults: s 64, m 0.5, k 3
    assert isinstance(head, SubCenterArcFace) and head.weight.shape == (10, 3, 8) and head.centres_per_class == 3
    with torch.no_grad():
        head.weight.copy_(weight.reshape(10, 3, 8))
    loss, logs = head(embeddings, labels)
    loss.backward()
    assert loss.item() == close(15.829068427914182)
    grad = embeddings.grad
    assert grad.sum().item() == close(-7.705073855090428) and grad.norm().item() == close(9.702059675784357)
    assert grad[0, :3].tolist() == close([0.8127461570955292, -2.6390377004330423, -0.6915277926437041])
    centres = head.weight.grad.reshape(30, 8)  # their fc7 weight's layout
    assert centres.sum().item() == close(8.625563985096871) and centres.norm().item() == close(12.190729649125647)
    # each sample's target cosine is the one to the sub-centre it was drawn near (their max over K)
    assert logs["cos_target"].item() == close(sum([0.872144451482232, 0.7084898083333969, 0.8674330203281985,
                                                   0.7575582132794937, 0.977951828044422, 0.7143975033441613]) / 6)
