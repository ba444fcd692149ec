import json

import pytest

from cmkit.checkpoint import build_model
from cmkit.config import PRESETS, Config, apply_overrides, preset
from cmkit.errors import CmkitError


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_json(name):
    config = preset(name)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_cifar_presets_use_the_papers_settings():
    edm, ict = preset("cifar10-edm"), preset("cifar10-ict")
    assert (edm.train.batch, edm.train.lr, edm.method.p_mean, edm.method.p_std) == (512, 1e-3, -1.2, 1.2)
    assert (ict.train.batch, ict.train.lr, ict.train.optimizer) == (1024, 1e-4, "radam")
    assert ict.train.kimg * 1000 / ict.train.batch == 400_000
    assert (ict.method.s0, ict.method.s1, ict.method.mu0) == (10, 1280, 0.0)
    assert (ict.method.p_mean, ict.method.p_std, ict.net.dropout) == (-1.1, 2.0, 0.3)
    assert (ict.net.embedding, ict.net.fourier_scale) == ("fourier", 0.02)
    assert ict.method.distance == "pseudo-huber" and ict.method.weighting == "inverse-gap"


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
    ("method.name=dm", "method.name: unknown value 'dm'"),
    ("method.mu0=1", "method.mu0"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(CmkitError, match=message.replace(".", r"\.")):
        apply_overrides(preset("fmnist-ict"), [item])


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
