"""EKD against TFace's released code: two consecutive batches, so the running thresholds' zero start and their
momentum update are both checked, with FARs for which r·N is whole (the threshold index).

Source: Tencent/TFace @ 82c9cbbf77af427e6301e5eb9e6d76ea3038d0a1 (unchanged at b3dad9537521),
recognition/tasks/ekd/distillation/ekd.py, class EKD (`forward`, `relative_loss`, `sigmoid`), re-typed and run once
in float64 outside this repository with its constants topk = 20 and anchor = [2, 3, 6, 9, 10, 100] (FAR = 1/anchor;
the batch has N = 54 negative pairs, so r·N = 27, 18, 9, 6 are whole and 5.4, 0.54 are not). The recipe (`ekd` in
docs/reference_numbers.md): torch.manual_seed(8); labels = 4 identities × 3; for each of the two batches, in this
order: centres randn(4, 32), teacher centres[labels] + randn(12, 32), student teacher + randn(12, 32) (float64).
Their numbers below; ours, under its default options, must agree to 1e-6."""

import pytest
import torch

from distill.losses.ekd import EKD

FARS = (1 / 2, 1 / 3, 1 / 6, 1 / 9, 1 / 10, 1 / 100)

# (loss, grad sum, grad norm, grad[0, :3], student thresholds after the batch, teacher thresholds after the batch)
TFACE = [
    (0.22468786858319856, -0.41010019043813667, 0.12746370360384165,
     [-0.0016404212052646958, -0.013320055260955534, -0.01525066836231417],
     [-0.0006932639700269046, -0.00010257598057758902, 0.0010931522941306348, 0.0014233617796924395,
      0.0014632111485800223, 0.0024436476956555143],
     [-0.0006158549573325365, -0.00032228112267486343, 0.0003358327053783651, 0.0006545660774788878,
      0.0007366891174248879, 0.0014562945230736776]),
    (0.21978295163903683, -0.09090925309309965, 0.16093744861032871,
     [-0.017826799893395993, 0.011042286815409752, -0.0029903988422110566],
     [-0.0009400361438924916, 0.000437349926693822, 0.0021897208443587457, 0.003502284110278981,
      0.0035873119717269946, 0.00567928422103888],
     [-0.0007449268407902478, -5.810937300945783e-05, 0.0018827408488567457, 0.002659521279743531,
      0.0027822972600405104, 0.004629510684781432]),
]


def recipe():
    torch.manual_seed(8)
    labels = torch.arange(4).repeat_interleave(3)
    batches = []
    for _ in range(2):
        centres = torch.randn(4, 32, dtype=torch.float64)
        teacher = centres[labels] + torch.randn(12, 32, dtype=torch.float64)
        student = teacher + torch.randn(12, 32, dtype=torch.float64)
        batches.append((student, teacher))
    return labels, batches


def test_ekd_matches_tfaces_two_batches_under_the_defaults():
    labels, batches = recipe()
    ekd = EKD(fars=FARS, hard_negatives=20).double()  # every other option at its default
    for (student, teacher), (loss, g_sum, g_norm, g_first, a_s, a_t) in zip(batches, TFACE, strict=True):
        student = student.clone().requires_grad_()
        ours = ekd(student, teacher, labels)
        ours.backward()
        assert ours.item() == pytest.approx(loss, rel=1e-6)
        assert student.grad.sum().item() == pytest.approx(g_sum, rel=1e-6)
        assert student.grad.norm().item() == pytest.approx(g_norm, rel=1e-6)
        assert student.grad[0, :3].tolist() == pytest.approx(g_first, rel=1e-6)
        assert ekd.thresholds[0].tolist() == pytest.approx(a_s, rel=1e-6, abs=1e-12)
        assert ekd.thresholds[1].tolist() == pytest.approx(a_t, rel=1e-6, abs=1e-12)
