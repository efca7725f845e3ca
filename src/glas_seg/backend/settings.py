"""Settings of the long-running tasks, importable without torch.

The one place their defaults are written: ``glas-seg`` (argparse), the public API
(:func:`glas_seg.finetune`, :func:`glas_seg.segment`) and the widgets read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GlasSegError

#: Fraction of a tile shared with its neighbour in sliding-window inference.
DEFAULT_OVERLAP = 0.25


@dataclass
class FinetuneSettings:
    """Hyper-parameters of a fine-tuning run; the defaults suit a laptop CPU.

    Attributes
    ----------
    iterations : int
        Optimizer steps.
    learning_rate : float
        Peak learning rate (AdamW), after a short warm-up, decayed with a cosine schedule.
    batch_size, crop_size : int
        Crops per step and their side, in pixels at the model's working scale.
    augment : bool
        Random flips, rotations, elastic, colour and stain jitter of the crops.
    val_fraction : float in [0, 0.9]
        Share of the images held out to validate (0: train on all, report no metrics).
        At least one image is always kept for training.
    eval_every : int
        Validate every this many iterations (and at the end).
    freeze_norm : bool
        Keep the base model's batch-norm statistics (running mean and variance). Batches of a
        few crops from a few images would otherwise replace them, and the model would forget
        its original domain (see docs/finetuning.md for the measured difference).
    seed : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... (see :func:`.registry.pick_device`).
    """

    iterations: int = 200
    learning_rate: float = 3e-4
    batch_size: int = 4
    crop_size: int = 192
    augment: bool = True
    val_fraction: float = 0.0
    eval_every: int = 50
    freeze_norm: bool = True
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise GlasSegError("iterations must be at least 1")
        if not 0 < self.learning_rate < 1:
            raise GlasSegError("learning rate must be between 0 and 1")
        if self.batch_size < 1 or self.crop_size < 32:
            raise GlasSegError("batch size must be at least 1 and crop size at least 32")
        if not 0 <= self.val_fraction <= 0.9:
            raise GlasSegError("validation share must be between 0 and 0.9")
        if self.eval_every < 1:
            raise GlasSegError("eval_every must be at least 1")
