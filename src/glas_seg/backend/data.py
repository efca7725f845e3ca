"""Datasets: GlaS folders, image/label folder pairs, the patient-wise split, training batches."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.transform import rescale

from .augment import Augmenter, glass_edge
from .tissue import fill_glass
from .errors import GlasSegError
from .image_io import IMAGE_SUFFIXES, natural_key, read_image, read_labels, to_float_rgb
from .labelmaps import label_files, label_stem
from .postprocess import resize_labels
from .targets import contour_targets



@dataclass
class Sample:
    """One annotated image: ``image`` float32 ``(H, W, 3)`` in [0, 1], ``labels`` int ``(H, W)``."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def find_pairs(images_dir: str | Path, labels_dir: str | Path | None = None) -> list[tuple[str, Path, Path]]:
    """Pair images with label maps by file name.

    Two layouts are understood: GlaS style, where ``X.bmp`` and ``X_anno.bmp`` (or ``_label``,
    ``_labels``, ``_mask``, ``_gt``) sit in one folder; and two folders holding files with the
    same stem (``images/X.png``, ``labels/X.tif``) or the suffixed stem.

    Returns
    -------
    list of (name, image_path, label_path), sorted naturally by name.
    """
    images_dir = Path(images_dir)
    labels_dir = Path(labels_dir) if labels_dir is not None else images_dir
    if not images_dir.is_dir():
        raise FileNotFoundError(f"No such folder: {images_dir}")
    # The rule `glas-seg evaluate` pairs by (labelmaps.label_files); in one shared folder only
    # suffixed files are labels, the others are the images.
    labels = label_files(labels_dir, plain=labels_dir != images_dir)
    pairs = [(path.stem, path, labels[path.stem]) for path in images_dir.iterdir()
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and label_stem(path.stem) is None
             and path.stem in labels]
    return sorted(pairs, key=lambda p: natural_key(p[0]))


def read_patients(grade_csv: str | Path) -> dict[str, str]:
    """Map image name -> patient id from the GlaS ``Grade.csv``."""
    with open(grade_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if k.strip().lower().startswith("patient"))
    return {row["name"].strip(): row[key].strip() for row in rows}


