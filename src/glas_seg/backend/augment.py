"""Joint augmentation of an image and its instance labels for training.

Geometric and photometric transforms come from torchvision's ``transforms.v2``, which moves
a ``Mask`` with nearest-neighbour interpolation alongside the image; stain jitter in HED
space (Tellez et al. 2018) is written here because torchvision has none.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from torchvision import tv_tensors
from torchvision.transforms import v2


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float = 0.05, bias: float = 0.05) -> np.ndarray:
    """Perturb haematoxylin, eosin and DAB channels: ``s' = s * (1 + a) + b`` per stain.

    Parameters
    ----------
    rgb : ndarray of float32, shape ``(H, W, 3)``, values in ``[0, 1]``
    sigma, bias : float
        Standard deviation of the multiplicative ``a`` and additive ``b`` (in stain units).

    Returns
    -------
    ndarray of float32, shape ``(H, W, 3)``, values in ``[0, 1]``
    """
    alpha = rng.normal(0.0, sigma, 3)
    beta = rng.normal(0.0, bias, 3) * 0.1
    return fixed_hed_shift(rgb, alpha, beta)


def fixed_hed_shift(rgb: np.ndarray, alpha, beta) -> np.ndarray:
    """Apply a given stain perturbation ``s' = s * (1 + alpha) + beta`` (see :func:`hed_jitter`)."""
    hed = rgb2hed(np.clip(rgb, 0, 1))
    hed = hed * (1.0 + np.asarray(alpha, dtype=np.float64)) + np.asarray(beta, dtype=np.float64)
    return np.clip(hed2rgb(hed), 0, 1).astype(np.float32)


