"""User model store: save, list, rename, delete, export, import (validated, never executing code)."""

from __future__ import annotations

import errno
import gc
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from glas_seg.backend import model_store, registry
from glas_seg.backend.checkpoint import METADATA_KEY, ModelConfig, load_state, read_config, save_model
from glas_seg.backend.model_store import ModelStoreError
from glas_seg.backend.registry import build_model, find_model, load_model, user_model_dir

TINY = {"width": 4, "depth": 2}


def tiny_network(seed: int = 0, **arch) -> tuple[torch.nn.Module, ModelConfig]:
    torch.manual_seed(seed)
    config = ModelConfig(name="tiny", architecture="unet", arch_kwargs=arch or TINY, tile_size=64, min_size=10)
    return build_model(config), config


def tiny_file(path: Path, seed: int = 0, half: bool = False, **arch) -> Path:
    network, config = tiny_network(seed, **arch)
    return save_model(path, network, config, half=half)


@pytest.fixture
def bundled_dir(tmp_path, monkeypatch) -> Path:
    """A stand-in for the package's weights folder holding one 'bundled' model."""
    folder = tmp_path / "bundled"
    tiny_file(folder / "bundled-tiny.safetensors", seed=1)
    monkeypatch.setattr(registry, "BUNDLED_DIR", folder)
    monkeypatch.setattr(model_store, "BUNDLED_DIR", folder)
    return folder


def store_files() -> list[str]:
    folder = user_model_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_saved_model_is_listed_found_and_loadable():
    network, config = tiny_network()
    entry = model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine", "base_model": "tiny"}))
    assert entry.path == user_model_dir() / "mine.safetensors"
    assert [(e.name, e.source) for e in model_store.user_models()] == [("mine", "user")]
    assert find_model("mine").source == "user"
    loaded = load_model("mine", "cpu")
    assert loaded.config.base_model == "tiny"
    for key, value in network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)


@pytest.mark.parametrize("name", ["", " ", "../evil", "a/b", "a\\b", ".hidden", "x" * 65, "name.", "tab\tname"])
def test_invalid_names_are_refused(name):
    with pytest.raises(ModelStoreError, match="not a valid model name"):
        model_store.check_new_name(name)


def test_taken_names_are_refused_unless_overwriting_user_models(bundled_dir):
    with pytest.raises(ModelStoreError, match="bundled model"):
        model_store.check_new_name("bundled-tiny")
    with pytest.raises(ModelStoreError, match="bundled model"):
        model_store.check_new_name("bundled-tiny", overwrite=True)
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine"}))
    with pytest.raises(ModelStoreError, match="already exists"):
        model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine"}))
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine"}), overwrite=True)
    assert store_files() == ["mine.safetensors"]


