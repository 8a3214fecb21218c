"""Training: data sampling + augmentation, losses, the supervised trainer (IIC to follow)."""

from ssn_deploy.training.config import Config, load_config
from ssn_deploy.training.trainer import Trainer, train

__all__ = ["Config", "Trainer", "load_config", "train"]
