"""The codec between images and the model (cmkit.codec): identity round trip, its shape and dimension, the
clamp on decoded images only, and the refusals of unpinned codecs and of codec kinds editing and the studio cannot
use (latent codecs: tests/test_latent.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cmkit import editing
from cmkit.checkpoint import load_export
from cmkit.codec import KINDS, data_codec, make_codec
from cmkit.config import DataConfig, validate
from cmkit.errors import CmkitError
from cmkit.studio.engine import Models, check_models


def test_identity_round_trip_shape_and_dim():
    codec = make_codec("identity", channels=3, resolution=8)
    x = torch.rand(2, 3, 8, 8) * 4 - 2  # outside [-1, 1] too
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert codec.shape == (3, 8, 8) and codec.dim == 192
    assert data_codec(DataConfig(resolution=28, channels=1)).dim == 784  # pseudo-Huber's D of Fashion-MNIST


def test_only_decoded_images_are_clamped():
    codec = make_codec("identity", channels=1, resolution=2)
    x = torch.tensor([-3.0, -1.0, 0.25, 5.0]).view(1, 1, 2, 2)
    assert codec.to_images(x).flatten().tolist() == [-1.0, -1.0, 0.25, 1.0]
    assert codec.decode(x).flatten().tolist() == [-3.0, -1.0, 0.25, 5.0]


def test_unknown_codecs_are_refused(tiny_config):
    assert KINDS == ("identity", "latent")
    with pytest.raises(CmkitError, match=r"data.codec=vae: the autoencoder this model was trained with is gone"):
        make_codec("vae", channels=1, resolution=28)
    with pytest.raises(CmkitError, match=r"data.codec=vae: expected identity or an autoencoder pinned by its absolute"):
        validate(replace(tiny_config, data=replace(tiny_config.data, codec="vae")))


def test_editing_and_the_studio_say_which_codecs_they_take(studio_files):
    editing.check_codec("identity")
    with pytest.raises(CmkitError, match="data.codec=vae: zero-shot editing works on models with codec identity only, "
                                         "not on latent models"):
        editing.check_codec("vae")
    model, config, _ = load_export(studio_files["gray"])
    check_models(Models(model, config))
    latent = replace(config, data=replace(config.data, codec="vae"))
    with pytest.raises(CmkitError, match="data.codec=vae: the studio works on models with codec identity"):
        check_models(Models(model, latent))
