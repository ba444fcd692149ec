import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmkit.checkpoint import build_model, list_states, load_export, load_state, save_export, save_state
from cmkit.errors import CmkitError
from cmkit.methods import SCTConfig


def test_export_round_trip(tiny_config, tmp_path):
    model = build_model(tiny_config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_export(model, tiny_config, tmp_path / "m.safetensors")
    loaded, config = load_export(tmp_path / "m.safetensors")
    assert config == tiny_config and not loaded.training
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x, 1.0), model.eval()(x, 1.0), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_trigflow_export_round_trip(tiny_config, tmp_path):
    """A TrigFlow model comes back with its time input and log-variance head: the same x0 and the same (F, w)."""
    config = replace(tiny_config, method=SCTConfig(c_noise="t"), net=replace(tiny_config.net, double_norm=True))
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    save_export(model, config, tmp_path / "m.safetensors")
    loaded, stored = load_export(tmp_path / "m.safetensors")
    assert stored == config and type(loaded) is type(model) and loaded.c_noise == "t"
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 1.2])
    model.eval()
    torch.testing.assert_close(loaded(x, 1.0), model(x, 1.0), rtol=0, atol=0)
    for ours, theirs in zip(loaded(x, t, trig=True), model(x, t, trig=True), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert loaded.two_step_sigma == model.two_step_sigma


def test_states_are_atomic_pruned_and_weights_only(tiny_config, tmp_path):
    for images in (100, 200, 300, 400):
        save_state({"step": images, "w": torch.ones(2)}, tmp_path, images_seen=images, keep=2)
    assert [p.name for p in list_states(tmp_path)] == ["state-0000000300.pt", "state-0000000400.pt"]
    assert load_state(list_states(tmp_path)[-1])["step"] == 400
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["state-0000000300.pt", "state-0000000400.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_state_with_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "state-0000000001.pt"
    torch.save({"step": 1, "evil": Payload()}, path, pickle_module=pickle)
    with pytest.raises(CmkitError, match="not a loadable cmkit training state"):
        load_state(path)
    assert not (tmp_path / "PWNED").exists()


def test_safetensors_without_cmkit_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CmkitError, match="without cmkit metadata"):
        load_export(tmp_path / "x.safetensors")


def test_every_file_written_is_flushed_to_disk_before_it_replaces_the_old_one(tiny_config, tmp_path, monkeypatch):
    from cmkit import files

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    save_export(build_model(tiny_config), tiny_config, tmp_path / "model.safetensors")
    # the temporary file's data, then the folder holding the rename
    assert [Path(p).parent for p in synced] == [tmp_path, tmp_path.parent] and synced[1] == str(tmp_path)
    assert Path(synced[0]).name.startswith(".model.") and not Path(synced[0]).exists()
