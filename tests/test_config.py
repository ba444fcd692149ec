import json
from dataclasses import replace

import pytest

from cmkit.checkpoint import build_model
from cmkit.config import Config, apply_overrides, validate
from cmkit.errors import CmkitError
from cmkit.methods import CDConfig, ECTConfig, SCTConfig
from cmkit.presets import PRESETS, preset


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_round_trip_through_json(name):
    config = preset(name)
    validate(config)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cifar_presets_use_the_papers_settings():
    edm, ict = preset("cifar10-edm"), preset("cifar10-ict")
    assert (edm.train.batch, edm.train.lr, edm.method.p_mean, edm.method.p_std) == (512, 1e-3, -1.2, 1.2)
    assert (ict.train.batch, ict.train.lr, ict.train.optimizer) == (1024, 1e-4, "radam")
    assert ict.train.kimg * 1000 / ict.train.batch == 400_000
    assert (ict.method.name, ict.method.s0, ict.method.s1) == ("ict", 10, 1280)
    assert (ict.method.p_mean, ict.method.p_std, ict.net.dropout) == (-1.1, 2.0, 0.3)
    assert (ict.net.embedding, ict.net.fourier_scale) == ("fourier", 0.02)
    assert ict.method.distance == "pseudo-huber" and ict.method.huber_c is None


@pytest.mark.parametrize("name, dropout", [("cifar10-sct", 0.2), ("cifar10-scd", 0.0)])
def test_cifar_scm_presets_use_the_papers_settings(name, dropout):
    config, teacher = preset(name), preset("cifar10-edm")
    t, m = config.train, config.method
    assert (m.name, config.net.dropout) == (name[-3:], dropout)
    assert (t.batch, t.optimizer, t.lr, t.betas, t.warmup_kimg) == (512, "radam", 1e-4, (0.9, 0.99), 0.0)
    assert t.ema_halflife_kimg == 500 and t.kimg * 1000 / t.batch == 400_000
    assert (m.p_mean, m.p_std, m.tangent_c) == (-1.0, 1.4, 0.1)
    assert m.tangent_warmup_kimg * 1000 / t.batch == 10_000
    # The student starts from the EDM teacher: its time input and network (dropout aside) must be the teacher's.
    assert m.c_noise == "log-sigma" and replace(config.net, dropout=teacher.net.dropout) == teacher.net


@pytest.mark.parametrize("name", ["fmnist-sct", "fmnist-scd"])
def test_scm_presets_use_the_papers_settings(name):
    """sCM's CIFAR-10 time distribution and tangent normalisation, EDM's time input (so that an EDM teacher seeds
    the student), the log-variance head; the time input is t or log-sigma, nothing else."""
    config = preset(name)
    m = config.method
    assert (m.name, m.p_mean, m.p_std, m.tangent_c, m.c_noise) == (name[7:], -1.0, 1.4, 0.1, "log-sigma")
    assert build_model(config).net.map_logvar is not None
    with pytest.raises(CmkitError, match="method.c_noise: unknown value 'sigma'; expected one of t, log-sigma"):
        validate(apply_overrides(config, ["method.c_noise=sigma"]))
    switched = apply_overrides(preset("fmnist-ict"), ["method.name=sct", "method.c_noise=t"]).method
    assert switched == SCTConfig(c_noise="t")


def test_fmnist_preset_size():
    params = sum(p.numel() for p in build_model(preset("fmnist-ict")).parameters())
    assert 1e6 < params < 2e6


def test_overrides_parse_each_type():
    config = apply_overrides(preset("fmnist-ict"), [
        "train.lr=2e-4", "train.batch=32", "data.xflip=true", "net.channel_mult=1,2", "net.attn_resolutions=",
        "train.betas=0.9,0.99", "method.distance=l2"])
    assert config.train.lr == 2e-4 and config.train.batch == 32 and config.data.xflip is True
    assert config.net.channel_mult == (1, 2) and config.net.attn_resolutions == ()
    assert config.train.betas == (0.9, 0.99) and config.method.distance == "l2"


