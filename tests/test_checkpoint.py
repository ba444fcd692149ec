import json
import math
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmkit.checkpoint import (
    build_model,
    export_spec,
    list_states,
    load_export,
    load_state,
    save_export,
    save_state,
)
from cmkit.errors import CmkitError
from cmkit.methods import SCTConfig, sampling_spec
from cmkit.sampling import default_sigmas


def test_export_round_trip(tiny_config, tmp_path):
    model = build_model(tiny_config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_export(model, tiny_config, tmp_path / "m.safetensors")
    loaded, config, spec = load_export(tmp_path / "m.safetensors")
    assert config == tiny_config and not loaded.training and loaded.method_name == "ict"
    assert spec == sampling_spec(tiny_config.method) and not spec.tuned  # saved without one: the method's own
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
    loaded, stored, spec = load_export(tmp_path / "m.safetensors")
    assert stored == config and type(loaded) is type(model) and loaded.c_noise == "t"
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 1.2])
    model.eval()
    torch.testing.assert_close(loaded(x, 1.0), model(x, 1.0), rtol=0, atol=0)
    for ours, theirs in zip(loaded.raw(x, t), model.raw(x, t), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert spec.two_step_sigma == pytest.approx(0.5 * math.tan(1.1), rel=1e-15)  # sCM's t = 1.1
    assert not hasattr(loaded, "two_step_sigma") and not hasattr(loaded, "tuned_sigmas")  # not on the module


def test_sampling_spec_round_trips_through_an_export(tiny_config, tmp_path):
    """The spec saved beside the weights comes back exactly, with its tuned schedules, and is what sampling
    reads; export_spec reads it without the weights."""
    spec = sampling_spec(tiny_config.method).with_tuned(2, [80.0, 1.5]).with_tuned(3, [80.0, 5.0, 0.25])
    save_export(build_model(tiny_config), tiny_config, tmp_path / "m.safetensors", spec=spec)
    assert load_export(tmp_path / "m.safetensors").spec == spec == export_spec(tmp_path / "m.safetensors")
    assert default_sigmas(spec, 2).tolist() == [80.0, 1.5] and default_sigmas(spec, 1).tolist() == [80.0]


def _old_export(path, model, config, **extra):
    """An export as cmkit 0.2 wrote it: the config, and tuned schedules (if any) as 'tuned_sigmas'; no spec."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "cmkit-1", "config": json.dumps(config.to_dict()), **extra})


def test_an_export_written_before_the_sampling_spec_loads_with_its_tuned_sigmas(tiny_config, tmp_path):
    model = build_model(tiny_config)
    _old_export(tmp_path / "old.safetensors", model, tiny_config, tuned_sigmas=json.dumps({"2": [80.0, 1.5]}))
    _old_export(tmp_path / "plain.safetensors", model, tiny_config)
    untuned = sampling_spec(tiny_config.method)
    assert load_export(tmp_path / "old.safetensors").spec == untuned.with_tuned(2, [80.0, 1.5])
    assert load_export(tmp_path / "plain.safetensors").spec == untuned
    _old_export(tmp_path / "bad.safetensors", model, tiny_config, tuned_sigmas="[1, 2]")
    with pytest.raises(CmkitError, match="bad.safetensors: metadata 'tuned_sigmas' is not a JSON object"):
        load_export(tmp_path / "bad.safetensors")


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