def test_rename_moves_the_file_and_the_stored_name(bundled_dir):
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "old"}))
    before, _ = load_state(user_model_dir() / "old.safetensors")
    model_store.rename_model("old", "new")
    assert store_files() == ["new.safetensors"]
    assert read_config(user_model_dir() / "new.safetensors").name == "new"
    after, _ = load_state(user_model_dir() / "new.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ModelStoreError, match="bundled"):
        model_store.rename_model("bundled-tiny", "x")
    with pytest.raises(ModelStoreError, match="bundled model"):
        model_store.rename_model("new", "bundled-tiny")
    with pytest.raises(ModelStoreError, match="No user model named 'old'"):
        model_store.rename_model("old", "other")


def test_delete_only_user_models(bundled_dir):
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine"}))
    with pytest.raises(ModelStoreError, match="bundled"):
        model_store.delete_model("bundled-tiny")
    assert (bundled_dir / "bundled-tiny.safetensors").exists()
    model_store.delete_model("mine")
    assert store_files() == []
    with pytest.raises(ModelStoreError, match="User models: none"):
        model_store.delete_model("mine")


@pytest.mark.parametrize("half", [False, True])
def test_export_import_round_trip_keeps_weights_and_precision(tmp_path, bundled_dir, half):
    source = tiny_file(tmp_path / "src" / "shared.safetensors", seed=3, half=half)
    imported = model_store.import_model(source, name="shared")
    assert model_store.is_float16_file(imported.path) is half
    exported = model_store.export_model("shared", tmp_path / "out")
    assert exported == tmp_path / "out" / "shared.safetensors"
    assert exported.read_bytes() == imported.path.read_bytes()
    original, _ = load_state(source)
    again, config = load_state(exported)
    assert config.name == "shared"
    assert all(torch.equal(original[k], again[k]) for k in original)
    with pytest.raises(ModelStoreError, match="already exists"):
        model_store.export_model("shared", exported)
    with pytest.raises(ModelStoreError, match=".safetensors file"):
        model_store.export_model("shared", tmp_path / "model.pt")
    # bundled models can be exported too
    assert model_store.export_model("bundled-tiny", tmp_path / "b.safetensors").is_file()


class _Payload:
    """Unpickling this runs code that creates a marker file: the import must never do that."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _foreign_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    valid = tiny_file(tmp_path / "valid.safetensors")
    data = valid.read_bytes()
    files = {}

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    files["truncated"] = (truncated, "Refused")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 64)
    files["garbage"] = (garbage, "not a readable glas-seg model")

    png = tmp_path / "picture.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    files["png"] = (png, "not a readable glas-seg model")

    payload = _Payload()
    _Payload.marker = str(tmp_path / "CODE_RAN")
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"state_dict": payload}))
    files["pickle"] = (pickled, "not a readable glas-seg model")

    no_meta = tmp_path / "no_meta.safetensors"
    save_file({"w": torch.zeros(3)}, str(no_meta))
    files["foreign safetensors"] = (no_meta, "not a glas-seg model")

    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"w": torch.zeros(3)}, str(bad_json), metadata={METADATA_KEY: "{not json"})
    files["damaged config"] = (bad_json, "damaged configuration")

    network, config = tiny_network()
    tensors = {k: v.contiguous() for k, v in network.state_dict().items()}
    wrong_arch = tmp_path / "wrong_arch.safetensors"
    save_file(tensors, str(wrong_arch), metadata={METADATA_KEY: ModelConfig(**{**config.__dict__, "architecture": "nope"}).to_json()})
    files["unknown architecture"] = (wrong_arch, "cannot build architecture 'nope'")

    huge = tmp_path / "huge.safetensors"  # claims a network far larger than its weights
    save_file(tensors, str(huge), metadata={METADATA_KEY: ModelConfig(**{**config.__dict__, "arch_kwargs": {"width": 4096, "depth": 6}}).to_json()})
    files["weights do not fit"] = (huge, "do not fit architecture")

    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in list(tensors.items())[1:]}, str(missing), metadata={METADATA_KEY: config.to_json()})
    files["missing weight"] = (missing, "missing")

    nan = tmp_path / "nan.safetensors"
    poisoned = dict(tensors)
    key = next(k for k, v in poisoned.items() if v.is_floating_point() and v.numel() > 1)
    poisoned[key] = poisoned[key].clone().fill_(float("nan"))
    save_file(poisoned, str(nan), metadata={METADATA_KEY: config.to_json()})
    files["NaN weights"] = (nan, "NaN or infinite")

    task = tmp_path / "task.safetensors"
    save_file(tensors, str(task), metadata={METADATA_KEY: ModelConfig(**{**config.__dict__, "task": "cats"}).to_json()})
    files["unknown task"] = (task, "unknown task 'cats'")
    return files


def test_corrupt_or_foreign_files_are_refused_with_a_message_and_no_code_runs(tmp_path):
    for label, (path, message) in _foreign_files(tmp_path).items():
        with pytest.raises(ModelStoreError, match=message):
            model_store.import_model(path, name="imported")
        assert store_files() == [], label
    assert not (tmp_path / "CODE_RAN").exists()
    # the pickle really would run code if a careless loader unpickled it
    pickle.loads((tmp_path / "pickled.safetensors").read_bytes())
    assert (tmp_path / "CODE_RAN").exists()
    with pytest.raises(ModelStoreError, match="No such file"):
        model_store.import_model(tmp_path / "absent.safetensors")


def test_broken_user_files_do_not_break_listing(tmp_path):
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "good"}))
    (user_model_dir() / "broken.safetensors").write_bytes(b"junk")
    assert [e.name for e in model_store.user_models()] == ["good"]


def _fail_with(exc):
    def fail(*_args, **_kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "is full"),
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), "is full"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only or not writable"),
    (PermissionError(errno.EACCES, "Permission denied"), "read-only or not writable"),
])
def test_write_failures_give_a_clear_message_and_leave_nothing(monkeypatch, exc, message):
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "kept"}))
    monkeypatch.setattr(model_store, "save_file", _fail_with(exc))
    with pytest.raises(ModelStoreError, match=message) as info:
        model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "new"}))
    assert "Nothing was changed" in str(info.value)
    with pytest.raises(ModelStoreError, match=message):
        model_store.rename_model("kept", "renamed")
    assert store_files() == ["kept.safetensors"]  # no temporary files either
    read_config(user_model_dir() / "kept.safetensors")


def test_read_only_folder_is_explained(tmp_path, monkeypatch):
    """A store under a folder that cannot be created: the message names the problem."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("GLAS_SEG_MODEL_DIR", str(blocker / "models"))
    network, config = tiny_network()
    with pytest.raises(ModelStoreError, match="Could not write model mine.safetensors"):
        model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "mine"}))


def test_subscribers_hear_changes_and_are_held_weakly():
    heard = []

    class View:
        def on_change(self, action, name):
            heard.append((action, name))

    view = View()
    model_store.subscribe(view.on_change)
    network, config = tiny_network()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "a"}))
    model_store.rename_model("a", "b")
    model_store.delete_model("b")
    assert heard == [("added", "a"), ("renamed", "b"), ("deleted", "b")]
    count = len(model_store._listeners)
    del view
    gc.collect()
    model_store.save_user_model(network, ModelConfig(**{**config.__dict__, "name": "c"}))
    assert len(model_store._listeners) == count - 1
    assert heard[-1] == ("deleted", "b")


def test_describe_has_the_listing_fields():
    network, config = tiny_network()
    config = ModelConfig(**{**config.__dict__, "name": "m", "base_model": "tiny",
                            "training": {"created": "2026-01-01T00:00:00+00:00", "iterations": 5,
                                         "validation": {"object_f1": 0.5}}})
    entry = model_store.save_user_model(network, config)
    info = model_store.describe(entry)
    assert {k: info[k] for k in ("name", "architecture", "source", "task", "base_model", "iterations")} == {
        "name": "m", "architecture": "unet", "source": "user", "task": "glands", "base_model": "tiny", "iterations": 5}
    json.dumps(info)
    assert [e.name for e in model_store.user_models()] == ["m"]
