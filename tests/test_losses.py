"""The paper's one-vs-all hinge loss, checked by hand."""

import torch

from timm_dgate.core.losses import cross_entropy, gate_loss, multiclass_hinge


def test_hinge_matches_hand_computation():
    margins = torch.tensor([[2.0, -0.5, 0.3], [0.2, -3.0, 1.5]])
    labels = torch.tensor([0, 2])
    # sample 0: true class 0: max(0, 1-2)=0; others: max(0, 1-0.5)=0.5, max(0, 1+0.3)=1.3 -> 1.8
    # sample 1: true class 2: max(0, 1-1.5)=0; others: max(0, 1+0.2)=1.2, max(0, 1-3)=0 -> 1.2
    assert torch.isclose(multiclass_hinge(margins, labels), torch.tensor(1.5))
    assert torch.isclose(multiclass_hinge(margins, labels, reduction="sum"), torch.tensor(3.0))


def test_hinge_gradient_is_zero_past_the_margin():
    margins = torch.tensor([[1.5, -1.0, -2.0], [-1.2, -4.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    multiclass_hinge(margins, labels).backward()
    assert torch.equal(margins.grad, torch.zeros_like(margins))


def test_hinge_gradient_pushes_violators():
    margins = torch.tensor([[0.5, 0.0]], requires_grad=True)
    multiclass_hinge(margins, torch.tensor([0])).backward()
    assert margins.grad.tolist() == [[-1.0, 1.0]]  # raise the true class, lower the other


def test_gate_loss_lookup():
    assert gate_loss("hinge") is multiclass_hinge and gate_loss("ce") is cross_entropy
    try:
        gate_loss("svm")
    except ValueError as error:
        assert "hinge" in str(error)
    else:
        raise AssertionError("unknown loss accepted")
