"""FitNet's hint distance against the authors' code and the face-KD baseline's (issue 38, Deliver 3).

Reference numbers, computed once outside this repository in float64 (docs/reference_numbers.md, recipe `hint`:
`torch.manual_seed(4)`; the student's regressed map r(v) = randn(2, 5, 4, 4), then the teacher's hint map
u = randn(2, 5, 4, 4)):

- Tencent/TFace @ 82c9cbb, recognition/tasks/ekd/distillation/fitnet.py, `HintLoss` (nn.MSELoss, mean over every
  element): the FitNet row of the face-KD tables (EKD, CVPR 2022), and our default.
- adri-romsor/FitNets @ c3d3905, costs/HintCost.py, `HintCost.expr` (Theano, the MSE branch: ½ (u − r(v))² summed
  over the channel axis, then the mean over batch and positions): the paper's ½‖u − r(v)‖² per position. It is
  ours × C/2 (C = the teacher's channels), exactly: the same loss at alpha × C/2.

The regressor is left out (it differs by construction: ours is 1×1 conv + BatchNorm, FitNets' a convolution with the
teacher layer's nonlinearity, RepDistiller's a conv with bias and ReLU): an identity stands in for it, so the test
compares the distance the loss applies to the regressed map. Our FitNet computes in float32, hence 1e-6 relative.
"""

import pytest
import torch
from torch import nn

from distill.losses.registry import create_distill_loss

TFACE = (2.239841158548761, 0.14754308405661587, 0.23663480082971533,
         (0.001467850888023685, -0.023388199783277594, -0.008548240711180403))
FITNETS = (5.599602896371904, 0.3688577101415397, 0.5915870020742884,
           (0.003669627220059212, -0.058470499458193985, -0.02137060177795101))


def ours():
    torch.manual_seed(4)
    regressed = torch.randn(2, 5, 4, 4, dtype=torch.float64).requires_grad_()
    hint = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    fitnet = create_distill_loss("fitnet", stages=[-1])
    fitnet.regressors = nn.ModuleList([nn.Identity()])  # the distance alone (module docstring)
    loss = fitnet([regressed], [hint])
    loss.backward()
    return loss.item(), regressed.grad


@pytest.mark.parametrize("source, expected, factor", [("tface", TFACE, 1.0), ("fitnets", FITNETS, 5 / 2)])
def test_fitnet_hint_distance_matches_tface_and_the_fitnets_code(source, expected, factor):
    loss, grad = ours()
    close = lambda v: pytest.approx(v, rel=1e-6, abs=1e-9)  # noqa: E731
    value, grad_sum, grad_norm, first = expected
    assert loss * factor == close(value)
    assert grad.sum().item() * factor == close(grad_sum)
    assert grad.norm().item() * factor == close(grad_norm)
    assert (grad.flatten()[:3] * factor).tolist() == close(list(first))
