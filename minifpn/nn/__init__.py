"""Modules: Parameter, Module and the layers the FPN is built from."""
from . import init
from .layers import BatchNorm2d, Conv2d, FrozenBatchNorm2d, Linear, MaxPool2d, ReLU, SyncBatchNorm2d, Upsample
from .module import BackwardBeforeForward, Module, ModuleList, Parameter, Sequential

__all__ = ["BackwardBeforeForward", "BatchNorm2d", "Conv2d", "FrozenBatchNorm2d", "Linear", "MaxPool2d",
           "Module", "ModuleList", "Parameter", "ReLU", "Sequential", "SyncBatchNorm2d", "Upsample", "init"]
