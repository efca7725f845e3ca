"""Fine-tuning options: which layers train, L2-SP, early stopping, augmentation strength, threads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from glas_seg.backend import finetune as finetune_module
from glas_seg.backend import threads, training
from glas_seg.backend.checkpoint import ModelConfig, load_state, save_model
from glas_seg.backend.data import Sample
from glas_seg.backend.errors import GlasSegError
from glas_seg.backend.finetune import FinetuneSettings, finetune
from glas_seg.backend.models import ARCHITECTURES, build_architecture
from glas_seg.backend.registry import build_model
from glas_seg.backend.trainable import StartingPointDecay, trainable_names
from conftest import disc_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# calibrate=False: these tests script the validation scores; tests/test_calibrate.py covers thresholds.
FAST = dict(iterations=3, batch_size=2, crop_size=32, eval_every=1, device="cpu", calibrate=False)


@pytest.fixture
def base(tmp_path) -> Path:
    """A tiny random U-Net (64x64 tiles), saved as a model file."""
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", architecture="unet", arch_kwargs={"width": 4, "depth": 2}, tile_size=64, min_size=10)
    return save_model(tmp_path / "base" / "tiny.safetensors", build_model(config), config)


def sample(name: str, seed: int, size: int = 64) -> Sample:
    """Pink background with 3 purple discs; labels are the discs."""
    return disc_sample(name, seed, size, count=3, margin=12, radii=(5, 10))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights(path: Path) -> dict:
    return {k: v.float() for k, v in load_state(path)[0].items() if v.is_floating_point()}


def distance(a: dict, b: dict, names) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in names))


# -- which layers train ------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_has_an_encoder_and_a_head(architecture):
    """The registry's patterns select a real, proper part of each network (built on meta: no memory)."""
    with torch.device("meta"):
        names = [n for n, _ in build_architecture(architecture).named_parameters()]
    decoder = trainable_names(architecture, names, "decoder")
    head = trainable_names(architecture, names, "head")
    assert 0 < len(decoder) < len(names)  # the encoder is frozen, something still trains
    assert 0 < len(head) < len(decoder)
    assert set(head) <= set(decoder)  # the head is part of what trains in "decoder" mode
    assert trainable_names(architecture, names, "all") == names


@pytest.mark.parametrize("layers", ["decoder", "head"])
def test_frozen_layers_do_not_change(base, layers):
    before = digest(base)
    result = finetune(str(base), [sample("a", 0)], f"tiny-{layers}", FinetuneSettings(**FAST, layers=layers))
    old, new = weights(base), weights(result.entry.path)
    params = [n for n, _ in build_model(result.entry.config).named_parameters()]
    trained = set(trainable_names("unet", params, layers))
    frozen = [n for n in params if n not in trained]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert any(not torch.equal(old[k], new[k]) for k in trained)
    assert digest(base) == before  # the base model file is only read


def test_unknown_layers_are_refused():
    with pytest.raises(GlasSegError, match="layers must be one of"):
        FinetuneSettings(layers="encoder")
    with pytest.raises(GlasSegError, match="selects no parameter"):
        trainable_names("unet", ["encoder.0.weight"], "decoder")


