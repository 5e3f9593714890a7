"""Our losses against numbers computed by the authors' released code (issue 38, Deliver 3).

Each reference number below was produced once, outside this repository, by the authors' function as released
(re-typed verbatim, run in float64 on the inputs built here from the same seed); their code is not part of this
repository, only its outputs. docs/reference_numbers.md gives, for each, the source and the recipe to re-run it.
A test feeds our implementation the same inputs and must agree to 1e-6: the loss and the gradient with respect to
the student's input (its sum, its norm and its first entries). Hand-computed tests live beside each loss's own
tests and stay."""

import pytest
import torch

from distill.losses.heads import create_head
from distill.losses.registry import create_distill_loss

TOL = 1e-6


def close(expected):
    """Agreement to 1e-6, relative for numbers above 1e-3 (the small gradients of cc and sp would pass any
    absolute 1e-6), else absolute to 1e-9."""
    return pytest.approx(expected, rel=TOL, abs=1e-9)


def relational_inputs():
    """seed 0: student (6, 8), then teacher (6, 12), both torch.randn in float64."""
    torch.manual_seed(0)
    student = torch.randn(6, 8, dtype=torch.float64)
    teacher = torch.randn(6, 12, dtype=torch.float64)
    return student.requires_grad_(), teacher


def head_inputs():
    """seed 1: class centres W (10, 8) = randn; labels (0, 3, 3, 7, 9, 1); embeddings = W[labels] + 0.5·randn(6, 8),
    float64 (near their centres, so the target's softmax share is not negligible and the margin shows in the
    gradient)."""
    torch.manual_seed(1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    embeddings = weight[labels] + 0.5 * torch.randn(6, 8, dtype=torch.float64)
    return embeddings.requires_grad_(), weight, labels


def assert_matches(loss, grad, expected):
    """loss, grad.sum(), grad.norm() and grad[0, :3] against the authors' numbers, each to 1e-6 (`close`)."""
    value, grad_sum, grad_norm, first = expected
    assert loss.item() == close(value)
    assert grad.sum().item() == close(grad_sum)
    assert grad.norm().item() == close(grad_norm)
    assert grad[0, :3].tolist() == close(first)


def head_loss_and_grad(name, **options):
    embeddings, weight, labels = head_inputs()
    head = create_head(name, 8, 10, **options).double()
    with torch.no_grad():
        head.weight.copy_(weight)
    loss, _ = head(embeddings, labels)
    loss.backward()
    return loss, embeddings.grad


def test_sp_matches_repdistiller():
    """Source: HobbitLong/RepDistiller @ 1e2f81692647991a80a1e97ffa14e2af915eaa6f, distiller_zoo/SP.py,
    Similarity.similarity_loss (the SP authors' verified version), on relational_inputs(); gradient w.r.t. the
    student. Our `sp` with its defaults."""
    student, teacher = relational_inputs()
    loss = create_distill_loss("sp")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (0.127478626419555, 0.0698657022083136, 0.0438607707698681,
                                        [-0.000546605798055, 0.004857048328688, 0.005129081991927]))


def test_sp_gram_cosine_matches_tface():
    """Source: Tencent/TFace @ 82c9cbbf77af427e6301e5eb9e6d76ea3038d0a1, recognition/tasks/ekd/distillation/
    similarity_perserving.py, Similarity_perserving (the cosine matrix of L2-normalised embeddings, rows not
    normalised), on relational_inputs(); gradient w.r.t. the student. Our `sp` with gram: cosine."""
    student, teacher = relational_inputs()
    loss = create_distill_loss("sp", gram="cosine")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (0.200843541191045, 0.0915243894135826, 0.085802567414373,
                                        [-0.003566282753432, 0.007811777827559, 0.0055188554741]))


def test_arcface_matches_arcface_torch_straight_through():
    """Source: deepinsight/insightface, recognition/arcface_torch/losses.py, CombinedMarginLoss(s=64, m1=1, m2=0.5,
    m3=0) (the master version, margin applied under no_grad) on the cosines F.linear(normalize(e), normalize(W)),
    then F.cross_entropy (one rank: what PartialFC_V2 computes), on head_inputs(); gradient w.r.t. the embeddings.
    Ours: the `arcface` head with straight_through=True (arcface_torch's gradient)."""
    loss, grad = head_loss_and_grad("arcface", straight_through=True)
    assert_matches(loss, grad, (15.44259024934, -10.606075013386, 8.06561301564123,
                                [1.371607436436508, 1.603223461902276, -0.57989811515131]))