def patient_split(
    names: list[str], patients: dict[str, str], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split image names so that no patient is on both sides.

    Patients are shuffled with ``seed`` and given to validation until it holds at least
    ``val_fraction`` of the images. Images without a known patient go to training.

    Returns
    -------
    train_names, val_names : lists of str, each in the order of ``names``
    """
    if not 0 < val_fraction < 1:
        raise GlasSegError("val_fraction must be between 0 and 1")
    by_patient: dict[str, list[str]] = {}
    for name in names:
        if name in patients:
            by_patient.setdefault(patients[name], []).append(name)
    order = sorted(by_patient, key=natural_key)
    np.random.default_rng(seed).shuffle(order)
    target = val_fraction * len(names)
    val: set[str] = set()
    for patient in order:
        if len(val) >= target:
            break
        val.update(by_patient[patient])
    return [n for n in names if n not in val], [n for n in names if n in val]


def glas_split(glas_root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Patient-wise split of a GlaS folder (``train/`` + ``Grade.csv``) into pairs lists."""
    glas_root = Path(glas_root)
    pairs = find_pairs(glas_root / "train")
    patients = read_patients(glas_root / "Grade.csv")
    train, val = patient_split([p[0] for p in pairs], patients, val_fraction, seed)
    by_name = {p[0]: p for p in pairs}
    return [by_name[n] for n in train], [by_name[n] for n in val]


def patient_of(name: str) -> str:
    """Patient id encoded in an image name: the TCGA patient barcode (``TCGA-TSS-PPPP``) of
    TCGA-derived sets such as MoNuSeg, otherwise the image name itself (one image, one patient)."""
    parts = name.split("-")
    if len(parts) >= 3 and parts[0].upper() == "TCGA":
        return "-".join(parts[:3])
    return name


def dataset_split(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """Patient-wise split of a training folder into pairs lists.

    ``root`` is either a GlaS folder (``train/`` + ``Grade.csv``, patients from the CSV) or a
    folder of image/label pairs (or one holding such a ``train/`` folder, like MoNuSeg), whose
    patients come from the names (:func:`patient_of`).
    """
    root = Path(root)
    if (root / "Grade.csv").is_file():
        return glas_split(root, val_fraction, seed)
    folder = root / "train" if (root / "train").is_dir() else root
    pairs = find_pairs(folder)
    if len(pairs) < 2:
        raise GlasSegError(f"{folder} holds {len(pairs)} image/label pair(s); training needs at least 2 "
                         "(X.png + X_label.tif, or GlaS-style X.bmp + X_anno.bmp)")
    names = [p[0] for p in pairs]
    train, val = patient_split(names, {n: patient_of(n) for n in names}, val_fraction, seed)
    by_name = {p[0]: p for p in pairs}
    return [by_name[n] for n in train], [by_name[n] for n in val]


def load_sample(name: str, image_path: Path, label_path: Path) -> Sample:
    image = to_float_rgb(read_image(image_path))
    labels = read_labels(label_path)
    if labels.shape != image.shape[:2]:
        raise GlasSegError(f"{name}: labels {labels.shape} and image {image.shape[:2]} differ in size")
    return Sample(name, image, labels)


def binary_mask_samples(root: str | Path, image_prefix: str = "Slide_", mask_prefix: str = "GT_") -> list[Sample]:
    """Images with binary object masks in sibling folders, as TNBC ships them.

    ``root/Slide_XX/N.png`` pairs with ``root/GT_XX/N.png`` (0 background, non-zero object).
    Touching objects are not separated in such masks, so connected components stand in for
    instances (8-connectivity).

    Returns
    -------
    list of Sample, named ``XX/N``, sorted naturally.
    """
    root = Path(root)
    samples = []
    for image_dir in sorted(root.glob(f"{image_prefix}*"), key=lambda p: natural_key(p.name)):
        suffix = image_dir.name[len(image_prefix):]
        for name, image_path, mask_path in find_pairs(image_dir, root / f"{mask_prefix}{suffix}"):
            image = to_float_rgb(read_image(image_path))
            labels, _ = ndi.label(read_labels(mask_path) > 0, structure=np.ones((3, 3)))
            samples.append(Sample(f"{suffix}/{name}", image, labels.astype(np.int32)))
    if not samples:
        raise GlasSegError(f"No {image_prefix}XX/ + {mask_prefix}XX/ image/mask pairs under {root}")
    return samples


def rescale_sample(sample: Sample, scale: float) -> Sample:
    """Image resampled smoothly, labels with nearest neighbour, to the model's working scale."""
    if scale == 1:
        return sample
    image = rescale(sample.image, scale, channel_axis=-1, anti_aliasing=scale < 1, order=1).astype(np.float32)
    labels = resize_labels(sample.labels, image.shape[:2])  # the one nearest-neighbour label resize
    return Sample(sample.name, image, labels)


class PatchDataset(torch.utils.data.IterableDataset):
    """Endless stream of augmented ``(image, target)`` crops from samples at working scale.

    Parameters
    ----------
    augment : bool or float
        Augmentation strength (:class:`.augment.Augmenter`): True is 1, False 0, or a number.
    targets : {"contours", "instances"}
        What ``target`` holds: contour classes for semantic networks, or the crop's instance
        ids for networks that predict instances (Mask R-CNN).
    contour_mode : {"outer", "inner"}
        Boundary placement of contour targets (:func:`.targets.contour_targets`).
    glass : float in [0, 1]
        Probability that a crop gets a tissue edge with blank glass beyond it
        (:func:`.augment.glass_edge`); glass is known background in the target.
    glass_fill : float in [0, 1]
        Share of those crops whose glass is then filled with the tissue mirrored across the
        edge (:func:`.tissue.fill_glass`), as ``segment(mask_glass=True)`` shows glass to the
        network; the filled pixels are not scored (segmentation clears them), so the network
        learns to segment the tissue next to a mirrored edge, not what to call the mirror.
    sample_weights : sequence of float, optional
        How often each sample is drawn, relative to the others (e.g. a fine-tune's corrected
        images against its replay images); None draws them uniformly.

    Yields
    ------
    image : float32 tensor ``(3, crop, crop)`` normalised with ``mean`` / ``std``
    target : int64 tensor ``(crop, crop)``, 0 background / 1 interior / 2 boundary, or instance
        ids (0 background); -1 marks ignored pixels in both.
    """

    def __init__(self, samples: list[Sample], crop_size: int, mean, std, augment: bool = True, seed: int = 0,
                 valid_masks: list[np.ndarray] | None = None, targets: str = "contours",
                 contour_mode: str = "outer", glass: float = 0.0, glass_fill: float = 0.0,
                 sample_weights=None) -> None:
        if not samples:
            raise ValueError("No training samples")
        self.sample_p = None
        if sample_weights is not None:
            weights = np.asarray(sample_weights, dtype=float)
            if weights.shape != (len(samples),) or not np.all(weights >= 0) or not weights.sum() > 0:
                raise ValueError(f"sample_weights must be {len(samples)} non-negative numbers, not all 0")
            self.sample_p = weights / weights.sum()
        if targets not in ("contours", "instances"):
            raise ValueError(f"targets must be 'contours' or 'instances', not {targets!r}")
        self.targets = targets
        self.contour_mode = contour_mode
        self.glass = glass
        self.glass_fill = glass_fill
        self.samples = samples
        self.valid_masks = valid_masks
        self.augmenter = Augmenter(crop_size, strength=float(augment), seed=seed)  # True = 1, or a strength
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._known_pixels: dict[int, np.ndarray | None] = {}  # flat indices of corrected pixels, per sample

    def _window_on_known(self, index: int) -> tuple[slice, slice]:
        """Where to crop sample ``index`` so that the crop holds corrected pixels.

        A random crop of a large image with a small corrected region would mostly see
        unknown pixels, which the loss ignores (a batch of them teaches nothing). The window is
        the augmenter's crop with its rotation margin, centred on a random corrected pixel and
        moved inside the image; the augmenter then crops all of it.
        """
        mask = self.valid_masks[index]
        if index not in self._known_pixels:
            # None: nothing, or everything, corrected (replay images): the augmenter's own crop.
            self._known_pixels[index] = None if mask.all() or not mask.any() else np.flatnonzero(mask)
        known = self._known_pixels[index]
        if known is None:
            return slice(None), slice(None)
        side = self.augmenter.crop_size + 2 * self.augmenter.margin()
        centre = np.unravel_index(known[self.rng.integers(known.size)], mask.shape)
        return tuple(slice(start, start + side) for start in
                     (int(np.clip(c - side // 2, 0, max(0, n - side))) for c, n in zip(centre, mask.shape)))

    def reseeded(self, seed) -> "PatchDataset":
        """The same dataset drawing from ``seed`` (an int or a ``numpy.random.SeedSequence``, as
        if built with it): one slot of a data-parallel batch (:func:`.distributed.slot_batches`)
        or one DataLoader worker's stream. Samples are shared, not copied."""
        import copy

        other = copy.copy(self)
        # Its own seed too, so that its DataLoader workers (__iter__) draw from it, not from ours.
        other.seed = seed if isinstance(seed, int) else int(seed.generate_state(1)[0])
        other.rng = np.random.default_rng(seed)
        other.augmenter = copy.copy(self.augmenter)
        other.augmenter.rng = np.random.default_rng(seed)
        return other

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.dataset is self:
            # A DataLoader worker process: its own stream, or every worker would yield the same crops.
            yield from self.reseeded(np.random.SeedSequence([self.seed, worker.id]))
            return
        while True:
            if self.sample_p is None:
                i = int(self.rng.integers(len(self.samples)))
            else:
                i = int(self.rng.choice(len(self.samples), p=self.sample_p))
            sample = self.samples[i]
            # Shift ids by one so that 0 means "unknown": pixels outside the user's corrected
            # regions, padding and the corners a rotation brings in; the loss ignores them (-1).
            image, labels, known = sample.image, sample.labels, True
            if self.valid_masks is not None:  # cut the window first: the whole image may be large
                window = self._window_on_known(i)
                image, labels, known = image[window], labels[window], self.valid_masks[i][window]
            shifted = np.where(known, labels.astype(np.int64) + 1, 0)
            image, shifted = self.augmenter(image, shifted)
            if self.glass > 0 and self.rng.random() < self.glass:
                image, on_glass = glass_edge(image, self.rng)
                if self.glass_fill > 0 and self.rng.random() < self.glass_fill:
                    image = fill_glass(image, on_glass)
                    shifted = np.where(on_glass, 0, shifted)  # not scored: cleared by segmentation
                else:
                    shifted = np.where(on_glass, 1, shifted)  # known background
            ignore = shifted == 0
            instances = np.maximum(shifted - 1, 0)
            target = (instances if self.targets == "instances" else contour_targets(instances, self.contour_mode)).astype(np.int64)
            target[ignore] = -1
            image_t = (torch.from_numpy(image).permute(2, 0, 1) - self.mean) / self.std
            yield image_t, torch.from_numpy(target)