def test_auto_trains_everything_only_with_many_corrected_objects(base):
    from glas_seg.backend.finetune import count_objects
    from glas_seg.backend.settings import AUTO_ALL_LAYERS_MIN_OBJECTS, AUTO_LEARNING_RATE

    auto = FinetuneSettings()
    assert auto.layers == "auto" and auto.learning_rate is None
    assert auto.resolve(AUTO_ALL_LAYERS_MIN_OBJECTS - 1) == ("head", AUTO_LEARNING_RATE["head"])
    assert auto.resolve(AUTO_ALL_LAYERS_MIN_OBJECTS) == ("all", AUTO_LEARNING_RATE["all"])
    assert FinetuneSettings(layers="decoder", learning_rate=0.01).resolve(0) == ("decoder", 0.01)

    few = sample("few", 0)  # 3 discs
    many = Sample("many", few.image, np.zeros((64, 64), np.int32))
    for i in range(11):  # 121 tiny squares
        for j in range(11):
            many.labels[2 + 5 * i: 5 + 5 * i, 2 + 5 * j: 5 + 5 * j] = 1 + i * 11 + j
    corner = np.zeros((64, 64), bool)
    corner[:12, :12] = True
    assert count_objects([few]) == 3 and count_objects([many]) == 121 and count_objects([many], [corner]) == 4
    settings = FinetuneSettings(**{**FAST, "iterations": 1})
    head = finetune(str(base), [few], "auto-few", settings)
    every = finetune(str(base), [many], "auto-many", settings)
    assert (head.layers, head.learning_rate) == ("head", AUTO_LEARNING_RATE["head"])
    assert (every.layers, every.learning_rate) == ("all", AUTO_LEARNING_RATE["all"])
    assert every.entry.config.training["corrected_objects"] == 121
    old, new = weights(base), weights(head.entry.path)
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("head."))


# -- L2-SP -------------------------------------------------------------------------------------
def test_starting_point_decay_moves_parameters_back():
    parameter = torch.nn.Parameter(torch.zeros(3))
    pull = StartingPointDecay({"w": parameter}, strength=100.0)
    with torch.no_grad():
        parameter += 1.0
    pull.step(lr=1e-3)  # rate 0.1: one tenth of the way back
    torch.testing.assert_close(parameter.detach(), torch.full((3,), 0.9))
    pull.step(lr=1.0)  # the rate is capped at 1: back at the start, never beyond
    torch.testing.assert_close(parameter.detach(), torch.zeros(3))
    with pytest.raises(GlasSegError):
        StartingPointDecay({"w": parameter}, strength=-1)


def test_starting_point_is_the_given_state_not_the_current_values():
    parameter = torch.nn.Parameter(torch.ones(2))
    pull = StartingPointDecay({"w": parameter}, strength=1.0, start={"w": torch.zeros(2)})
    pull.step(lr=0.5)
    torch.testing.assert_close(parameter.detach(), torch.full((2,), 0.5))


def test_l2sp_keeps_the_model_closer_to_the_base(base):
    before = digest(base)
    settings = dict(FAST, iterations=6, learning_rate=0.01)
    free = finetune(str(base), [sample("a", 0)], "free", FinetuneSettings(**settings))
    pulled = finetune(str(base), [sample("a", 0)], "pulled", FinetuneSettings(**settings, l2sp=50.0))
    old = weights(base)
    names = [n for n, _ in build_model(free.entry.config).named_parameters()]
    assert distance(weights(pulled.entry.path), old, names) < 0.5 * distance(weights(free.entry.path), old, names)
    assert digest(base) == before


# -- early stopping on held-back images -----------------------------------------------------------
def test_early_stopping_keeps_the_best_checkpoint(base, monkeypatch):
    """Scripted validation scores: best at iteration 2, then two worse ones -> stop at 4, keep 2."""
    scores = iter([0.5, 0.6, 0.9, 0.7, 0.8, 0.95, 0.99])  # before training, then one per iteration
    snapshots = {}

    def fake_evaluate(model, samples, masks=None, cancel=None, progress=None):
        f1 = next(scores)
        snapshots[len(snapshots)] = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
        return {"pixel_dice": f1, "object_f1": f1, "object_f1_pooled": f1, "object_dice": f1, "object_hausdorff": 1.0}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    monkeypatch.setattr(finetune_module, "evaluate", fake_evaluate)
    events = []
    result = finetune(str(base), [sample("a", 0), sample("b", 1)], "early",
                      FinetuneSettings(**{**FAST, "iterations": 6}, val_fraction=0.5, patience=2), progress=events.append)
    assert [e["iteration"] for e in events] == [0, 1, 2, 3, 4]
    assert events[-1].get("stopped_early") is True and result.stopped_early
    assert result.best_iteration == 2
    assert result.before["object_f1"] == 0.5 and result.after["object_f1"] == 0.9
    kept = load_state(result.entry.path)[0]
    for name, value in snapshots[2].items():  # snapshot 2: the network evaluated at iteration 2
        assert torch.equal(kept[name].to(value.dtype), value), name
    assert result.entry.config.training["best_iteration"] == 2


