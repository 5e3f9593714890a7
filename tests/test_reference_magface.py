"""MagFace (`magface`) against its authors' code: IrvingMeng/MagFace @ 719001a07b3cb87811450d53062d5ae678a4908e,
models/magface.py (MagLinear with its default easy_margin, SoftmaxBuilder._margin, MagLoss) and run/trainer.py (loss =
loss_id + lambda_g · loss_g), with run/run.sh's l_a 10, u_a 110, l_margin 0.45, u_margin 0.8, lambda_g 35, scale 64;
re-typed and run once in float64 outside the repository (ref39/h8_heads_ref.py; docs/reference_numbers.md).
Inputs: seed 0, row norms 5 .. 130 (below l_a and above u_a: clipped, no gradient through the magnitude there)."""

import pytest
import torch
from head_reference import check, inputs, steps

from distill.losses.heads import create_head

PINNED = dict(loss=41.04640017484068, loss_g=0.035529664170197955,
         grad_x=dict(sum=-0.5006234008049586, norm=0.49726784830574977,
                first=[1.218701842989949e-08, -6.222272148319003e-06, 5.957463579889204e-06, 1.6597940827884655e-05]),
         grad_weight=dict(sum=-2.1911020835719643, norm=10.404184301890863,
                first=[0.022537026018035422, 0.3107071744542287, 0.05010748527385519, 0.41225954591976066]))


def test_magface_equals_the_authors_loss_with_its_regulariser_and_gradients():
    x, kernel, labels = inputs([5.0, 30.0, 60.0, 90.0, 109.0, 130.0])
    head = create_head("magface", 8, 10).double()
    head.load_full_weight(kernel.T)
    [(loss, grad_x, grad_w, state)] = steps(head, x, labels, 1)
    assert loss == pytest.approx(PINNED["loss"], rel=1e-12)
    check(grad_x, PINNED["grad_x"])
    check(grad_w, PINNED["grad_weight"])
    _, logs = head(x, labels)
    assert logs["mag_g"].item() == pytest.approx(PINNED["loss_g"], rel=1e-12) and state == {}
    assert torch.isfinite(grad_x).all()
