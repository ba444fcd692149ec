"""LCM (Luo et al. 2023): the guided teacher step, the skipping pairs, the w input, sampling at a scale, a run.

- The guided ODE step against hand-computed values, and chained on Gaussian data against the closed-form guided
  probability-flow ODE (two Gaussians' exact denoisers make the guided denoiser affine, so the ODE is solvable),
  in pixel space and in the latent space of a linear codec, decoded.
- The LCM loss of the exact guided consistency function is ~0 and grows when the student ignores w.
- The U-Net's w input: zero at initialisation (the student starts as its teacher), then it changes the output;
  configs written before it load unchanged.
- Sampling passes w to the model (inside the trained range only; one clear line otherwise, nothing written).
- A tiny run from a tiny guided teacher trains, resumes bit-exact, exports and samples the same images at any batch
  size; teachers that cannot be guided are refused.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cmkit.autoencoder import AEConfig, latent_scale
from cmkit.checkpoint import build_model, list_states, load_export, load_state, save_export
from cmkit.cli import main
from cmkit.codec import LatentCodec
from cmkit.cond import Cond
from cmkit.config import Config, NetConfig
from cmkit.errors import CmkitError
from cmkit.losses import SkipPairs, TeacherStep
from cmkit.methods import LCMConfig, make_loss, switch_method
from cmkit.nets import UNet
from cmkit.rng import BatchNoise
from cmkit.sampling import generate
from conftest import TINY

S, M = 0.5, 0.8  # the data's standard deviation; the conditional mean (Gaussian tests)


class TwoGaussians(nn.Module):
    """Exact EDM denoisers of two Gaussians, picked by the class label: a sample with a class (label >= 0) sees
    N(m_c, s_c^2 I), the null label N(m_u, s_u^2 I). D(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m). Asserts it is
    never handed a guidance scale (the teacher is guided from outside)."""

    def __init__(self, *, m_c: float, s_c: float, m_u: float, s_u: float) -> None:
        super().__init__()
        self.params = {True: (m_c, s_c), False: (m_u, s_u)}
        self.num_classes, self.sigma_min, self.sigma_max = 10, 0.002, 80.0

    def forward(self, x, sigma, cond=None):
        assert cond is not None and cond.guidance is None
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        has_class = (cond.labels >= 0).view(-1, 1, 1, 1)
        (m_c, s_c), (m_u, s_u) = self.params[True], self.params[False]
        m, s = torch.where(has_class, m_c, m_u).to(x.dtype), torch.where(has_class, s_c, s_u).to(x.dtype)
        return m + s**2 / (s**2 + sigma**2) * (x - m)


def _step(teacher, x, hi, lo, w, *, heun):
    n = x.shape[0]
    cond = Cond(labels=torch.zeros(n, dtype=torch.int64), guidance=torch.as_tensor(w, dtype=x.dtype).expand(n))
    return TeacherStep(teacher, heun=heun, guided=True)(None, x, None, torch.full((n,), lo, dtype=x.dtype),
                                                        torch.full((n,), hi, dtype=x.dtype), cond)


# -------------------------------------------------------------------------------------- the guided step

def test_the_guided_euler_and_heun_steps_at_known_values():
    """D_c = x / 2, D_u = x / 4 (means 0; s^2 / (s^2 + sigma^2) = 1/2 and 1/4 at sigma = 1 ... chosen per level
    below), so D_w = (1 + w) x / 4 when both ratios hold. By hand, x = 4, sigma 2 -> 1:

    w = 1, Euler: D = 2, d = (4 - 2) / 2 = 1, x' = 4 - 1 = 3.
    w = 3, Euler: D = 4, d = 0, x' = 4.
    """
    class Fixed(nn.Module):  # D_c = x / 2, D_u = x / 4 at every sigma
        num_classes = 10

        def forward(self, x, sigma, cond=None):
            assert cond.guidance is None
            return torch.where((cond.labels >= 0).view(-1, 1, 1, 1), x / 2, x / 4)

    x = torch.full((2, 1, 2, 2), 4.0, dtype=torch.float64)
    out = _step(Fixed(), x, 2.0, 1.0, torch.tensor([1.0, 3.0], dtype=torch.float64), heun=False)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([3.0, 4.0], dtype=torch.float64))
    # Heun, w = 1: d = 1, x1 = 3, d' = (3 - 1.5) / 1 = 1.5, x' = 4 - (1 + 1.5) / 2 = 2.75.
    out = _step(Fixed(), x[:1], 2.0, 1.0, 1.0, heun=True)
    assert out.flatten().tolist() == [2.75] * 4
    # w = 0 is the unconditional denoiser alone: D = 1, d = 1.5, x' = 2.5 (Euler).
    assert _step(Fixed(), x[:1], 2.0, 1.0, 0.0, heun=False).flatten().tolist() == [2.5] * 4


def _solve(teacher, x, w, *, sigmas, heun):
    for hi, lo in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = _step(teacher, x, float(hi), float(lo), w, heun=heun)
    return x


@pytest.mark.parametrize("heun", [False, True])
def test_the_guided_step_follows_the_closed_form_guided_ode_with_equal_variances(heun):
    """Class N(m, s^2), null class N(0, s^2): D_w = s^2 x / (s^2 + sigma^2) + w m sigma^2 / (s^2 + sigma^2), the
    exact denoiser of N(w m, s^2), whose ODE keeps (x - w m) / sqrt(s^2 + sigma^2) constant."""
    teacher = TwoGaussians(m_c=M, s_c=S, m_u=0.0, s_u=S)
    w = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = torch.linspace(10.0, 0.5, 400 if heun else 4000, dtype=torch.float64)
    expected = w.view(-1, 1, 1, 1) * M + (x - w.view(-1, 1, 1, 1) * M) * math.sqrt(S**2 + 0.25) / math.sqrt(
        S**2 + 100)
    # Heun is second order, Euler (DDIM) first order; ode_step's float32 levels leave ~1e-4 either way (|x| ~ 10)
    torch.testing.assert_close(_solve(teacher, x, w, sigmas=sigmas, heun=heun), expected, rtol=0, atol=1e-3)


def test_the_guided_step_follows_the_closed_form_guided_ode_with_unequal_variances():
    """Class N(0, s_c^2), null class N(0, s_u^2): dx/dsigma = ((1 - w) sigma / (s_u^2 + sigma^2) + w sigma /
    (s_c^2 + sigma^2)) x, so x is proportional to (s_u^2 + sigma^2)^((1 - w) / 2) (s_c^2 + sigma^2)^(w / 2)."""
    s_c, s_u = 0.3, 0.9
    teacher = TwoGaussians(m_c=0.0, s_c=s_c, m_u=0.0, s_u=s_u)
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)

    def phi(sigma):
        return (s_u**2 + sigma**2) ** ((1 - w) / 2) * (s_c**2 + sigma**2) ** (w / 2)

    x = torch.ones(3, 1, 2, 2, dtype=torch.float64) * 7
    out = _solve(teacher, x, w, sigmas=torch.linspace(8.0, 0.2, 2000, dtype=torch.float64), heun=True)
    torch.testing.assert_close(out, x * (phi(0.2) / phi(8.0)).view(-1, 1, 1, 1), rtol=5e-4, atol=0)


def _linear_codec(images: torch.Tensor) -> LatentCodec:
    """A linear codec of 1 x 4 x 4 images: ``encode(x) = scale * Q unshuffle(x)`` (each 2 x 2 patch's 4 pixels
    mixed by a random orthogonal Q into 4 latent channels of 2 x 2), ``decode`` its inverse; the latent scale set from
    ``images`` by :func:`cmkit.autoencoder.latent_scale`, as ``cmkit train-ae`` sets it."""
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(2)))
    ae = SimpleNamespace(config=AEConfig(resolution=4, z_channels=4, model_channels=8, channel_mult=(1, 2)),
                         scale=torch.ones(()),
                         encoder=lambda x: (torch.einsum("ij,njhw->nihw", q, F.pixel_unshuffle(x, 2)), None),
                         decoder=lambda z: F.pixel_shuffle(torch.einsum("ji,njhw->nihw", q, z), 2))
    ae.scale = torch.tensor(latent_scale(ae, images))
    return LatentCodec("linear", 1, 4, ae)


def test_the_guided_step_in_a_linear_codecs_latent_decodes_to_the_closed_form_guided_ode():
    """Pixels: class N(m_c, S^2 I), null class N(m_u, S^2 I). Through a linear codec z = scale Q x (Q orthogonal) the
    latents are N(scale Q m, (scale S)^2 I), whose exact denoisers make the latent teacher; Heun steps of the guided
    latent ODE from sigma 10 to 0.5, decoded, must equal the pixel-space closed form: the guided ODE of N(m_w, S^2 I),
    m_w = m_u + w (m_c - m_u), at the pixel noise levels sigma / scale, which keeps (x - m_w) / sqrt(S^2 + sigma^2)
    constant."""
    m_c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    m_u = torch.full((1, 1, 4, 4), 0.3)
    images = m_c + S * torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    codec = _linear_codec(images)
    scale = codec.autoencoder.scale.item()
    assert codec.shape == (4, 2, 2) and scale != pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(codec.decode(codec.encode(images[:8])), images[:8], rtol=0, atol=1e-5)
    teacher = TwoGaussians(m_c=codec.encode(m_c)[0].double(), s_c=scale * S, m_u=codec.encode(m_u)[0].double(),
                           s_u=scale * S)
    w = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64).view(-1, 1, 1, 1)
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 10
    out = codec.decode(_solve(teacher, z, w.flatten(), sigmas=torch.linspace(10.0, 0.5, 400, dtype=torch.float64),
                              heun=True))
    m_w = m_u + w * (m_c - m_u)
    x = codec.decode(z).double()
    expected = m_w + (x - m_w) * math.sqrt(S**2 + (0.5 / scale) ** 2) / math.sqrt(S**2 + (10.0 / scale) ** 2)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-3)


class GuidedOracle(nn.Module):
    """The exact guided consistency function of :class:`TwoGaussians` with equal variances: f(x, sigma; w) =
    w m + (x - w m) sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2), reading w from ``cond.guidance`` (or using a fixed
    ``w_fixed``: a student that ignores its w input)."""

    def __init__(self, w_fixed: float | None = None) -> None:
        super().__init__()
        self.w_fixed, self.sigma_min = w_fixed, 0.002
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, cond=None):
        w = cond.guidance if self.w_fixed is None else torch.full_like(cond.guidance, self.w_fixed)
        wm = (w * M).view(-1, 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        return wm + (x - wm) * math.sqrt(S**2 + self.sigma_min**2) / (S**2 + sigma**2).sqrt() + self.anchor


def test_the_lcm_loss_of_the_exact_guided_consistency_function_is_near_zero():
    """With w drawn in [1, 3] per sample, Heun teacher steps of the guided ODE: the exact guided consistency
    function's loss is ~0 (the solver's error only), a student ignoring w (fixed at 2) is far off."""
    method = LCMConfig(w_min=1.0, w_max=3.0, w_default=2.0, num_scales=1000, skip=20, solver="heun",
                       distance="l2", mu=0.0)
    loss = make_loss(method, dim=4, total_images=1, teacher=TwoGaussians(m_c=M, s_c=S, m_u=0.0, s_u=S))
    x0 = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * S + M
    cond = Cond(labels=torch.zeros(256, dtype=torch.int64))
    noise = BatchNoise(5, start=0, total=256)
    exact = loss(GuidedOracle(), x0, cond, images_seen=0, noise=noise)
    ignoring = loss(GuidedOracle(w_fixed=2.0), x0, cond, images_seen=0, noise=noise)
    assert exact.max() < 1e-5 and ignoring.mean() > 100 * exact.mean()


def test_skipping_pairs_are_k_grid_points_apart_counted_down_from_sigma_max():
    """N = 11 points, k = 3: upper indices 10, 7, 4, 1; lower 7, 4, 1, 0 (clamped at sigma_min)."""
    pairs = SkipPairs(num_scales=11, skip=3, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    lo, hi = pairs(400, 0, BatchNoise(0, start=0, total=400), torch.device("cpu"))
    grid = pairs.grid
    index = {round(v, 6): i for i, v in enumerate(grid.tolist())}
    got = {(index[round(a, 6)], index[round(b, 6)]) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)}
    assert got == {(7, 10), (4, 7), (1, 4), (0, 1)}


# ---------------------------------------------------------------------------------------- the w input

def _unet(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
                attn_resolutions=(), num_classes=3, dropout=0.0, **kw)


def _trained_looking(net: nn.Module, *, keep: str = "") -> None:
    """Give every parameter but ``keep``'s random weights: a fresh network's residual branches and output layer
    start near zero, so the embedding (and w) would hardly reach its output."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not (keep and name.startswith(keep)):
                p.normal_(0, 0.2)