def script_validation(monkeypatch, values) -> None:
    """Validation scores (object F1 and the rest) come from ``values`` in order: before training, then one per
    validation."""
    scores = iter(values)

    def fake_evaluate(model, samples, masks=None, cancel=None, progress=None):
        f1 = next(scores)
        return {"pixel_dice": f1, "object_f1": f1, "object_f1_pooled": f1, "object_dice": f1, "object_hausdorff": 1.0}

    monkeypatch.setattr(training, "evaluate", fake_evaluate)
    monkeypatch.setattr(finetune_module, "evaluate", fake_evaluate)


def test_without_patience_all_iterations_run_and_the_best_is_kept(base, monkeypatch):
    script_validation(monkeypatch, [0.5, 0.9, 0.2, 0.3])
    result = finetune(str(base), [sample("a", 0), sample("b", 1)], "patient",
                      FinetuneSettings(**FAST, val_fraction=0.5, patience=0))
    assert result.history[-1]["iteration"] == 3 and not result.stopped_early
    assert result.best_iteration == 1 and result.after["object_f1"] == 0.9


def test_when_no_checkpoint_beats_the_base_its_weights_are_kept(base, monkeypatch):
    from glas_seg.backend.finetune import format_before_after

    script_validation(monkeypatch, [0.8, 0.5, 0.6, 0.7])
    result = finetune(str(base), [sample("a", 0), sample("b", 1)], "kept-base",
                      FinetuneSettings(**FAST, val_fraction=0.5, patience=0))
    assert result.best_iteration == 0 and result.after == result.before
    old, new = weights(base), weights(result.entry.path)
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert "keeps the base weights" in format_before_after(result)


# -- augmentation strength ----------------------------------------------------------------------
def test_augmentation_strength_reaches_the_augmenter(base, monkeypatch):
    from glas_seg.backend import data

    seen = []
    original = data.Augmenter.__init__

    def spy(self, crop_size=256, strength=1.0, seed=None):
        seen.append(strength)
        original(self, crop_size, strength, seed)

    monkeypatch.setattr(data.Augmenter, "__init__", spy)
    finetune(str(base), [sample("a", 0)], "soft", FinetuneSettings(**{**FAST, "iterations": 1}, augment_strength=0.5))
    finetune(str(base), [sample("a", 0)], "plain", FinetuneSettings(**{**FAST, "iterations": 1}, augment=False))
    assert seen == [0.5, 0.0]
    with pytest.raises(GlasSegError, match="augmentation strength"):
        FinetuneSettings(augment_strength=3)


