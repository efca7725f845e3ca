"""Settings of the long-running tasks, importable without torch.

The one place their defaults are written: ``glas-seg`` (argparse), the public API
(:func:`glas_seg.finetune`, :func:`glas_seg.segment`) and the widgets read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GlasSegError

#: Fraction of a tile shared with its neighbour in sliding-window inference.
DEFAULT_OVERLAP = 0.25

#: Which parameters a fine-tune trains (backend/trainable.py): all of them, everything but the
#: encoder, or only the output layer(s).
LAYER_CHOICES = ("all", "decoder", "head")


@dataclass
class FinetuneSettings:
    """Hyper-parameters of a fine-tuning run; the defaults suit a laptop CPU (under a minute on
    2 cores for the bundled gland model, docs/benchmarks.md).

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
    augment_strength : float in [0, 2]
        Scale of those transforms (1: as the bundled models were trained).
    layers : {"all", "decoder", "head"}
        Which parameters train: all, everything but the encoder, or only the output layer(s)
        (the split is a fact of each architecture, :class:`.models.Architecture`).
    l2sp : float
        Pull towards the base model's weights (L2-SP, decoupled like AdamW's weight decay:
        ``w -= lr * l2sp * (w - w_base)`` per step); 0 turns it off.
    val_fraction : float in [0, 0.9]
        Share of the images held out to validate (0: train on all, report no metrics).
        At least one image is always kept for training.
    eval_every : int
        Validate every this many iterations (and at the end).
    patience : int
        With held-out images: stop after this many validations without a better object F1 and
        keep the best checkpoint (0: run all iterations, still keep the best).
    freeze_norm : bool
        Keep the base model's batch-norm statistics (running mean and variance). Batches of a
        few crops from a few images would otherwise replace them, and the model would forget
        its original domain (see docs/finetuning.md for the measured difference).
    seed : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... (see :func:`.registry.pick_device`).
    """

    # Chosen by benchmarks/bench_finetune_cohort.py (docs/finetuning.md): on 3 images of an unseen
    # cohort, training every layer (even at lr 3e-5) made the model worse on the rest of that
    # cohort and on the original images; the output layer alone, at 1e-3, did not.
    iterations: int = 100
    learning_rate: float = 1e-3
    batch_size: int = 4
    crop_size: int = 192
    augment: bool = True
    augment_strength: float = 1.0
    layers: str = "head"
    l2sp: float = 0.0
    val_fraction: float = 0.0
    eval_every: int = 50
    patience: int = 3
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
        if self.layers not in LAYER_CHOICES:
            raise GlasSegError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {self.layers!r}")
        if not self.l2sp >= 0:
            raise GlasSegError("L2-SP strength must be 0 or more")
        if not 0 <= self.augment_strength <= 2:
            raise GlasSegError("augmentation strength must be between 0 and 2")
        if self.patience < 0:
            raise GlasSegError("patience must be 0 or more")