def test_the_w_input_starts_at_zero_then_changes_the_output():
    """Batches of 16 rows: the CPU kernels round smaller batches differently from call to call."""
    net = _unet(guidance_dim=8)
    _trained_looking(net, keep="map_guidance")
    x, t, labels = torch.randn(16, 1, 8, 8), torch.zeros(16), torch.arange(16) % 3
    one, three = torch.ones(16), torch.full((16,), 3.0)
    torch.testing.assert_close(net(x, t, labels, guidance=one), net(x, t, labels, guidance=three), rtol=0, atol=0)
    _trained_looking(net)
    assert (net(x, t, labels, guidance=one) - net(x, t, labels, guidance=three)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="guidance must have shape"):
        net(x, t, labels)
    with pytest.raises(ValueError, match="takes no guidance scale"):
        _unet()(x, t, labels, guidance=one)


def test_a_config_written_before_the_w_input_loads_unchanged(tiny_config):
    data = tiny_config.to_dict()
    del data["net"]["guidance_dim"]
    config = Config.from_dict(data)
    assert config.net.guidance_dim == 0
    assert not any("guidance" in key for key in build_model(config).state_dict())


def _guided_config(tiny_config: Config, **method) -> Config:
    config = replace(tiny_config, method=replace(switch_method(tiny_config.method, "lcm"), w_min=1.0, w_max=3.0,
                                                 w_default=2.0, **method))
    return replace(config, net=replace(config.net, num_classes=10, guidance_dim=8))