# -- threads ------------------------------------------------------------------------------------
def test_thread_count_follows_the_environment_then_the_cores(monkeypatch):
    monkeypatch.setenv("GLAS_SEG_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.default_threads() == 3  # glas-seg's own variable wins
    monkeypatch.delenv("GLAS_SEG_THREADS")
    assert threads.default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.default_threads() == 4  # physical cores, not the 8 hyper-threads
    monkeypatch.setattr(threads, "busy_cores", lambda: 7)
    assert threads.default_threads() == 1  # other processes keep the machine busy: never 0
    monkeypatch.setenv("GLAS_SEG_THREADS", "many")
    with pytest.raises(GlasSegError, match="whole number"):
        threads.default_threads()


def test_cores_are_those_the_process_may_run_on(monkeypatch):
    """A process confined to 2 of a machine's CPUs (container, cluster job, taskset) gets at most 2
    threads, whatever psutil counts on the machine."""
    monkeypatch.delenv("GLAS_SEG_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    assert threads.usable_cpus() == 2
    assert threads.physical_cores() <= 2 and threads.default_threads() <= 2
    monkeypatch.setattr(threads, "physical_cores", lambda: 8)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "busy_cores", lambda: 40)  # other jobs load the 64-CPU machine
    assert threads.default_threads() == 3  # this job's 8 CPUs carry 40 x 8 / 64 = 5 of that load
    monkeypatch.delattr(threads.os, "sched_getaffinity")  # as on macOS / Windows
    assert threads.usable_cpus() == 64


def test_loader_workers_none_on_the_cpu_free_cores_on_a_gpu(monkeypatch):
    monkeypatch.setattr(threads, "physical_cores", lambda: 16)
    assert threads.loader_workers("cpu") == 0  # the cores belong to torch's threads
    assert threads.loader_workers("cuda") == 8  # one core kept for the training process, at most 8
    monkeypatch.setattr(threads, "physical_cores", lambda: 2)
    assert threads.loader_workers("cuda") == 1


def test_finetuning_loads_data_in_its_own_process_even_where_training_would_not(base, monkeypatch):
    """As if on a GPU (loader_workers -> 2): training would start 2 worker processes, a fine-tune
    (from the napari process, in a worker thread) starts none."""
    seen = []
    original = torch.utils.data.DataLoader.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_workers", 0))
        original(self, *args, **kwargs)

    monkeypatch.setattr(training, "loader_workers", lambda device_type: 2)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    finetune(str(base), [sample("a", 0)], "in-process", FinetuneSettings(**{**FAST, "iterations": 1}))
    assert seen == [0]


def test_use_torch_threads_sets_and_reports(monkeypatch):
    previous = torch.get_num_threads()
    try:
        monkeypatch.setenv("GLAS_SEG_THREADS", "2")
        assert threads.use_torch_threads() == 2 and torch.get_num_threads() == 2
        assert threads.use_torch_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


# -- the command line and the public API ----------------------------------------------------------
def test_cli_flags_reach_the_run_and_the_end_reports_before_after(base, tmp_path, capsys):
    from skimage.io import imsave

    from glas_seg.backend.registry import find_model
    from glas_seg.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(["a", "b"]):
        s = sample(name, i)
        imsave(data / f"{name}.png", (s.image * 255).astype(np.uint8))
        imsave(data / f"{name}_anno.png", s.labels.astype(np.uint8), check_contrast=False)
    before = digest(base)
    argv = ["finetune", str(data), "--base", str(base), "--name", "cli-ft", "--iterations", "2", "--batch-size", "2",
            "--crop-size", "32", "--device", "cpu", "--layers", "decoder", "--l2sp", "30", "--augment-strength",
            "0.5", "--patience", "1", "--val-fraction", "0.5", "--eval-every", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "On 1 held-back image(s), base -> fine-tuned: object F1" in err and "pixel Dice" in err
    saved = find_model("cli-ft").config.training["settings"]
    assert (saved["layers"], saved["l2sp"], saved["augment_strength"], saved["patience"]) == ("decoder", 30.0, 0.5, 1)
    assert digest(base) == before
    with pytest.raises(SystemExit):  # argparse refuses an unknown choice
        main([*argv[:4], "--name", "cli-bad", "--layers", "encoder"])


def test_public_api_takes_the_new_options(base):
    import glas_seg

    s = sample("a", 0)
    result = glas_seg.finetune(s.image, s.labels, "api-opts", base=str(base), iterations=2, batch_size=2, crop_size=32,
                               device="cpu", layers="head", l2sp=10.0, augment_strength=0.0, patience=0)
    saved = result.entry.config.training["settings"]
    assert (saved["layers"], saved["l2sp"], saved["augment_strength"]) == ("head", 10.0, 0.0)
    with pytest.raises(GlasSegError):
        glas_seg.finetune(s.image, s.labels, "api-bad", base=str(base), iterations=1, l2sp=-1.0)
