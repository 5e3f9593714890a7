"""Shared by tests/test_reference_{adaface,curricularface,magface}.py: the inputs their reference script made (outside
the repository, ref39/h8_heads_ref.py, the authors' heads re-typed and run in float64), and the pinned checks."""

import torch


def inputs(norms):
    """As the reference script makes them: seed 0, x = randn(6, 8) at row norms `norms`, kernel = randn(8, 10)
    (their layout: our weight is its transpose), labels [0, 3, 3, 7, 9, 1]; float64."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.tensor(norms, dtype=torch.float64).unsqueeze(1)
    kernel = torch.randn(8, 10, dtype=torch.float64)
    return x, kernel, torch.tensor([0, 3, 3, 7, 9, 1])


def check(t: torch.Tensor, pinned: dict) -> None:
    t = t.detach().reshape(-1)
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t.sum().item(), pinned["sum"], **close)
    torch.testing.assert_close(t.norm().item(), pinned["norm"], **close)
    torch.testing.assert_close(t[:4].tolist(), pinned["first"], **close)


def steps(head, x, labels, count):
    """`count` training steps on the same inputs: (loss, grad of x, grad of the weight, head_state) after each."""
    out = []
    for _ in range(count):
        xx = x.clone().requires_grad_(True)
        head.weight.grad = None
        loss, _ = head(xx, labels)
        loss.backward()
        out.append((loss.item(), xx.grad, head.weight.grad.clone(), head.head_state()))
    return out