def test_the_student_starts_as_its_teacher_at_every_w(tiny_config):
    teacher_config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"),
                             net=replace(tiny_config.net, num_classes=10))
    teacher, student = build_model(teacher_config), build_model(_guided_config(tiny_config))
    student.adopt_backbone(teacher)
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    for w in (1.0, 3.0):
        cond = Cond(labels=labels, guidance=torch.full((2,), w))
        # the same network; the CM parameterisation instead of EDM's
        c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in student.coefficients(torch.full((2,), 5.0)))
        t_skip, t_out, _, _ = (c.view(-1, 1, 1, 1) for c in teacher.coefficients(torch.full((2,), 5.0)))
        raw_teacher = (teacher(x, 5.0, Cond(labels=labels)) - t_skip * x) / t_out
        torch.testing.assert_close(student(x, 5.0, cond), c_skip * x + c_out * raw_teacher, rtol=1e-4, atol=1e-5)


def test_a_model_of_another_method_refuses_the_w_input(tiny_config):
    with pytest.raises(CmkitError, match="does not train with the guidance scale as an input"):
        Config.from_dict(replace(tiny_config, net=replace(tiny_config.net, guidance_dim=8)).to_dict())
    with pytest.raises(CmkitError, match="the student needs class labels and a guidance input"):
        lcm = _guided_config(tiny_config)
        Config.from_dict(replace(lcm, net=replace(lcm.net, num_classes=0)).to_dict())


