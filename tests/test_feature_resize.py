"""The resizes of the feature-map losses (distill/losses/features.py: `resize`): F.adaptive_avg_pool2d's and
bilinear F.interpolate's numbers and gradients at the sizes fitnet and attention transfer meet, through ops whose
backward is deterministic on CUDA (the CPU cannot prove CUDA's determinism; gpu_check's deterministic run does)."""

import pytest
import torch
import torch.nn.functional as F

from distill.losses.features import AttentionTransfer, FitNet, resize

SIZES = [((7, 7), (14, 14)), ((14, 14), (7, 7)), ((8, 8), (4, 4)), ((5, 5), (3, 3)), ((7, 5), (3, 9)), ((4, 4), (1, 1))]
TORCH = {"pool": F.adaptive_avg_pool2d,
         "bilinear": lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False)}


@pytest.mark.parametrize("mode", ["pool", "bilinear"])
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_resize_gives_torchs_values_and_gradients(mode, size_in, size_out):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size_in, requires_grad=True)
    mine, theirs = resize(x, size_out, mode), TORCH[mode](x, size_out)
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(theirs)
    (g_mine,) = torch.autograd.grad((mine * weights).sum(), x)
    (g_theirs,) = torch.autograd.grad((theirs * weights).sum(), x)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)


def _ops(loss: torch.Tensor) -> set:
    """The names of the backward nodes in `loss`'s graph."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(fn for fn, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_feature_losses_of_unequal_maps_backpropagate_under_deterministic_algorithms():
    """No UpsampleBilinear2d or AdaptiveAvgPool2d backward (nondeterministic on CUDA) in either loss's graph,
    and the backward runs with torch.use_deterministic_algorithms(True) (on the CPU)."""
    torch.manual_seed(0)
    fit = FitNet(stages=(0,))
    fit.build([4], [6])
    s, t = torch.randn(2, 4, 7, 7, requires_grad=True), torch.randn(2, 6, 14, 14)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for loss in (fit([s], [t]), AttentionTransfer(stages=(0,))([s], [t[:, :, :5, :5]])):
            ops = _ops(loss)
            assert not {op for op in ops if "Upsample" in op or "AdaptiveAvgPool" in op}, ops
            loss.backward()
            assert torch.isfinite(s.grad).all()
    finally:
        torch.use_deterministic_algorithms(before)
