"""The method registry: a contract every entry keeps, and the capability refusals callers get from it."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.checkpoint import build_model, save_export
from cmkit.cli import main
from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.methods import (
    REGISTRY,
    Capability,
    TeacherRole,
    make_loss,
    method_entry,
    methods_that,
    model_entry,
    sampling_spec,
    switch_method,
)
from cmkit.precond import EDMDenoiser, MeanFlow
from cmkit.presets import PRESETS
from cmkit.sampling import SAMPLERS, default_sigmas
from cmkit.teacher import load_teacher, with_teacher
from conftest import GaussianOracle

# The consistency models of the CM, iCT, ECT, sCM and LCM papers; EDM trains their diffusion teachers.
CONSISTENCY = ["ct", "ict", "cd", "ect", "sct", "scd", "lcm"]


def _config(tiny_config: Config, name: str) -> Config:
    """``tiny_config`` with method ``name``; a method whose model takes a guidance scale (LCM) gets a
    class-conditional network with a guidance input, as it requires."""
    config = replace(tiny_config, method=switch_method(tiny_config.method, name))
    if config.method.guidance_range is not None:
        config = replace(config, net=replace(config.net, num_classes=10, guidance_dim=8))
    return config


# ------------------------------------------------------------------------------------- every entry

@pytest.mark.parametrize("name", REGISTRY)
def test_an_entry_is_found_by_its_config_name_and_its_config_round_trips(tiny_config, name):
    config = _config(tiny_config, name)
    assert method_entry(config.method.name) is REGISTRY[name] and REGISTRY[name].config is type(config.method)
    assert Config.from_dict(config.to_dict()) == config
    assert REGISTRY[name].problems(config) == []  # a plain config passes the method's own checks


@pytest.mark.parametrize("name", REGISTRY)
def test_an_entry_builds_its_wrapper_naming_it(tiny_config, name):
    entry = REGISTRY[name]
    model = build_model(_config(tiny_config, name))
    assert type(model) is entry.wrapper and model_entry(model) is entry
    assert (model.net.map_logvar is not None) == entry.logvar_head


@pytest.mark.parametrize("name", REGISTRY)
def test_an_entrys_sampling_policy_is_valid(name):
    """Its default sampler is one it allows, every sampler it allows exists, and every default step count has a
    schedule within the noise range; a 2-step level exactly for the one-step samplers (consistency, MeanFlow)."""
    policy = REGISTRY[name].policy
    assert policy.sampler in policy.samplers and set(policy.samplers) <= set(SAMPLERS)
    spec = sampling_spec(REGISTRY[name].config())
    for steps in (policy.steps, *policy.eval_steps):
        sigmas = default_sigmas(spec, steps)
        assert len(sigmas) == steps and sigmas[0] == spec.sigma_max and sigmas[-1] >= spec.sigma_min
    assert (policy.two_step_level is None) == (policy.sampler not in ("consistency", "meanflow"))


@pytest.mark.parametrize("name", REGISTRY)
def test_an_entrys_capabilities_fit_its_wrapper(name):
    """Only diffusion denoisers teach; only they and MeanFlow take EDM's augmentation; consistency functions are
    edited, exported, tuned, served and scored by the consistency metric (exported to diffusers'
    ConsistencyModelPipeline only when they take no guidance scale, which it cannot pass); MeanFlow models are
    edited and served."""
    entry = REGISTRY[name]
    if entry.wrapper is MeanFlow:
        assert entry.capabilities == {Capability.EDIT, Capability.SERVE, Capability.AUGMENT}
        return
    diffusion = entry.wrapper is EDMDenoiser
    assert entry.can(Capability.TEACH) == entry.can(Capability.AUGMENT) == diffusion
    for capability in (Capability.EDIT, Capability.TUNE_STEPS, Capability.SERVE, Capability.CONSISTENCY_METRIC):
        assert entry.can(capability) != diffusion
    guided = entry.config().guidance_range is not None
    assert entry.can(Capability.EXPORT) == (not diffusion and not guided)
    assert not (diffusion and entry.teacher.takes_teacher)  # a teacher is never itself taught


@pytest.mark.parametrize("name", REGISTRY)
def test_an_entry_has_a_preset_and_its_teacher_role_is_what_training_asks(tiny_config, name, tmp_path):
    """NONE refuses --teacher; INIT_OPTIONAL trains without one; INIT_REQUIRED, TARGET and STAGE_ONE ask for one
    (the losses of TARGET and STAGE_ONE cannot be built without it)."""
    role = REGISTRY[name].teacher
    assert any(config.method.name == name for _, config in PRESETS.values())
    config = _config(tiny_config, name)
    if role is TeacherRole.NONE:
        with pytest.raises(CmkitError, match=f"--teacher: the {name} method trains without a teacher"):
            with_teacher(config, tmp_path)
        assert load_teacher(config, device=torch.device("cpu")) is None
        return
    assert with_teacher(config, tmp_path).method.teacher == str(tmp_path)
    if role is TeacherRole.INIT_OPTIONAL:
        assert load_teacher(config, device=torch.device("cpu")) is None
    else:
        with pytest.raises(CmkitError, match="pass --teacher MODEL"):
            load_teacher(config, device=torch.device("cpu"))
    if role.required_by_loss:
        what = "a stage-one consistency model" if role is TeacherRole.STAGE_ONE else "a diffusion teacher"
        with pytest.raises(CmkitError, match=f"{what} is required"):
            make_loss(config.method, dim=16, total_images=1)
    else:
        assert make_loss(config.method, dim=16, total_images=1) is not None


def test_the_capability_tables():
    assert methods_that(Capability.EDIT) == methods_that(Capability.SERVE) == [*CONSISTENCY, "meanflow", "tcm"]
    assert methods_that(Capability.TEACH) == ["edm"]
    assert [n for n, e in REGISTRY.items() if e.teacher.takes_teacher] == ["cd", "ect", "sct", "scd", "lcm", "tcm"]


# ------------------------------------------------------------------------------------------ refusals

@pytest.fixture
def edm_export(tiny_config, tmp_path):
    config = _config(tiny_config, "edm")
    save_export(build_model(config), config, tmp_path / "edm.safetensors")
    return tmp_path / "edm.safetensors"


def _refusal(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("cmkit: error: ") and err.count("\n") == 1
    return err


def test_editing_an_edm_model_names_the_capability_and_every_editable_method(edm_export, tmp_path, capsys):
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "x.png")
    assert main(["edit", "denoise", str(edm_export), "--image", str(tmp_path / "x.png"), "--sigma", "0.5",
                 "--out", str(tmp_path / "y.png")]) == 2
    assert "zero-shot editing needs a model with the 'edit' capability (one trained with ct, ict, cd, ect, sct, " \
           "scd, lcm, meanflow, tcm); this model was trained with edm" in _refusal(capsys)
    assert not (tmp_path / "y.png").exists()
    with pytest.raises(CmkitError, match="'edit' capability .*; this model was trained with edm"):
        from cmkit import editing

        editing.check_editable(GaussianOracle(0.5, kind="edm"))


@pytest.mark.parametrize(("argv", "what"), [(["tune-steps"], "tune-steps needs a model with the 'tune-steps'"),
                                            (["serve"], "the studio (cmkit serve) needs a model with the 'serve'")])
def test_commands_refuse_a_model_without_their_capability(edm_export, capsys, argv, what):
    assert main([*argv, str(edm_export)]) == 2
    err = _refusal(capsys)
    assert what in err and "this model was trained with edm" in err


def test_a_model_that_names_no_method_is_refused_by_name():
    oracle = GaussianOracle(0.5, kind="consistency")
    oracle.method_name = ""
    with pytest.raises(CmkitError, match="a GaussianOracle that names no cmkit method"):
        model_entry(oracle)
