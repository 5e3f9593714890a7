"""CurricularFace (`curricularface`) against its authors' head: HuangYG123/CurricularFace @
d3802651f9672ae4ac0d09235c292252ba53a364, head/metrics.py, class CurricularFace, re-typed and run once in float64
outside the repository (ref39/h8_heads_ref.py; docs/reference_numbers.md): m 0.5, s 64, t from 0, two steps on
the same batch (t moves, so do the hard negatives' weights), the loss their cross-entropy of the logits. Inputs:
seed 0, row norms 1 .. 6; every target angle below π − m, where their fallback and ours differ."""

import pytest
from head_reference import check, inputs, steps

from distill.losses.heads import create_head

PINNED = [
    dict(loss=47.637788516776546, t=0.00010719062178375724,
         grad_x=dict(sum=-9.836697197818033, norm=7.380647598431748,
                first=[4.4430093422313105e-05, -0.0005183330816355232, 0.00043589093816224513, 0.0013755007352516757]),
         grad_weight=dict(sum=6.307421697291418, norm=9.471562986082933,
                first=[0.022346219575266613, 0.3047533089036585, 0.05106465451351118, 0.4065223187933551])),
    dict(loss=47.63745566998349, t=0.0002133093373496769,
         grad_x=dict(sum=-9.836338397776583, norm=7.380452238962397,
                first=[4.4430093422313105e-05, -0.0005183330816355232, 0.00043589093816224513, 0.0013755007352516757]),
         grad_weight=dict(sum=6.307900013322103, norm=9.472198883186385,
                first=[0.02234668201279766, 0.30475753044790044, 0.0510660603473455, 0.40652930138024745])),
]


def test_curricularface_equals_the_authors_head_in_loss_gradients_and_running_t():
    x, kernel, labels = inputs([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    head = create_head("curricularface", 8, 10).double()
    head.load_full_weight(kernel.T)
    for (loss, grad_x, grad_w, state), pinned in zip(steps(head, x, labels, 2), PINNED, strict=True):
        assert loss == pytest.approx(pinned["loss"], rel=1e-12)
        check(grad_x, pinned["grad_x"])
        check(grad_w, pinned["grad_weight"])
        assert state["t"].item() == pytest.approx(pinned["t"], rel=1e-12)
