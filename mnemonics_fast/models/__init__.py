from .cosine import CosineLinear, SplitCosineLinear, grow_head, imprint_weights
from .incremental import IncrementalNet, NetOutput, build_model
from .resnet_cifar import resnet32
from .resnet_imagenet import resnet18
from .transfer import TransferConv2d, apply_weight_transfer

__all__ = ["CosineLinear", "SplitCosineLinear", "grow_head", "imprint_weights", "IncrementalNet", "NetOutput",
           "build_model", "resnet32", "resnet18", "TransferConv2d", "apply_weight_transfer"]
