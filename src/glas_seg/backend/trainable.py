"""Which parameters a fine-tune trains, and the pull towards the starting weights (L2-SP).

Fine-tuning on three images can easily undo what the base model learnt from hundreds. Two
standard remedies, both cheap, live here:

* training only part of the network: ``"decoder"`` (everything but the encoder, whose
  general-purpose features stay fixed; also faster, since no gradient flows into the encoder)
  or ``"head"`` (only the output layer(s)). Which parameters are the encoder or the head is a
  fact of each architecture's registry entry (:class:`.models.Architecture`), so the rule works
  for every architecture, present and future.
* L2-SP (Li, Grandvalet & Davoine, ICML 2018): weight decay towards the starting point instead
  of towards zero. Applied decoupled, as AdamW applies its decay: after each optimizer step
  ``w <- w - lr * strength * (w - w0)``, so a weight drifts at most about ``1 / strength`` from
  its base value per unit of Adam step.
"""

from __future__ import annotations

import re

import torch

from .errors import GlasSegError
from .models import get_architecture
from .settings import LAYER_CHOICES


def trainable_names(architecture: str, names, which: str) -> list[str]:
    """The parameter names (of ``names``, in order) that train under ``which``.

    Parameters
    ----------
    architecture : str
        Registry name, for its ``encoder_params`` / ``head_params`` patterns.
    names : iterable of str
        Parameter names (``network.named_parameters()``).
    which : {"all", "decoder", "head"}
        (``"auto"`` is decided before training, :meth:`.settings.FinetuneSettings.resolve`.)

    Raises
    ------
    GlasSegError
        Unknown ``which``, or a choice that would train nothing.
    """
    if which not in LAYER_CHOICES:
        raise GlasSegError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {which!r}")
    names = list(names)
    if which == "all":
        return names
    arch = get_architecture(architecture)
    if which == "decoder":
        encoder = re.compile(arch.encoder_params)
        chosen = [n for n in names if not encoder.match(n)]
    else:
        head = re.compile(arch.head_params)
        chosen = [n for n in names if head.match(n)]
    if not chosen:
        raise GlasSegError(f"layers={which!r} selects no parameter of a {architecture} network")
    return chosen


def select_trainable(network: torch.nn.Module, architecture: str, which: str) -> dict[str, torch.nn.Parameter]:
    """Freeze every parameter outside ``which`` (``requires_grad=False``); return the others by name.

    Frozen parameters get no gradient, so the optimizer never changes them and they stay exactly
    as loaded (batch-norm running statistics are buffers: ``freeze_norm`` keeps those).
    """
    named = dict(network.named_parameters())
    keep = set(trainable_names(architecture, named, which))
    for name, parameter in named.items():
        parameter.requires_grad_(name in keep)
    return {n: p for n, p in named.items() if n in keep}


class StartingPointDecay:
    """Decoupled L2-SP: pull trainable parameters towards a copy of their starting values.

    Parameters
    ----------
    parameters : dict of str to Parameter
        The trainable parameters by name.
    strength : float
        Decay rate towards the start, in the units of AdamW's ``weight_decay``; 0 disables.
    start : dict of str to Tensor, optional
        The starting point (the base model's state dict); by default the parameters' current
        values. Given explicitly, a resumed run still pulls towards the base, not the resume point.
    """

    def __init__(self, parameters: dict, strength: float, start: dict | None = None) -> None:
        if strength < 0:
            raise GlasSegError(f"L2-SP strength must be 0 or more, got {strength}")
        self.strength = float(strength)
        self.pairs = []
        if strength > 0:
            for name, parameter in parameters.items():
                origin = start[name] if start is not None and name in start else parameter
                self.pairs.append((parameter, origin.detach().to(parameter.device, parameter.dtype).clone()))

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Apply one decay step after the optimizer's step (``lr``: the step's learning rate)."""
        if not self.pairs:
            return
        rate = min(1.0, lr * self.strength)  # never overshoot the starting point
        for parameter, start in self.pairs:
            parameter.sub_(rate * (parameter - start))