@pytest.mark.parametrize("item, message", [
    ("no.such.key=1", "unknown key 'no.such.key'"),
    ("train.lr", "expected key=value"),
    ("train.batch=1.5", "expected int"),
    ("data.xflip=maybe", "expected bool"),
    ("train.betas=0.9", "expected 2 values"),
    ("train.batch=0", "train.batch: expected a positive number"),
    ("method.name=dm", "method.name: unknown method 'dm'"),
    ("method.s1=1", "method.s1: expected >= s0"),
    ("method.mu0=0.9", "the ict method has no field 'mu0'; its fields: method.name, method.sigma_min"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(CmkitError, match=message.replace(".", r"\.")):
        validate(apply_overrides(preset("fmnist-ict"), [item]))


@pytest.mark.parametrize("items", [
    ["method.s0=40", "method.s1=40"],  # raising s0 past the preset's s1 first
    ["train.accum=3", "train.batch=96"],  # 64 is not a multiple of 3, 96 is
    ["method.name=ct", "method.mu0=0.5"],  # a field only the new method has
])
def test_overrides_apply_in_any_order(items):
    base = preset("fmnist-cd") if "method.s0=40" in items else preset("fmnist-ict")
    if "method.s0=40" in items:
        base = apply_overrides(base, ["method.name=ict"])
    configs = [apply_overrides(base, order) for order in (items, items[::-1])]
    assert configs[0] == configs[1]
    validate(configs[0])


def test_the_method_name_selects_its_own_fields():
    config = apply_overrides(preset("fmnist-ict"), ["method.name=ect", "method.huber_c=0"])
    assert isinstance(config.method, ECTConfig) and config.method.huber_c == 0.0  # 0 is a value, not "auto"
    assert (config.method.sigma_min, config.method.q) == (0.002, 2.0)
    with pytest.raises(CmkitError, match="the ect method has no field 's0'"):
        apply_overrides(config, ["method.s0=3"])
    assert apply_overrides(config, ["method.huber_c=auto"]).method.huber_c is None


def test_compile_with_dropout_is_refused_for_consistency_losses():
    config = apply_overrides(preset("fmnist-ict"), ["train.compile=true", "net.dropout=0.1"])
    with pytest.raises(CmkitError, match="train.compile=true with net.dropout=0.1"):
        validate(config)
    validate(apply_overrides(preset("fmnist-edm"), ["train.compile=true", "net.dropout=0.1"]))


# The method section of a config.json written before per-method configs (cmkit at commit 57d5980).
FLAT_CD = {"name": "cd", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "rho": 7.0, "p_mean": -1.1,
           "p_std": 2.0, "curriculum": "constant", "s0": 17, "s1": 17, "mu0": 0.95, "index_sampling": "uniform",
           "distance": "pseudo-huber", "huber_c": 0.0, "weighting": "uniform", "teacher": "/runs/teacher",
           "solver": "heun", "ect_q": 2.0, "ect_stage_kimg": 3200.0}


def test_flat_method_configs_from_earlier_versions_convert():
    data = preset("fmnist-cd").to_dict()
    data["method"] = FLAT_CD
    method = Config.from_dict(data).method
    assert method == CDConfig(distance="pseudo-huber", num_scales=18, mu=0.95, teacher="/runs/teacher")
    data["method"] = dict(FLAT_CD, name="ect", ect_q=4.0, weighting="inverse-gap")
    assert Config.from_dict(data).method == ECTConfig(q=4.0, stage_kimg=3200.0, teacher="/runs/teacher")


def test_flat_method_configs_mixing_methods_are_refused_with_advice():
    data = preset("fmnist-ct").to_dict()
    data["method"] = dict(FLAT_CD, name="ct", curriculum="exponential")
    with pytest.raises(CmkitError, match="x.json.method: .*method ct and curriculum='exponential'.*edit the file"):
        Config.from_dict(data, where="x.json")


def test_from_dict_refuses_unknown_and_ill_typed_fields():
    data = preset("fmnist-ict").to_dict()
    data["train"]["bogus"] = 1
    with pytest.raises(CmkitError, match="bogus"):
        Config.from_dict(data, where="x.json")
    data = preset("fmnist-ict").to_dict()
    data["train"]["batch"] = "64"
    with pytest.raises(CmkitError, match="x.json.train.batch: expected int"):
        Config.from_dict(data, where="x.json")


def test_unknown_preset():
    with pytest.raises(CmkitError, match="known presets: fmnist-edm"):
        preset("nope")


# The loss reduction of each CIFAR-10 preset: what its paper's official code does (docs/methods.md, CIFAR-10 presets).
CIFAR_REDUCTION = {"cifar10-edm": "sum", "cifar10-edm-ncsnpp": "sum", "cifar10-ct": "mean", "cifar10-ict": "mean",
                   "cifar10-cd": "mean",
                   "cifar10-cd-small": "mean", "cifar10-ect": "mean", "cifar10-sct": "mean", "cifar10-scd": "mean",
                   "cifar10-meanflow": "mean",  # its loss is a function of the squared norm, a sum over values
                   "cifar10-tcm": "mean"}  # TCM's code: loss.mean() of per-sample norms (ct_training_loop.py)


def test_every_cifar_preset_has_its_papers_loss_reduction():
    assert {name for name in PRESETS if name.startswith("cifar10-")} == set(CIFAR_REDUCTION)
    assert {name: preset(name).train.loss_reduction for name in CIFAR_REDUCTION} == CIFAR_REDUCTION


def test_the_default_reduction_leaves_the_fmnist_presets_and_old_configs_unchanged():
    assert all(preset(name).train.loss_reduction == "mean" for name in PRESETS if name.startswith("fmnist-"))
    data = preset("fmnist-ict").to_dict()
    del data["train"]["loss_reduction"]  # a config.json written before the field existed
    assert Config.from_dict(data) == preset("fmnist-ict")


def test_sum_is_refused_for_the_pseudo_huber_distance():
    validate(apply_overrides(preset("fmnist-edm"), ["train.loss_reduction=sum"]))
    validate(apply_overrides(preset("fmnist-ct"), ["train.loss_reduction=sum"]))  # l2: a mean over values
    with pytest.raises(CmkitError, match="train.loss_reduction=sum .* method.distance=pseudo-huber"):
        validate(apply_overrides(preset("fmnist-ict"), ["train.loss_reduction=sum"]))
    with pytest.raises(CmkitError, match="train.loss_reduction: unknown value 'max'"):
        validate(apply_overrides(preset("fmnist-edm"), ["train.loss_reduction=max"]))


def test_cifar10_ct_is_the_cm_papers_ct():
    config = preset("cifar10-ct")
    m, t = config.method, config.train
    assert (m.name, m.s0, m.s1, m.mu0, m.distance) == ("ct", 2, 150, 0.9, "l2")
    assert (t.batch, t.optimizer, t.lr, t.warmup_kimg) == (512, "radam", 4e-4, 10_000)
    assert t.kimg * 1000 / t.batch == 800_000 and config.net.dropout == 0
    assert (config.net.embedding, config.net.fourier_scale, config.data.xflip) == ("fourier", 16.0, True)
    assert "LPIPS" in PRESETS["cifar10-ct"][0]


def test_cifar10_ect_and_edm_follow_their_reference_code():
    ect, edm = preset("cifar10-ect"), preset("cifar10-edm")
    assert (ect.method.distance, ect.method.huber_c, ect.data.xflip) == ("pseudo-huber", 0.0, False)
    assert ect.method.stage_kimg * 1000 / ect.train.batch == 25_000
    assert (edm.data.xflip, edm.train.warmup_kimg, edm.train.ema_halflife_kimg) == (False, 10_000, 500)
    assert preset("cifar10-cd").train.warmup_kimg == preset("cifar10-cd-small").train.warmup_kimg == 10_000