def test_arcface_default_has_arcface_torch_value_and_the_true_gradient():
    """Same source and inputs as above: the default `arcface` head (true gradient of the margin logit) has
    arcface_torch's loss value; its gradient is the true one, not arcface_torch's straight-through one."""
    loss, grad = head_loss_and_grad("arcface")
    assert loss.item() == close(15.44259024934)
    assert abs(grad.sum().item() - (-10.606075013386)) > 1.0  # arcface_torch's gradient sum; ours: about -12.86


def test_cosface_matches_arcface_torch():
    """Source: deepinsight/insightface, recognition/arcface_torch/losses.py, CombinedMarginLoss(s=64, m1=1, m2=0,
    m3=0.4) + F.cross_entropy on head_inputs(); gradient w.r.t. the embeddings (CosFace's margin is a constant
    shift, so arcface_torch's gradient is the true one). Ours: the `cosface` head with its defaults."""
    loss, grad = head_loss_and_grad("cosface")
    assert_matches(loss, grad, (15.8784584717828, -10.5630211590771, 8.09962004822395,
                                [1.371607430706997, 1.603223455205251, -0.579898112728946]))


def centre_inputs():
    """seed 2: teacher centres W (10, 8) = randn; labels (0, 3, 3, 7, 9, 1); teacher = W[labels] + 0.5·randn(6, 8);
    student = teacher + 0.5·randn(6, 8); float64."""
    torch.manual_seed(2)
    weight = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    teacher = weight[labels] + 0.5 * torch.randn(6, 8, dtype=torch.float64)
    student = teacher + 0.5 * torch.randn(6, 8, dtype=torch.float64)
    return student.requires_grad_(), teacher, weight, labels


def test_kd_on_margin_logits_matches_mdistiller():
    """Source: megvii-research/mdistiller @ e8c5bb331e78c9d79a8894ca233caae78531cf7f, mdistiller/distillers/KD.py,
    kd_loss(64·cos(ŝ, Ŵ), 64·cos(t̂, Ŵ), temperature=4) on centre_inputs(); gradient w.r.t. the student. Ours: `kd`
    with its defaults (temperature 4, scale 64), the centres set through a one-rank softmax head."""
    student, teacher, weight, _ = centre_inputs()
    kd = create_distill_loss("kd")
    kd.set_centres(weight, create_head("softmax", 8, 10).double())
    loss = kd(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (0.271342880196248, 0.398008799804369, 1.07535028456426,
                                        [0.291049310864237, -0.263998917578685, 0.312143250571648]))


def test_margin_distillation_matches_the_authors_train_py():
    """Source: david-svitov/margindistillation @ 495ace6436fc7c608c77ab4782f35829f9757e59, train/train.py,
    get_symbol, loss_name 'margin_distillation' (MXNet symbols re-typed op for op in torch: margin
    m_i = (Mmax − Mmin)/max_batch c · c_i + Mmin with c_i = t̂_i·Ŵ_{y_i}, Mmax 0.5, Mmin 0.2, s 64, target logit
    s·cos(arccos(cos θ) + m_i), then SoftmaxOutput(normalization='valid'), i.e. the mean cross-entropy) on
    centre_inputs() with W as the student's (= the teacher's) centres; gradient w.r.t. the student's embeddings.
    Ours: `margin_distillation` with its defaults (train_centres false: the centres stay W, as the authors'
    fixed_param_names; margin_max device, the max over one GPU's batch, as theirs: one rank here), an `arcface`
    head (s 64)."""
    student, teacher, weight, labels = centre_inputs()
    head = create_head("arcface", 8, 10).double()
    md = create_distill_loss("margin_distillation")
    md.set_centres(weight, head)
    margins = md.margins(head, labels, teacher)
    assert margins.tolist() == close([0.47029331785232, 0.5, 0.481733788085862, 0.482518373267695,
                                      0.482977936629841, 0.488009403470031])
    loss, _ = md.classify(head, student, labels, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (7.30580660607649, -9.4070096880256, 8.45282507530399,
                                        [-1.179798598572989, 0.638285810182488, -1.383875566443233]))