# ------------------------------------------------------------------------------------- sampling with w

@pytest.fixture
def guided_model(tiny_config):
    torch.manual_seed(0)
    model = build_model(_guided_config(tiny_config)).eval()
    _trained_looking(model.net)
    return model


def _sample(model, **kw):
    return torch.cat(list(generate(model, range(5), sigmas=[80.0], sampler="consistency", batch_size=5, **kw)))


def test_sampling_gives_w_to_the_model_inside_its_trained_range_only(guided_model):
    at_one, at_three = _sample(guided_model, guidance=1.0), _sample(guided_model, guidance=3.0)
    assert (at_one - at_three).abs().max() > 1e-3
    torch.testing.assert_close(_sample(guided_model), _sample(guided_model, guidance=2.0), rtol=0, atol=0)
    for w in (0.5, 3.5):
        with pytest.raises(CmkitError, match=rf"--guidance {w:g}: this model was trained for guidance scales in "
                                             r"\[1, 3\]"):
            generate(guided_model, range(2), sigmas=[80.0], sampler="consistency", batch_size=2, guidance=w)


def test_guidance_on_a_model_without_labels_is_refused(tiny_config):
    with pytest.raises(CmkitError, match="not class-conditional"):
        generate(build_model(tiny_config), range(2), sigmas=[80.0], sampler="consistency", batch_size=2,
                 guidance=2.0)


