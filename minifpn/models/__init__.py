"""Models: the bottom-up ResNet (C2..C5) and the FPN's top-down pathway (P2..P6)."""
from .classifier import ClassifierConfig, DigitClassifier
from .fpn import FPN, VARIANTS, LastLevelMaxPool, LastLevelP6P7
from .pooler import RoIPooler
from .resnet import BasicBlock, ResNet, resnet18, resnet_small
from .roi_head import FastRCNNHead, fast_rcnn_loss, fast_rcnn_loss_backward
from .two_stage import TwoStageConfig, TwoStageDetector

__all__ = ["ClassifierConfig", "DigitClassifier",
           "FPN", "VARIANTS", "LastLevelMaxPool", "LastLevelP6P7", "BasicBlock", "ResNet", "resnet18",
           "resnet_small", "FastRCNNHead", "fast_rcnn_loss", "fast_rcnn_loss_backward", "RoIPooler",
           "TwoStageConfig", "TwoStageDetector"]
