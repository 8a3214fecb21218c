"""The affinity U-Net and its encoder, a registry by name, checkpoint I/O."""

from ssn_deploy.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ssn_deploy.models.normalization import Normalization
from ssn_deploy.models.registry import build_model
from ssn_deploy.models.unet import Encoder, ModelConfig, UNet3d

__all__ = [
    "Checkpoint",
    "Encoder",
    "ModelConfig",
    "Normalization",
    "UNet3d",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
