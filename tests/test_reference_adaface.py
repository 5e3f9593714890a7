"""AdaFace (`adaface`) against its authors' head: mk-minchul/AdaFace @ 9cb981642eb7b579487bfadb0ee9ad8fc3772b74,
head.py, class AdaFace (forward(embbedings, norms, label), norms = ‖x‖ before l2_norm as their backbone returns them),
re-typed and run once in float64 outside the repository (ref39/h8_heads_ref.py; docs/reference_numbers.md):
m 0.4, h 0.333, s 64, t_alpha 0.01, the EMA starting at μ 20, σ 100, two steps on the same batch, the loss their
cross-entropy of the logits. Inputs: seed 0, norms 5 .. 150 (150 past their clip at 100). Second case: σ preset to
5 so the margin scaler reaches its clip at −1 and +1."""

import pytest
from head_reference import check, inputs, steps

from distill.losses.heads import create_head

NORMS = [5.0, 12.0, 20.0, 27.0, 35.0, 150.0]
PINNED = {
    None: [
        dict(loss=55.69133283436866, batch_mean=20.131666666666668, batch_std=99.3441753429092,
             grad_x=dict(sum=-1.066783636933712, norm=1.3537793635581827,
                first=[-0.00053914101104846, -0.0003360233039153371, 0.0010724930374186978, 0.0009853085977987743]),
             grad_weight=dict(sum=-2.0551795024645454, norm=10.35056478266862,
                first=[0.0223252397126093, 0.31129160107120996, 0.051821158013634655, 0.4108964718959098])),
        dict(loss=55.69091609207569, batch_mean=20.262016666666668, batch_std=98.6949089323893,
             grad_x=dict(sum=-1.0668275767934572, norm=1.353770582607107,
                first=[-0.0005340558465160242, -0.000333310908768903, 0.001062816075256399, 0.0009772343042630466]),
             grad_weight=dict(sum=-2.056285152368432, norm=10.350579151739836,
                first=[0.022326990069135744, 0.3112867709433072, 0.05180699497198639, 0.41090773733400726])),
    ],
    5.0: [
        dict(loss=55.75218799663211, batch_mean=20.131666666666668, batch_std=5.294175342909202,
             grad_x=dict(sum=-1.108745152180249, norm=1.372027349395647,
                first=[-6.760649737687816e-08, -4.947348032382308e-07, 5.690568218816399e-07, 1.3310094559600845e-06]),
             grad_weight=dict(sum=-2.260368426156494, norm=10.418762564177099,
                first=[0.02254057994755665, 0.3106973673469978, 0.05007872858853725, 0.4122824193015077])),
        dict(loss=55.73624343059506, batch_mean=20.262016666666668, batch_std=5.585408932389313,
             grad_x=dict(sum=-1.1073495815356942, norm=1.3711138319008733,
                first=[-1.0397052693513814e-07, -5.957575601849967e-07, 7.166317095366746e-07, 1.6065139463091043e-06]),
             grad_weight=dict(sum=-2.260412026678128, norm=10.42064654342786,
                first=[0.02254051676672597, 0.31069754169518854, 0.05007923981737747, 0.4122820126645016])),
    ],
}


@pytest.mark.parametrize("preset_std", [None, 5.0])
def test_adaface_equals_the_authors_head_in_loss_gradients_and_norm_statistics(preset_std):
    x, kernel, labels = inputs(NORMS)
    head = create_head("adaface", 8, 10).double()
    head.load_full_weight(kernel.T)
    if preset_std is not None:
        head.batch_std.fill_(preset_std)
    for (loss, grad_x, grad_w, state), pinned in zip(steps(head, x, labels, 2), PINNED[preset_std], strict=True):
        assert loss == pytest.approx(pinned["loss"], rel=1e-12)
        check(grad_x, pinned["grad_x"])
        check(grad_w, pinned["grad_weight"])
        assert state["batch_mean"].item() == pytest.approx(pinned["batch_mean"], rel=1e-12)
        assert state["batch_std"].item() == pytest.approx(pinned["batch_std"], rel=1e-12)
