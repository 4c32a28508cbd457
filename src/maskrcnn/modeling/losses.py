"""Loss functions shared by the RPN and the RoI heads."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F


def box_regression_loss(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """Summed smooth-L1 (Fast R-CNN) with transition point ``beta``; plain L1 for ``beta`` ~ 0.

    torchvision uses beta = 1/9, detectron2 beta = 0 (L1); the caller divides by its normaliser.
    """
    if beta < 1e-5:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