# --------------------------------------------------------------------------------- a run through the CLI

def _teacher(tiny_config, path, *, num_classes=10, p_uncond=0.1):
    config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"),
                     net=replace(tiny_config.net, num_classes=num_classes),
                     train=replace(tiny_config.train, p_uncond=p_uncond))
    torch.manual_seed(0)
    save_export(build_model(config), config, path)
    return path


def _train(out, data, teacher, *extra):
    return main(["train", "--preset", "fmnist-lcm", "--out", str(out), "--data", str(data), "--kimg", "0.064",
                 "--ckpt-kimg", "0.032", "--seed", "2", "--teacher", str(teacher), "--set", *TINY[4:5],
                 "train.batch=16", "train.log_kimg=0.032", "train.snap_kimg=0.064", "net.guidance_dim=8",
                 "data.codec=identity", *extra])  # the preset's latent student, here in the pixel teacher's space


@pytest.fixture(scope="module")
def lcm_run(fmnist_subset, tmp_path_factory):
    """A tiny LCM run (4 steps of 16 images, a checkpoint halfway) from a tiny guided teacher of random weights."""
    folder = tmp_path_factory.mktemp("lcm")
    net = NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,))
    teacher = _teacher(Config(net=net), folder / "teacher.safetensors")
    assert _train(folder / "run", fmnist_subset, teacher) == 0
    return folder


def test_a_tiny_lcm_run_resumes_bit_exact_and_exports(lcm_run, fmnist_subset):
    run, half = lcm_run / "run", lcm_run / "half"
    shutil.copytree(run, half)
    list_states(half)[-1].unlink()
    assert _train(half, fmnist_subset, lcm_run / "teacher.safetensors", "--resume") == 0
    straight, resumed = load_state(list_states(run)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "target", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    model, config, _ = load_export(run)
    assert config.method.name == "lcm" and model.guidance_range == (1.0, 3.0) and config.net.model_channels == 8
    assert config.net.guidance_dim == 8 and config.net.num_classes == 10  # the teacher's net plus the w input


def test_a_tiny_lcm_model_samples_the_same_images_at_any_batch_size(lcm_run, tmp_path):
    outs = []
    for batch in (3, 7):
        out = tmp_path / f"b{batch}.npz"
        assert main(["sample", str(lcm_run / "run"), "--out", str(out), "--n", "7", "--batch",
                     str(batch), "--steps", "2", "--guidance", "1.5"]) == 0
        outs.append(np.load(out)["images"])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize(("command", "suffix"), [("sample", ".png"), ("eval", ".json")])
def test_a_scale_outside_the_trained_range_is_one_line_and_writes_nothing(lcm_run, tmp_path, capsys, command,
                                                                          suffix):
    out = tmp_path / f"x{suffix}"
    assert main([command, str(lcm_run / "run"), "--out", str(out), "--guidance", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--guidance 4: this model was trained for guidance scales in [1, 3]" in err
    assert not out.exists()


@pytest.mark.parametrize(("num_classes", "p_uncond", "message"), [
    (10, 0.0, "train.p_uncond=0"), (0, 0.0, "net.num_classes=0")])
def test_a_teacher_that_cannot_be_guided_is_refused(tiny_config, fmnist_subset, tmp_path, capsys, num_classes,
                                                     p_uncond, message):
    teacher = _teacher(tiny_config, tmp_path / "t.safetensors", num_classes=num_classes, p_uncond=p_uncond)
    assert _train(tmp_path / "r", fmnist_subset, teacher) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "r").exists()


def test_an_lcm_model_is_not_exported_to_diffusers(lcm_run, tmp_path, capsys):
    """ConsistencyModelPipeline cannot pass w: one line naming the capability, no folder."""
    assert main(["export", str(lcm_run / "run"), "--diffusers", str(tmp_path / "pipe")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'export' capability" in err and "trained with lcm" in err
    assert not (tmp_path / "pipe").exists()
