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
#: What a fine-tune may be asked for: those, or "auto" (:meth:`FinetuneSettings.resolve`).
# "none": no weight changes at all, only the post-processing thresholds (``calibrate``).
FINETUNE_LAYER_CHOICES = ("auto", *LAYER_CHOICES, "none")

#: "auto" trains every layer when the corrected images hold at least this many objects, else only
#: the head. Measured (docs/finetuning.md): 3 GlaS images (about 30 glands) lost object F1 on the
#: rest of their cohort when every layer trained and gained a little with the head alone; 3 TNBC
#: tiles (hundreds of nuclei) gained most with every layer trained.
AUTO_ALL_LAYERS_MIN_OBJECTS = 100
#: Learning rates "auto" uses: every layer at 3e-4 (the earlier default) or even 1e-4 overfitted
#: three images within 100 steps; the head alone takes a larger rate. 3e-4 for the head was
#: measured on the default gland model (1e-3 there lost 0.056 object F1 on the cohort, 3e-4 with
#: calibration gained 0.022; docs/finetuning.md).
AUTO_LEARNING_RATE = {"head": 3e-4, "decoder": 3e-5, "all": 3e-5, "none": 0.0}


@dataclass
class FinetuneSettings:
    """Hyper-parameters of a fine-tuning run; the defaults suit a laptop CPU (under a minute on
    2 cores for the bundled gland model, docs/benchmarks.md).

    Attributes
    ----------
    iterations : int
        Optimizer steps.
    learning_rate : float or None
        Peak learning rate (AdamW), after a short warm-up, decayed with a cosine schedule;
        None picks one for the layers that train (``AUTO_LEARNING_RATE``).
    batch_size, crop_size : int
        Crops per step and their side, in pixels at the model's working scale.
    augment : bool
        Random flips, rotations, elastic, colour and stain jitter of the crops.
    augment_strength : float in [0, 2]
        Scale of those transforms (1: as the bundled models were trained).
    layers : {"auto", "all", "decoder", "head"}
        Which parameters train: all, everything but the encoder, or only the output layer(s)
        (the split is a fact of each architecture, :class:`.models.Architecture`); "auto": all
        when the corrected images hold ``AUTO_ALL_LAYERS_MIN_OBJECTS`` objects or more, else the head;
        "none": the weights stay the base model's (with ``calibrate``: thresholds only).
    calibrate : bool or None
        After training, choose the watershed thresholds on the corrected training images
        (:func:`.calibrate.calibrate_thresholds`; pixel classifiers only). None (auto): only
        with ``layers="none"`` (thresholds are then all that changes). Not when layers train:
        measured on the default gland model's malignant cohort (docs/finetuning.md), the head
        with thresholds gained -0.005 object F1 and lost 0.013 on the original images, without
        +0.003 and -0.003; every layer with thresholds -0.012 on TNBC: a network that trained
        on the corrected images looks surer on them than on the rest of the cohort.
    calibrate_min_size : bool
        With ``calibrate``: also choose the smallest object kept, from a quarter to twice the
        base model's own (:data:`.calibrate.FINETUNE_MIN_SIZE_FACTORS`).
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
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with momentum 0.9 (each weight moves in proportion to its gradient,
        where Adam moves all of them by about the learning rate; docs/finetuning.md).
    replay_share : float in [0, 0.95]
        With replay images (``finetune(replay=...)``, ``--replay``: images of the data the base
        model was trained on): the share of training crops drawn from them, the rest from the
        corrected images. Replay keeps the original domain in every batch while the corrected
        images pull the model towards the new one.
    seed : int
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... (see :func:`.registry.pick_device`).
    """

    # Chosen by benchmarks/bench_finetune_cohort.py (docs/finetuning.md), as are "auto" and its rates.
    iterations: int = 100
    learning_rate: float | None = None
    batch_size: int = 4
    crop_size: int = 192
    augment: bool = True
    augment_strength: float = 1.0
    layers: str = "auto"
    l2sp: float = 0.0
    val_fraction: float = 0.0
    eval_every: int = 50
    patience: int = 3
    freeze_norm: bool = True
    calibrate: bool | None = None
    calibrate_min_size: bool = False
    replay_share: float = 0.5
    optimizer: str = "adamw"
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise GlasSegError("iterations must be at least 1")
        if self.learning_rate is not None and not 0 < self.learning_rate < 1:
            raise GlasSegError("learning rate must be between 0 and 1 (or None: chosen for the layers)")
        if self.batch_size < 1 or self.crop_size < 32:
            raise GlasSegError("batch size must be at least 1 and crop size at least 32")
        if not 0 <= self.val_fraction <= 0.9:
            raise GlasSegError("validation share must be between 0 and 0.9")
        if self.eval_every < 1:
            raise GlasSegError("eval_every must be at least 1")
        if self.layers not in FINETUNE_LAYER_CHOICES:
            raise GlasSegError(f"layers must be one of {', '.join(FINETUNE_LAYER_CHOICES)}, not {self.layers!r}")
        if not self.l2sp >= 0:
            raise GlasSegError("L2-SP strength must be 0 or more")
        if not 0 <= self.augment_strength <= 2:
            raise GlasSegError("augmentation strength must be between 0 and 2")
        if self.optimizer not in ("adamw", "sgd"):
            raise GlasSegError(f"optimizer must be adamw or sgd, not {self.optimizer!r}")
        if not 0 <= self.replay_share <= 0.95:
            raise GlasSegError("replay share must be between 0 and 0.95 (some crops must come from the corrected images)")
        if self.patience < 0:
            raise GlasSegError("patience must be 0 or more")
        if self.layers == "none" and self.calibrate is False:
            raise GlasSegError('layers "none" changes nothing without calibration: turn calibration on or train some layers')

    def resolve(self, n_objects: int) -> tuple[str, float]:
        """The layers that train and the learning rate, "auto" and None decided.

        Parameters
        ----------
        n_objects : int
            Objects in the corrected training images (inside their corrected regions).
        """
        layers = self.layers
        if layers == "auto":
            layers = "all" if n_objects >= AUTO_ALL_LAYERS_MIN_OBJECTS else "head"
        rate = self.learning_rate if self.learning_rate is not None else AUTO_LEARNING_RATE[layers]
        return layers, rate

    def resolve_calibrate(self, layers: str) -> bool:
        """Whether to choose thresholds, "auto" (None) decided for the layers that train."""
        return self.calibrate if self.calibrate is not None else layers == "none"