class ElasticTransform(v2.ElasticTransform):
    """torchvision's elastic transform, its random displacement smoothed by scipy instead.

    torchvision blurs the displacement field with a dense ``8 sigma + 1``-tap convolution: about
    0.3 s per 576-px crop on one CPU thread, more than all the other augmentation together and
    the bottleneck that left a GPU waiting for data. scipy's separable filter with the same kernel
    (same radius, same mirrored edges) gives the same field in a few milliseconds.
    """

    def make_params(self, flat_inputs: list) -> dict:
        spatial = next(x for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)))
        height, width = v2.functional.get_size(spatial)
        fields = []
        for sigma, alpha, side in ((self.sigma[0], self.alpha[0], width), (self.sigma[1], self.alpha[1], height)):
            noise = torch.rand(height, width) * 2 - 1  # drawn as torchvision draws it
            if sigma > 0.0:
                taps = int(8 * sigma + 1) | 1  # torchvision's kernel size, made odd
                noise = torch.from_numpy(ndi.gaussian_filter(noise.numpy(), sigma, mode="mirror", radius=taps // 2))
            fields.append(noise * alpha / side)
        return dict(displacement=torch.stack(fields, -1)[None])  # 1 x H x W x 2, as torchvision's


class Augmenter:
    """Random joint augmentation of ``(image, labels)`` crops.

    Parameters
    ----------
    crop_size : int
        Side of the square crop returned (reflect-padded when the image is smaller).
    strength : float
        0 disables all random transforms except cropping; 1 is the default strength.
    seed : int or None
    """

    def __init__(self, crop_size: int = 256, strength: float = 1.0, seed: int | None = None) -> None:
        self.crop_size = crop_size
        self.strength = strength
        self.rng = np.random.default_rng(seed)
        s = strength
        self.geometric = v2.Compose([
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomAffine(degrees=15 * s, scale=(1 - 0.15 * s, 1 + 0.15 * s))], p=0.5),
            v2.RandomApply([ElasticTransform(alpha=30.0 * s, sigma=6.0)], p=0.3),
        ])
        self.photometric = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=0.15 * s, contrast=0.15 * s, saturation=0.1 * s, hue=0.02 * s)], p=0.8),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.2))], p=0.2 * s),
            v2.RandomApply([v2.GaussianNoise(sigma=0.02 * s)], p=0.2 * s),
        ])

    def margin(self) -> int:
        """Extra pixels on each side of the first crop, so that rotations bring in no empty corners."""
        return int(self.crop_size * 0.25) if self.strength > 0 else 0

    def random_crop(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = self.crop_size
        pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
        if pad_h or pad_w:
            pads = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
            image = np.pad(image, pads + ((0, 0),), mode="reflect")
            labels = np.pad(labels, pads, mode="constant")
        y = self.rng.integers(0, image.shape[0] - size + 1)
        x = self.rng.integers(0, image.shape[1] - size + 1)
        return image[y : y + size, x : x + size], labels[y : y + size, x : x + size]

    def __call__(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment one pair.

        Parameters
        ----------
        image : ndarray of float32, shape ``(H, W, 3)`` in ``[0, 1]``
        labels : ndarray of int, shape ``(H, W)``

        Returns
        -------
        image : ndarray of float32, shape ``(crop, crop, 3)``
        labels : ndarray of int32, shape ``(crop, crop)``
        """
        margin = self.margin()
        size, self.crop_size = self.crop_size, self.crop_size + 2 * margin
        image, labels = self.random_crop(image, labels)
        self.crop_size = size
        if self.strength <= 0:
            return image.astype(np.float32), labels.astype(np.int32)
        if self.rng.random() < 0.5:
            image = hed_jitter(image, self.rng, sigma=0.05 * self.strength, bias=0.05 * self.strength)
        k = int(self.rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
        torch.manual_seed(int(self.rng.integers(2**31)))
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        lab_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(labels).astype(np.int32)))
        img_t, lab_t = self.geometric(img_t, lab_t)
        img_t = self.photometric(img_t)
        gamma = float(np.exp(self.rng.normal(0, 0.1 * self.strength)))
        img_t = img_t.clamp(0, 1) ** gamma
        img_t = v2.functional.center_crop(img_t, [size, size])
        lab_t = v2.functional.center_crop(lab_t, [size, size])
        return img_t.permute(1, 2, 0).numpy().astype(np.float32), lab_t.numpy().astype(np.int32)


def glass_edge(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace the part of a crop beyond a random tissue edge with blank glass.

    GlaS images are cut from inside tissue, but slides and biopsies have edges next to empty
    glass, which a model never shown glass takes for gland lumen. Half the edges are straight
    and axis-aligned (an image placed on a canvas), the others oblique and gently wavy (a tissue
    border); the glass is flat grey to white with a faint tint and noise.

    Parameters
    ----------
    image : ndarray of float32, shape ``(H, W, 3)`` in ``[0, 1]``

    Returns
    -------
    image : ndarray of float32, shape ``(H, W, 3)``
    glass : ndarray of bool, shape ``(H, W)``, where glass now is (background in the targets)
    """
    h, w = image.shape[:2]
    if rng.random() < 0.5:
        angle = float(rng.integers(4)) * np.pi / 2
        wave = 0.0
    else:
        angle = float(rng.uniform(0, 2 * np.pi))
        wave = float(rng.uniform(0, 0.06)) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    along = (yy - h / 2) * np.cos(angle) - (xx - w / 2) * np.sin(angle)
    across = (yy - h / 2) * np.sin(angle) + (xx - w / 2) * np.cos(angle)
    period = float(rng.uniform(0.5, 2.0)) * min(h, w)
    edge = float(rng.uniform(0.05, 0.45)) * min(h, w) + wave * np.sin(2 * np.pi * along / period + rng.uniform(0, 6.3))
    glass = across > edge
    level = float(rng.uniform(0.88, 1.0))
    colour = np.clip(level + rng.normal(0, 0.015, 3), 0, 1).astype(np.float32)
    noise = rng.normal(0, rng.uniform(0.0, 0.015), (h, w, 1)).astype(np.float32)
    out = image.copy()
    out[glass] = np.clip(colour + noise[glass], 0, 1)
    return out, glass
