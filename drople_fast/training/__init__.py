"""The DroPLe method and its tools: learner, losses, trainer, protocols, data, reports, the CLI.

Imported only on demand (``import drople_fast`` does not load it): it pulls in
torchvision, PIL and tqdm, which an operator user never needs.
"""
from .export import load_prompts
from .learner import DroPLe
from .trainer import TrainConfig, train

__all__ = ["DroPLe", "TrainConfig", "load_prompts", "train"]