def test_cc_matches_tface():
    """Source: Tencent/TFace @ 82c9cbbf77af427e6301e5eb9e6d76ea3038d0a1, recognition/tasks/ekd/distillation/cc.py,
    CC(gamma=0.4, P_order=2) (F.mse_loss of the two Taylor-expanded correlation matrices) on relational_inputs();
    gradient w.r.t. the student. Ours: `cc` with its defaults (gamma 0.4, order 2)."""
    student, teacher = relational_inputs()
    loss = create_distill_loss("cc")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (0.0216394287547855, 0.00876564200914487, 0.00979572084683705,
                                        [-0.000534336740922, 0.001231498261237, 0.000742356822908]))


def test_cosine_matches_tface():
    """Source: Tencent/TFace @ 82c9cbbf77af427e6301e5eb9e6d76ea3038d0a1,
    recognition/tasks/ekd/distillation/cosine_distance.py, Cosine_distance (1 − mean cos) on seed 0: student
    randn(6, 8), then teacher randn(6, 8), float64; gradient w.r.t. the student. Ours: `cosine`."""
    torch.manual_seed(0)
    student = torch.randn(6, 8, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(6, 8, dtype=torch.float64)
    loss = create_distill_loss("cosine")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (1.22145379178774, -0.0733985586646419, 0.146314505571754,
                                        [0.031733048987393, 0.00104880539176, -0.017898444725811]))


def test_l2_matches_tface_hint_loss():
    """Source: Tencent/TFace @ 82c9cbbf77af427e6301e5eb9e6d76ea3038d0a1, recognition/tasks/ekd/distillation/fitnet.py,
    HintLoss (nn.MSELoss on the embeddings: the face-KD tables' FitNet baseline) on seed 0: student randn(6, 8),
    then teacher randn(6, 8), float64; gradient w.r.t. the student. Ours: `l2`."""
    torch.manual_seed(0)
    student = torch.randn(6, 8, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(6, 8, dtype=torch.float64)
    loss = create_distill_loss("l2")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (2.56871968730448, -0.695222765887695, 0.462666158198371,
                                        [0.03478685303704, -0.010813315986741, -0.114875798294195]))


def test_rkd_matches_lenscloth_rkd():
    """Source: lenscloth/RKD @ 21fae208ea58a60f8e273e6eeadad195e97284c2, metric/loss.py, RkdDistance and RKdAngle
    (pdist from metric/utils.py; Huber 'mean' over the whole b × b distance matrix and b³ angle tensor, the
    degenerate entries included), 25 × distance + 50 × angle, on relational_inputs(); gradient w.r.t. the student.
    Tencent/TFace @ 82c9cbb, recognition/tasks/ekd/distillation/rkd.py, RKDLoss gives the same. Ours: `rkd` with
    its defaults (pairs "all")."""
    student, teacher = relational_inputs()
    loss = create_distill_loss("rkd")(student, teacher)
    loss.backward()
    assert_matches(loss, student.grad, (3.5206080161702, -2.70616862252382e-16, 2.10973818447858,
                                        [0.670607742897541, 0.255708163604799, 0.215304871032154]))
    student, teacher = relational_inputs()  # the two parts, as the authors' two modules return them
    assert create_distill_loss("rkd", angle_weight=0.0, distance_weight=1.0)(student, teacher).item() == \
        close(0.0438043711870664)
    assert create_distill_loss("rkd", angle_weight=1.0, distance_weight=0.0)(student, teacher).item() == \
        close(0.0485099747298708)


def maps_inputs():
    """seed 3: student maps randn(2, 3, 4, 4), then teacher maps randn(2, 5, 4, 4), float64."""
    torch.manual_seed(3)
    student = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    teacher = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    return student.requires_grad_(), teacher


def test_attention_transfer_matches_szagoruyko_at_loss():
    """Source: szagoruyko/attention-transfer @ 893df5488f93691799f082a70e2521a9dc2ddf2d, utils.py, at and at_loss
    ((at(x) − at(y)).pow(2).mean(): the mean over batch × H·W positions), one stage, on maps_inputs(); gradient
    w.r.t. the student's maps, flattened per image. Ours: `attention_transfer` with its defaults (p 2, reduction
    "mean") on that one stage."""
    student, teacher = maps_inputs()
    loss = create_distill_loss("attention_transfer", stages=[0])([student], [teacher])
    loss.backward()
    assert_matches(loss, student.grad.flatten(1), (0.0361475071691385, -0.000415961398735025, 0.0118222230777887,
                                                   [0.000165142142574, -0.00074067984798, 0.000974708647082]))
