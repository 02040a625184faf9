"""Models: the bottom-up ResNet (C2..C5) and the FPN's top-down pathway (P2..P6)."""
from .fpn import FPN, VARIANTS, LastLevelMaxPool, LastLevelP6P7
from .resnet import BasicBlock, ResNet, resnet18, resnet_small

__all__ = ["FPN", "VARIANTS", "LastLevelMaxPool", "LastLevelP6P7", "BasicBlock", "ResNet", "resnet18",
           "resnet_small"]
