"""ElasticFace heads against the authors' code (issue 39: each new head agrees with its authors' numbers).

Source: fdbtrs/ElasticFace @ ea2c5af079d5a6062fd7b1d714befc5b26113c6a ("ElasticFacePlus"; unchanged at 5496ec0,
the repository's last commit), utils/losses.py, `ElasticArcFace.forward` and `ElasticCosFace.forward` (with
`plus`), under the (m, std) of config/config.py for each loss: ElasticArcFace 0.5, 0.05; ElasticArcFacePlus 0.5,
0.0175; ElasticCosFace 0.35, 0.05; ElasticCosFacePlus 0.35, 0.02; s 64; then `CrossEntropyLoss()` as train.py
applies it. Their code was re-typed and run once outside this repository on the CPU, the embeddings and kernel in
float64 (the default dtype left at float32, so their margin draw is float32, as in their training); only its
outputs are here. docs/reference_numbers.md has the recipe.

Recipe "head" (docs/reference_numbers.md): `torch.manual_seed(1)`; W = randn(10, 8); labels (0, 3, 3, 7, 9, 1);
embeddings W[labels] + 0.5·randn(6, 8); their kernel = W.T, ours = W. Their one random draw per forward is
`torch.normal(m, std, (6, 1))` on the global CPU generator: `torch.manual_seed(11)` right before their forward.
Ours draws from its own generator, seeded for its first draw with the head's `seed` (heads_elastic.draw_seed(11, 0)
= 11): the same numbers. Rows `std 0.3` run the plus variants (and one plain) with std 0.3, so that which sample
gets which margin moves the loss by more than rounding.
"""

import pytest
import torch

from distill.losses.heads import create_head
from distill.losses.heads_elastic import draw_seed


def close(expected):
    return pytest.approx(expected, rel=1e-6, abs=1e-9)


def recipe_forward(name, **options):
    """(head, loss, embeddings' gradient) of a training-mode head, seed 11, on the recipe's inputs."""
    torch.manual_seed(1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    embeddings = (weight[labels] + 0.5 * torch.randn(6, 8, dtype=torch.float64)).requires_grad_()
    head = create_head(name, 8, 10, s=64.0, seed=11, **options).double().train()
    with torch.no_grad():
        head.weight.copy_(weight)
    loss, _ = head(embeddings, labels)
    loss.backward()
    return head, loss, embeddings.grad


# (name, options) -> loss, grad sum, grad norm, grad[0, :3], centres' grad sum, centres' grad norm (their kernel's,
# transposed)
PINNED = {
    "ElasticArcFace": (("elasticface_arc", dict(m=0.5)), (
        15.53051454309211, -12.545741400900509, 9.598248589775167,
        [1.4323137321990322, 1.750001675817885, -0.3016296778726957], 9.778691909655006, 11.038477918927304)),
    "ElasticArcFacePlus": (("elasticface_arc", dict(m=0.5, plus=True)), (
        15.042637155563781, -12.79277715623389, 9.589740078021133,
        [1.4325176348866826, 1.750494680337296, -0.3006950185423263], 10.041871525076068, 10.984545350030242)),
    "ElasticCosFace": (("elasticface_cos", dict(m=0.35)), (
        13.43173359410279, -10.561269490506646, 8.098537575442343,
        [1.3716074231218711, 1.603223446339265, -0.5798981095220512], 8.031980141436348, 9.386247312102682)),
    "ElasticCosFacePlus": (("elasticface_cos", dict(m=0.35, plus=True)), (
        12.775110449275346, -10.56299669244299, 8.099476484953078,
        [1.3716070901215336, 1.603223057106938, -0.5798979687337589], 8.032327211923388, 9.387291960925554)),
    "ElasticArcFace std 0.3": (("elasticface_arc", dict(m=0.5, std=0.3)), (
        18.36783979237089, -8.870565489480597, 8.671461761669967,
        [1.4210291330742455, 1.7227173013684305, -0.3533565659535819], 6.934762177957963, 10.542337578366377)),
    "ElasticArcFacePlus std 0.3": (("elasticface_arc", dict(m=0.5, std=0.3, plus=True)), (
        12.43866118327478, -20.878312811402402, 11.467788934128093,
        [1.4213949483023498, 1.723630035691572, -0.3515664778555397], 14.460620619167535, 12.613566180261245)),
    "ElasticCosFacePlus std 0.3": (("elasticface_cos", dict(m=0.35, std=0.3, plus=True)), (
        10.603741906543917, -16.322513942186383, 9.253358486636973,
        [1.2816030169430856, 1.498020476577523, -0.5418453955224894], 8.588238866834198, 10.174264515861642)),
}


@pytest.mark.parametrize("loss_name", sorted(PINNED))
def test_elasticface_matches_the_authors_losses_py(loss_name):
    (name, options), (value, grad_sum, grad_norm, first, weight_sum, weight_norm) = PINNED[loss_name]
    head, loss, grad = recipe_forward(name, **options)
    assert loss.item() == close(value)
    assert grad.sum().item() == close(grad_sum) and grad.norm().item() == close(grad_norm)
    assert grad[0, :3].tolist() == close(first)
    assert head.weight.grad.sum().item() == close(weight_sum)
    assert head.weight.grad.norm().item() == close(weight_norm)
    assert head.draws == 1  # one draw per training forward


def test_the_draw_is_the_authors_torch_normal_and_their_config_std():
    """Their draw after torch.manual_seed(11), std 0.3 (m 0.5): the same six float32 numbers as our first draw."""
    head = create_head("elasticface_arc", 8, 10, seed=11, std=0.3)
    assert draw_seed(11, 0) == 11
    assert head.draw_margins(6).tolist() == close([0.7212888598442078, 1.083778738975525, 0.29013752937316895,
                                                    0.10931078344583511, 0.3460213541984558, 0.4191141426563263])
    stds = {(name, plus): create_head(name, 8, 10, plus=plus).std
            for name in ("elasticface_arc", "elasticface_cos") for plus in (False, True)}
    assert stds == {("elasticface_arc", False): 0.05, ("elasticface_arc", True): 0.0175,
                    ("elasticface_cos", False): 0.05, ("elasticface_cos", True): 0.02}


def test_plus_hands_out_the_sorted_margins_as_the_authors_code_does():
    """ElasticArcFacePlus, std 0.3: the margin each sample got in their m_hot (recovered from their logits as
    acos(logit/64) − acos(cos θ_y)). Their target cosines, highest first, are samples 1, 4, 3, 2, 5, 0; sample i
    gets the sorted margin at position order[i] (`plus_pairing: code`), not the i-th highest cosine the i-th
    smallest margin (`ranked`, sample 1 would get 0.109)."""
    head = create_head("elasticface_arc", 8, 10, seed=11, std=0.3, plus=True).double()
    torch.manual_seed(1)
    weight = torch.randn(10, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 7, 9, 1])
    embeddings = weight[labels] + 0.5 * torch.randn(6, 8, dtype=torch.float64)
    cosine = torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(weight).T
    margins = head._paired(head.draw_margins(6).double(), cosine, labels)
    assert margins.tolist() == close([0.29013752937316895, 0.7212888598442078, 0.4191141426563263,
                                      0.3460213541984558, 1.083778738975525, 0.10931078344583511])
