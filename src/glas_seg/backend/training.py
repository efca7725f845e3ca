"""Training core shared by `glas-seg train`, fine-tuning and the napari widget.

A run writes into one folder: ``last.safetensors`` (model), ``last_optimizer.pt`` (optimizer
and schedule, loaded with ``weights_only=True``), ``state.json`` (iteration, history) and
``best.safetensors`` (best validation object F1). Every file is replaced atomically, so a run
killed at any moment resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from .checkpoint import ModelConfig, atomic_write, load_state, save_model
from .data import PatchDataset, Sample, rescale_sample
from .inference import Cancelled, _should_stop, segment
from .metrics import match_stack, object_scores, pixel_dice
from .models import get_architecture, pretrained_encoder_state
from .registry import LoadedModel, build_model, pick_device
from . import distributed
from .threads import loader_workers, use_torch_threads
from .trainable import StartingPointDecay, select_trainable, trainable_names
from .errors import GlasSegError
from .model_schema import check_config
from .validate import check_label_ids, check_train_settings
from .run_start import check_resume, resumable


@dataclass
class TrainSettings:
    """Hyper-parameters of a training run (all have working defaults for GlaS on a CPU)."""

    iterations: int = 4000
    eval_every: int = 250
    batch_size: int = 8
    crop_size: int = 192
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # or "amsgrad", or "sgd" (momentum 0.9): make_optimizer
    warmup: int = 100
    boundary_weight: float = 3.0
    # Extra cross-entropy weight on background in narrow gaps between objects (gap_mask, gaps
    # up to 2 * gap_radius working pixels wide): where touching glands fuse. 0 = off.
    gap_weight: float = 0.0
    gap_radius: int = 4
    dice_weight: float = 1.0
    aux_weight: float = 0.4
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    freeze_norm: bool = False  # keep batch-norm statistics fixed (fine-tuning on a few images)
    glass: float = 0.0  # share of crops given a tissue edge next to blank glass (augment.glass_edge)
    glass_fill: float = 0.0  # share of those whose glass is mirror-filled as segmentation does (unscored)
    # At every validation, first choose the smallest object kept on the training images
    # (choose_min_size), then validate with it: checkpoints are compared as they will segment.
    choose_min_size: bool = False
    pretrained: bool = True  # start the encoder from ImageNet weights where the architecture has them
    # Fine-tuning (backend/trainable.py): which parameters train ("all", "decoder", "head"), decay
    # towards the starting weights instead of zero (L2-SP, 0 = off), augmentation strength (1 =
    # training's), and early stopping after this many validations without a better object F1 (0 = off).
    layers: str = "all"
    l2sp: float = 0.0
    augment_strength: float = 1.0
    patience: int = 0
    # Learning rate of the encoder (architecture's encoder_params) relative to learning_rate:
    # below 1 keeps pretrained features closer to ImageNet's on a small training set.
    encoder_lr_factor: float = 1.0
    # Data-loading processes; None picks them for the device (threads.loader_workers).
    loader_workers: int | None = None

    def __post_init__(self) -> None:
        check_train_settings(self)  # GlasSegError for values that cannot train (iterations 0...)


@dataclass
class TrainState:
    iteration: int = 0
    best_object_f1: float = -1.0
    history: list = field(default_factory=list)
    wall_seconds: float = 0.0


def gap_mask(target: torch.Tensor, radius: int) -> torch.Tensor:
    """Background pixels in narrow gaps between objects (and narrow notches of one object).

    A morphological closing of the foreground (interior or boundary) with a square of side
    ``2 * radius + 1`` fills gaps up to about ``2 * radius`` pixels wide; the background it fills
    is the gap. Torch max-pooling does the closing, so it runs on the loss's device. This is the
    cheap cousin of the U-Net paper's separation weight map (Ronneberger et al. 2015), which needs
    per-object distance transforms; like it, it weights the background between close objects,
    where a network that fills the gap fuses two glands into one.

    Parameters
    ----------
    target : int64 tensor ``(N, H, W)``
        0 background, 1 interior, 2 boundary, -1 ignored (counts as not foreground).
    radius : int
        Half the widest gap marked, in pixels of ``target``.

    Returns
    -------
    bool tensor ``(N, H, W)``
    """
    if radius < 1:
        return torch.zeros_like(target, dtype=torch.bool)
    foreground = (target > 0).float().unsqueeze(1)
    size = 2 * radius + 1
    dilated = F.max_pool2d(foreground, size, stride=1, padding=radius)
    closed = -F.max_pool2d(-dilated, size, stride=1, padding=radius)
    return (closed[:, 0] > 0) & (target == 0)


def contour_loss(logits: torch.Tensor, target: torch.Tensor, boundary_weight: float, dice_weight: float,
                 gap_weight: float = 0.0, gap_radius: int = 4) -> torch.Tensor:
    """Weighted cross-entropy plus soft Dice on the interior and boundary classes.

    Parameters
    ----------
    logits : float tensor ``(N, 3, H, W)``
    target : int64 tensor ``(N, H, W)``; -1 marks ignored pixels
    boundary_weight : float
        Cross-entropy weight of the boundary class (the others weigh 1).
    dice_weight : float
        Weight of the soft Dice term (0: cross-entropy only).
    gap_weight, gap_radius
        Background pixels in gaps between objects (:func:`gap_mask`) weigh ``1 + gap_weight``
        in the cross-entropy; 0 leaves the loss as without them.
    """
    weights = torch.tensor([1.0, 1.0, boundary_weight], device=logits.device)
    if gap_weight > 0:
        per_pixel = F.cross_entropy(logits.float(), target, ignore_index=-1, reduction="none")
        pixel_weight = weights[target.clamp_min(0)] * (target >= 0)
        pixel_weight = pixel_weight * (1 + gap_weight * gap_mask(target, gap_radius))
        ce = (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-6)
    else:
        ce = F.cross_entropy(logits.float(), target, weight=weights, ignore_index=-1)
    if dice_weight == 0:
        return ce
    valid = (target >= 0).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)[1:]
    denominator = (probs + onehot).sum(dims)[1:]
    dice = (2 * intersection + 1) / (denominator + 1)
    return ce + dice_weight * (1 - dice.mean())


def training_loss(output, target: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """Loss of a network's training-mode output.

    Networks with auxiliary heads (deep supervision) return ``{"out": logits, "aux": [logits, ...]}``
    in training mode; each auxiliary head is scored against the same target (upsampled to the
    target's size) and their mean is added with weight ``settings.aux_weight``.
    """
    weights = dict(boundary_weight=settings.boundary_weight, dice_weight=settings.dice_weight,
                   gap_weight=settings.gap_weight, gap_radius=settings.gap_radius)
    if isinstance(output, torch.Tensor):
        return contour_loss(output, target, **weights)
    loss = contour_loss(output["out"], target, **weights)
    aux = output.get("aux") or []
    if aux:
        aux_losses = [
            contour_loss(F.interpolate(a, size=target.shape[-2:], mode="bilinear", align_corners=False)
                         if a.shape[-2:] != target.shape[-2:] else a, target, **weights)
            for a in aux
        ]
        loss = loss + settings.aux_weight * torch.stack(aux_losses).mean()
    return loss


def evaluate(model: LoadedModel, samples: list[Sample], masks: list[np.ndarray | None] | None = None,
             cancel=None, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Segment full-resolution samples and score them.

    Parameters
    ----------
    model : LoadedModel
    samples : list of Sample
    masks : list of (bool ndarray ``(H, W)`` or None), optional
        Per sample, where its labels were corrected (fine-tuning's held-back regions): objects
        are scored only there, predictions elsewhere are cleared as the labels are.
    cancel : threading.Event or callable, optional
        Checked before every image; :class:`Cancelled` is raised when set.
    progress : callable ``progress(done, total)``, optional
        Called after every image.

    Returns
    -------
    dict with ``pixel_dice`` (mean per image), ``object_f1`` (mean per image), and pooled over
    all images as the GlaS challenge does: ``object_f1_pooled``, ``object_dice`` and
    ``object_hausdorff`` (pixels; ``inf`` when some image has objects on one side only).
    """
    dices, f1s, matches = [], [], []
    masks = [None] * len(samples) if masks is None else masks
    for sample, mask in zip(samples, masks, strict=True):
        if _should_stop(cancel):
            raise Cancelled()
        labels = segment(model, sample.image).labels
        if mask is not None:
            labels = np.where(mask, labels, 0)
        image_matches = match_stack(labels, sample.labels)
        matches += image_matches
        f1s.append(object_scores(image_matches)["object_f1"])
        dices.append(pixel_dice(labels, sample.labels))
        if progress is not None:
            progress(len(dices), len(samples))
    pooled = object_scores(matches)
    return {
        "pixel_dice": float(np.mean(dices)),
        "object_f1": float(np.mean(f1s)),
        "object_f1_pooled": pooled["object_f1"],
        "object_dice": pooled["object_dice"],
        "object_hausdorff": pooled["object_hausdorff"],
    }


def set_train_mode(network: torch.nn.Module, freeze_norm: bool = False) -> None:
    """Put a network in training mode; with ``freeze_norm`` its batch-norm layers stay in eval mode.

    Frozen batch norm keeps the running mean and variance learnt on the full data set, which
    small fine-tuning batches from a few images would otherwise overwrite (the model then
    forgets the original domain); the layers' scale and shift are still trained.
    """
    network.train()
    if freeze_norm:
        for module in network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def parameter_groups(network: torch.nn.Module, architecture: str, settings: TrainSettings) -> list[dict]:
    """The optimizer's parameter groups: one, or with ``encoder_lr_factor`` != 1 the rest first
    (its learning rate is the one reported) and the encoder second at the scaled rate.

    One group when the factor is 1, so that runs started before the option resume as they were.
    """
    if settings.encoder_lr_factor == 1:
        return [{"params": list(network.parameters())}]
    named = dict(network.named_parameters())
    rest = set(trainable_names(architecture, named, "decoder"))  # fine-tuning's rule for "not the encoder"
    return [{"params": [p for n, p in named.items() if n in rest]},
            {"params": [p for n, p in named.items() if n not in rest],
             "lr": settings.learning_rate * settings.encoder_lr_factor}]


def make_optimizer(groups: list[dict], settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW (optionally AMSGrad), or SGD with momentum 0.9 (``settings.optimizer == "sgd"``).

    Adam moves every parameter by about the learning rate per step whatever the size of its
    gradient, so on a few images all 3.8 M weights of a network drift together; SGD moves each in
    proportion to its gradient, the classic way to fine-tune every layer of a CNN.
    """
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.learning_rate, momentum=0.9, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                             amsgrad=settings.optimizer == "amsgrad")


def _schedule(settings: TrainSettings) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.iterations - settings.warmup)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(
    config: ModelConfig,
    settings: TrainSettings,
    train_samples: list[Sample],
    val_samples: list[Sample],
    out_dir: str | Path,
    init_state: dict | None = None,
    valid_masks: list[np.ndarray] | None = None,
    progress: Callable[[dict], None] | None = None,
    cancel=None,
    val_masks: list[np.ndarray | None] | None = None,
    sample_weights: list[float] | None = None,
) -> tuple[LoadedModel, TrainState]:
    """Train (or resume training) a model and keep its best checkpoint.

    Parameters
    ----------
    config : ModelConfig
        Architecture and working scale of the model; stored with the weights.
    train_samples, val_samples : list of Sample
        Full-resolution images and instance labels; ``val_samples`` may be empty.
    out_dir : path
        Run folder; an existing run there with the same settings is resumed.
    init_state : dict, optional
        Starting weights (fine-tuning); ignored when resuming.
    valid_masks : list of bool ndarray, optional
        Per training sample, where its labels are trustworthy; elsewhere the loss ignores pixels.
    val_masks : list of (bool ndarray or None), optional
        Per validation sample, where its labels hold (:func:`evaluate`).
    sample_weights : list of float, optional
        Per training sample, how often its crops are drawn relative to the others (uniform by default).
    progress : callable(dict), optional
        Called after every iteration with ``iteration``, ``total``, ``loss``, ``lr`` and, after
        each validation, the validation metrics.
    cancel : threading.Event or callable, optional
        Checked every iteration; :class:`Cancelled` is raised when set. Checkpoints already
        written stay valid.

    Returns
    -------
    model : LoadedModel
        The final model (eval mode).
    state : TrainState
    """
    check_config(config)  # scale 0, wrong class names...: refused before anything is written
    check_min_size_choice(config, settings)
    check_loader_workers(settings)
    check_resume(out_dir, settings)
    for sample in [*train_samples, *val_samples]:
        check_label_ids(sample.labels, sample.name)  # negative ids would make wrong targets silently
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(settings.device)
    # Under torchrun: join the process group, one GPU per process (backend/distributed.py); else None.
    ddp = distributed.setup(device)
    device = ddp.device if ddp is not None else device
    if device.type == "cpu":
        use_torch_threads()  # physical cores not busy elsewhere (backend/threads.py)
    torch.manual_seed(settings.seed)
    network = build_model(config).to(device)
    optimizer = make_optimizer(parameter_groups(network, config.architecture, settings), settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    state = TrainState()
    state_file = out_dir / "state.json"
    if resumable(out_dir):
        try:
            weights, saved_config = load_state(out_dir / "last.safetensors")
            network.load_state_dict(weights)
            extra = torch.load(out_dir / "last_optimizer.pt", map_location=device, weights_only=True)
            optimizer.load_state_dict(extra["optimizer"])
            scheduler.load_state_dict(extra["scheduler"])
            state = TrainState(**json.loads(state_file.read_text())["state"])
            # Where the run started from, and the input normalisation that came with it (--init),
            # are the first command's, not this one's.
            config = dataclasses.replace(config, mean=saved_config.mean, std=saved_config.std, training={
                **{k: v for k, v in config.training.items() if k != "initialised_from"},
                **{k: v for k, v in saved_config.training.items() if k == "initialised_from"}})
        except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            # A damaged, foreign or non-weights-only file (never unpickled), or a run of another model.
            # The exception's own text is left out: torch's suggests weights_only=False, which would
            # run whatever code a planted file holds.
            raise GlasSegError(f"The run folder {out_dir} cannot be resumed: its saved state is damaged, not "
                               f"weights-only, or from a different model ({type(exc).__name__}); "
                               f"start a new run with another --out, or delete {out_dir}") from None
    elif init_state is not None:
        network.load_state_dict(init_state)
    elif settings.pretrained:
        encoder = pretrained_encoder_state(config.architecture, network)
        if encoder is not None:
            network.load_state_dict(encoder, strict=False)
    # Frozen parameters get no gradient, so AdamW (built above over all of them) skips them.
    trainable = select_trainable(network, config.architecture, settings.layers)
    pull = StartingPointDecay(trainable, settings.l2sp, start=init_state)

    scale = config.scale
    small = [rescale_sample(s, scale) for s in train_samples]
    masks = None
    if valid_masks is not None:
        masks = [rescale_sample(Sample("", s.image, m.astype(np.uint8)), scale).labels.astype(bool)
                 for s, m in zip(train_samples, valid_masks)]
    # Networks that predict instances (Mask R-CNN) take instance labels and return their own loss.
    predicts_instances = get_architecture(config.architecture).predicts_instances
    dataset = PatchDataset(small, settings.crop_size, config.mean, config.std,
                           settings.augment_strength if settings.augment else 0.0,
                           seed=settings.seed + state.iteration, valid_masks=masks,
                           targets="instances" if predicts_instances else "contours",
                           contour_mode=config.targets, glass=settings.glass,
                           glass_fill=settings.glass_fill, sample_weights=sample_weights)
    if ddp is None:
        workers = settings.loader_workers
        workers = loader_workers(device.type) if workers is None else workers
        # The batches depend on the number of workers (each has its own stream): record it.
        config = dataclasses.replace(config, training={**config.training, "loader_workers": workers})
        batches = iter(torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers,
                                                   pin_memory=device.type == "cuda",
                                                   prefetch_factor=4 if workers else None))
    else:  # this process's share of the global batch: the same batches whatever the number of processes
        batches = distributed.slot_batches(dataset, distributed.rank_slots(settings.batch_size, ddp),
                                           settings.seed + state.iteration)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    started = time.perf_counter() - state.wall_seconds

    def checkpoint(metrics: dict | None, best_config: ModelConfig) -> None:
        if ddp is not None and not ddp.is_main:  # rank 0 writes; the others only keep the score
            if metrics is not None:
                state.best_object_f1 = max(state.best_object_f1, metrics["object_f1"])
            return
        state.wall_seconds = time.perf_counter() - started
        record = replace_training(config, settings, state, len(train_samples), len(val_samples))
        save_model(out_dir / "last.safetensors", network, record)
        atomic_write(out_dir / "last_optimizer.pt",
                     lambda tmp: torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp))
        # Without validation data the latest weights are the best we know of.
        if metrics is None or metrics["object_f1"] > state.best_object_f1:
            state.best_object_f1 = metrics["object_f1"] if metrics else state.best_object_f1
            record = replace_training(best_config, settings, state, len(train_samples), len(val_samples), best=metrics)
            save_model(out_dir / "best.safetensors", network, record)
        atomic_write(state_file, lambda tmp: Path(tmp).write_text(json.dumps({"state": asdict(state), "settings": asdict(settings)}, indent=1)))

    set_train_mode(network, settings.freeze_norm)
    # DistributedDataParallel averages gradients across processes; `network` stays the plain module
    # that is validated and saved.
    forward = network if ddp is None else distributed.wrap(network, ddp, find_unused=predicts_instances)
    running = None
    stale = 0  # validations since the best one (early stopping)
    while state.iteration < settings.iterations:
        if _should_stop(cancel):
            raise Cancelled()
        images, targets = next(batches)
        images, targets = images.to(device), targets.to(device)
        with torch.autocast(device.type, enabled=use_amp):
            if predicts_instances:
                loss = forward(images, targets)["loss"]
            else:
                loss = training_loss(forward(images), targets, settings)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        pull.step(scheduler.get_last_lr()[0])
        scheduler.step()
        state.iteration += 1
        value = loss.item()
        # A batch whose crops are all unknown pixels (fine-tuning on small regions) has a NaN
        # loss and zero gradients: it teaches nothing and must not poison the running mean.
        if math.isfinite(value):
            running = value if running is None else 0.95 * running + 0.05 * value
        event = {"iteration": state.iteration, "total": settings.iterations, "loss": running if running is not None else value,
                 "lr": scheduler.get_last_lr()[0]}
        at_eval = state.iteration % settings.eval_every == 0 or state.iteration == settings.iterations
        if at_eval:
            metrics, validated = None, config
            if val_samples:
                network.eval()
                if settings.choose_min_size:
                    choice = choose_min_size(LoadedModel(network, config, device), train_samples, cancel=cancel)
                    validated = dataclasses.replace(config, min_size=choice["min_size"],
                                                    training={**config.training, "min_size_choice": choice})
                    event["min_size"] = choice["min_size"]
                metrics = evaluate(LoadedModel(network, validated, device), val_samples, val_masks, cancel=cancel)
                set_train_mode(network, settings.freeze_norm)
                event.update(metrics)
                stale = 0 if metrics["object_f1"] > state.best_object_f1 else stale + 1
                if settings.patience and stale >= settings.patience and state.iteration < settings.iterations:
                    event["stopped_early"] = True
            state.history.append({k: v for k, v in event.items() if k != "total"})
            checkpoint(metrics, validated)
        if progress is not None:
            progress(event)
        if event.get("stopped_early"):
            break  # best.safetensors holds the best weights; the caller decides which to keep
    network.eval()
    return LoadedModel(network, config, device), state


def check_loader_workers(settings: TrainSettings) -> None:
    """GlasSegError for loader workers under torchrun (every process draws its own share of a batch)."""
    if settings.loader_workers and distributed.launched_by_torchrun():
        raise GlasSegError("loader workers are for single-process training: under torchrun every process draws "
                           "its own share of the batch itself (docs/cluster.md); leave --loader-workers out")


def check_min_size_choice(config: ModelConfig, settings: TrainSettings) -> None:
    """GlasSegError when ``settings.choose_min_size`` asks a detection model for a watershed size."""
    if settings.choose_min_size and get_architecture(config.architecture).predicts_instances:
        raise GlasSegError(f"{config.architecture} models detect objects directly: there is no watershed size "
                           "to choose; leave the smallest-object choice (--choose-min-size) out")


def replace_training(config: ModelConfig, settings: TrainSettings, state: TrainState, n_train: int, n_val: int,
                     best: dict | None = None) -> ModelConfig:
    """Copy of ``config`` whose ``training`` record describes this run so far."""
    record = dict(config.training)
    record.update({
        "iterations": state.iteration,
        "batch_size": settings.batch_size,
        "crop_size": settings.crop_size,
        "train_images": n_train,
        "val_images": n_val,
        "wall_seconds": round(state.wall_seconds, 1),
        "device": str(pick_device(settings.device)),
    })
    if best is not None:
        record["validation"] = rounded_metrics(best)
    return dataclasses.replace(config, training=record)


def rounded_metrics(metrics: dict | None) -> dict | None:
    """Metrics as stored in a model file: 4 decimals, and None for what is not finite (an
    object Hausdorff with objects on one side only), which JSON cannot hold."""
    if metrics is None:
        return None
    return {k: round(float(v), 4) if math.isfinite(float(v)) else None for k, v in metrics.items()}


def choose_min_size(model: LoadedModel, train_samples: list[Sample], *, progress=None, cancel=None) -> dict:
    """Choose the smallest object a pixel classifier keeps, on its own training images.

    Segments every training image once and keeps the size of :func:`.calibrate.min_size_grid`
    (multiples of the configured size) with the best pooled object F1 + Dice
    (:func:`.calibrate.calibrate_thresholds`; the watershed thresholds stay as configured:
    chosen on training images they did not carry over to unseen ones, docs/models.md). The
    validation images play no part, so validation stays an honest check of the choice.

    Returns
    -------
    dict
        ``min_size`` (chosen), ``chosen_on``, ``before`` / ``after`` (pooled scores at the
        configured / chosen size on the training images) and ``table`` (every size tried).

    Raises
    ------
    GlasSegError
        No training images, or a detection model (no watershed).
    """
    from .calibrate import calibrate_thresholds, min_size_grid

    if not train_samples:
        raise GlasSegError("choosing the smallest object size needs the training images")
    if get_architecture(model.config.architecture).predicts_instances:
        raise GlasSegError(f"{model.config.architecture} models detect objects directly: there is no watershed size to choose")
    size = model.config.min_size
    result = calibrate_thresholds(model, [s.image for s in train_samples], [s.labels for s in train_samples],
                                  grid=(), min_sizes=min_size_grid(size), progress=progress, cancel=cancel)
    return {"min_size": result.min_size, "chosen_on": f"{len(train_samples)} training images",
            "before": {"min_size": size, **result.before}, "after": result.after,
            "table": [{k: row[k] for k in ("min_size", "object_f1", "object_dice")} for row in result.table]}
