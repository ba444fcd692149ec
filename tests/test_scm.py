"""sCM (sCT and sCD, Lu and Song 2024) against independent references, but for the closed forms on Gaussian data
(test_scm_gaussian.py, which imports its helpers from here: the Gaussian oracle is used by both files).

- The tangent's forward-mode JVP against central finite differences of the same network, and the whole tangent
  against reverse-mode autograd of the consistency function ``f`` (and its warm-up r):
  ``g = cos t df/dt`` (warm-up r = 1), since ``f = cos t x_t - sin t sd F`` gives
  ``df/dt = -sin t x_t + cos t dx_t/dt - cos t sd F - sin t sd dF/dt`` and so
  ``cos t df/dt = -cos^2 t (sd F - dx_t/dt) - cos t sin t (x_t + sd dF/dt)``, the paper's Eq. 6.
- EDM <-> TrigFlow conversion, the boundary condition, bad input, the adaptive weighting.
- The U-Net options sCM needs (double normalisation, log-variance head) and forward-mode AD through every option.

Finite differences run in float32: the U-Net's noise embedding computes in float32 whatever the weights' dtype, so
the network cannot run in float64. :func:`path_derivative` uses central differences with one Richardson step:
truncation O(h^4) and rounding O(eps_32 |F| / h). At h = 0.02 their sum measures 3e-5 to 1.6e-4 of the
derivative's largest element (6e-4 at h = 0.05 from truncation, rising again below h = 0.01 from rounding), so
``FD_RTOL = 3e-4`` leaves a factor 2 and still sits 30x below a 1% error in the derivative.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from cmkit.cond import Cond
from cmkit.errors import CmkitError
from cmkit.losses import SCMLoss, TeacherVelocity, data_velocity
from cmkit.methods import SCDConfig, SCTConfig, make_loss
from cmkit.nets import UNet, forward_mode
from cmkit.precond import C_NOISE, EDMDenoiser, TrigFlow, edm_backbone_to_trigflow, trigflow_velocity
from cmkit.rng import BatchNoise
from conftest import GaussianOracle

SD = 0.5  # sigma_data
BIG = 10**12  # images seen: the tangent warm-up r = min(1, images / warm-up) is 1
WARMUP = 1000  # warm-up images of the losses built here
FD_STEP, FD_RTOL = 0.02, 3e-4  # see the module docstring
TINY = {"resolution": 8, "in_channels": 2, "out_channels": 2, "model_channels": 8, "channel_mult": (1, 2),
        "num_blocks": 1, "attn_resolutions": (4,)}
_ZERO_INIT = ("conv1.weight", "proj.weight", "map_logvar.weight", "conv.weight")  # conv: out_conv and the heads


# ------------------------------------------------------------------------------------------------ helpers

def unet(**options) -> UNet:
    """A tiny U-Net with random non-trivial weights: the (near-)zero-initialised layers and every bias and norm
    parameter are redrawn, so every path (and the sign of the output layer) shows in the output."""
    torch.manual_seed(0)
    net = UNet(**{**TINY, "dropout": 0.0, **options})
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(_ZERO_INIT):
                p.normal_(0, 0.2)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return net


def trigflow(net: nn.Module, c_noise: str = "t") -> TrigFlow:
    return TrigFlow(net, resolution=net.resolution, channels=net.in_channels, num_classes=net.num_classes,
                    sigma_data=SD, c_noise=c_noise)


def edm(net: UNet) -> EDMDenoiser:
    return EDMDenoiser(net, resolution=net.resolution, channels=net.in_channels, num_classes=net.num_classes,
                       sigma_data=SD)


def scm_loss(velocity=data_velocity) -> SCMLoss:
    """The sCM loss at the paper's CIFAR-10 settings (SCTConfig's defaults), warm-up over WARMUP images."""
    return SCMLoss(velocity, p_mean=-1.0, p_std=1.4, sigma_data=SD, t_min=math.atan(0.002 / SD),
                   t_max=math.atan(80 / SD), warmup_images=WARMUP, tangent_c=0.1)


def col(v: Tensor) -> Tensor:
    """[N] -> [N, 1, 1, 1]."""
    return v.view(-1, 1, 1, 1)


def norms(g: Tensor) -> Tensor:
    """Per-sample L2 norms [N] of g [N, ...]."""
    return g.flatten(1).norm(dim=1)


def normalised(g: Tensor, c: float) -> Tensor:
    """The paper's tangent normalisation g / (||g|| + c), per sample."""
    return g / col(norms(g) + c)


def path_derivative(fn, h: float = FD_STEP) -> Tensor:
    """d/ds fn(s) at s = 0: central differences with one Richardson extrapolation (error O(h^4))."""
    def central(k: float) -> Tensor:
        return (fn(k) - fn(-k)) / (2 * k)
    return (4 * central(h / 2) - central(h)) / 3


def path_batch(*, n: int = 4, channels: int = 2, resolution: int = 8, classes: int = 3):
    """x0 in [-1, 1], z ~ N(0, SD^2), t in [0.3, 1.3] (away from the ends, for finite differences), x_t, sCT's
    dx_t/dt and the conditioning (class labels)."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(n, channels, resolution, resolution, generator=gen) * 2 - 1
    z = torch.randn(x0.shape, generator=gen) * SD
    t = torch.linspace(0.3, 1.3, n)
    x_t = col(t.cos()) * x0 + col(t.sin()) * z
    return x0, z, x_t, t, data_velocity(x0, z, x_t, t, None), Cond(labels=torch.arange(n) % classes)


# --------------------------------------------------------------------- helpers: Gaussian data N(0, s^2 I)

S = 0.8  # the data's standard deviation (not SD; >= SD / sqrt(2), see test_scm_gaussian.test_scd_gradient_points...)


class GaussianTrigFlowNet(nn.Module):
    """A TrigFlow backbone (for ``c_noise="t"``) whose consistency function is exact for N(0, s^2 I) data, scaled.

    The EDM-scaled consistency function f*(x, sigma) = s x / sqrt(s^2 + sigma^2) (the ODE keeps
    x / sqrt(s^2 + sigma^2) constant) at x = x_t / cos t, sigma = sd tan t reads
    f*(x_t, t) = s x_t / sqrt(V), V = s^2 cos^2 t + sd^2 sin^2 t; then F = a (cos t x_t - f*) / (sd sin t) at the
    inputs (y = x_t / sd, t), computed in float64. ``a`` ([n, 1, 1, 1]: one per sample, so its gradient is the
    per-sample gradient) is 1 for the exact model; the log-variance head is the constant parameter ``w``.
    """

    def __init__(self, s: float, a: float, *, n: int = 1, w: float = 0.0) -> None:
        super().__init__()
        self.s, self.resolution, self.in_channels, self.num_classes = s, 4, 1, 0
        self.a = nn.Parameter(torch.full((n, 1, 1, 1), float(a)))
        self.w = nn.Parameter(torch.tensor(float(w)))

    def forward(self, y: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        x_t, t = SD * y.double(), col(t.double())
        f = self.s * x_t / (self.s**2 * t.cos() ** 2 + SD**2 * t.sin() ** 2).sqrt()
        return (self.a.double() * (t.cos() * x_t - f) / (SD * t.sin())).float()

    def logvar(self, t: Tensor) -> Tensor:
        return self.w.expand(t.shape[0])


def oracle(s: float = S, a: float = 1.0, *, n: int = 1, w: float = 0.0) -> TrigFlow:
    return trigflow(GaussianTrigFlowNet(s, a, n=n, w=w), "t")


def gaussian_batch(n: int, s: float, *, seed: int = 0, t: Tensor | None = None):
    """x0 ~ N(0, s^2), z ~ N(0, SD^2) [n, 1, 4, 4]; t from the loss's proposal unless given; x_t."""
    gen = torch.Generator().manual_seed(seed)
    x0, z = torch.randn(n, 1, 4, 4, generator=gen) * s, torch.randn(n, 1, 4, 4, generator=gen) * SD
    if t is None:
        t = scm_loss().times(n, BatchNoise(seed, start=0, total=n), torch.device("cpu"))
    return x0, z, col(t.cos()) * x0 + col(t.sin()) * z, t


def gaussian_loss(method: str, s: float = S) -> SCMLoss:
    """sCT's or sCD's loss as cmkit builds it from the method config; sCD's teacher is the exact EDM denoiser
    D(x, sigma) = s^2 x / (s^2 + sigma^2) of N(0, s^2 I) data."""
    config = SCTConfig() if method == "sct" else SCDConfig()
    return make_loss(config, dim=16, total_images=1, teacher=GaussianOracle(s, kind="edm").requires_grad_(False))


# ------------------------------------------------------ 1, 2. the tangent: finite differences and autograd

@pytest.mark.parametrize("c_noise", C_NOISE)
def test_tangent_jvp_matches_finite_differences_of_the_same_network(c_noise):
    """The JVP inside SCMLoss.tangent is cos t sin t dF/dt along (x_t + s dx_t/dt, t + s), with the dropout mask
    of the pass it runs in (train mode, dropout 0.2)."""
    model = trigflow(unet(dropout=0.2, num_classes=3, logvar_head=True), c_noise).train()
    _, _, x_t, t, dxdt, labels = path_batch()
    torch.manual_seed(7)  # the tangent's forward is the first to draw after this: its dropout mask
    g = scm_loss().tangent(model, x_t, t, dxdt, labels, images_seen=BIG)

    def velocity_net(s: float) -> Tensor:
        torch.manual_seed(7)  # the same mask
        with torch.no_grad():
            return model.raw((x_t + s * dxdt) / SD, t + s, labels)[0]

    cos, cs = col(t.cos()), col(t.cos() * t.sin())
    jvp_term = SD * cs * path_derivative(velocity_net)  # sd cos t sin t dF/dt
    raw = -cos**2 * (SD * velocity_net(0.0) - dxdt) - (cs * x_t + jvp_term)
    assert (norms(jvp_term) > 0.1 * norms(raw)).all()  # the JVP is a sizeable part of g
    tolerance = FD_RTOL * jvp_term.flatten(1).abs().amax(1) / (norms(raw) + 0.1)
    assert ((g - normalised(raw, 0.1)).flatten(1).abs().amax(1) <= tolerance).all()


def test_the_jvp_pass_and_the_gradient_pass_share_one_dropout_mask():
    """The loss's gradient is -2 e^w / D <g, dF/dtheta> (+ the w terms); g must come from the same dropout mask
    as F. Reference: the tangent and the gradient pass each run right after seeding the same generator state."""
    model = trigflow(unet(dropout=0.5, num_classes=3, logvar_head=True), "log-sigma").train()
    loss, (x0, _, _, _, _, labels) = scm_loss(), path_batch()
    torch.manual_seed(11)
    per_sample = loss(model, x0, labels, images_seen=BIG, noise=BatchNoise(2, start=0, total=4))
    grads = torch.autograd.grad(per_sample.sum(), list(model.parameters()))
    replay = BatchNoise(2, start=0, total=4)  # the loss's t and z
    t = loss.times(4, replay, torch.device("cpu"))
    z = replay.randn(*x0.shape) * SD
    x_t = col(t.cos()) * x0 + col(t.sin()) * z
    torch.manual_seed(11)
    g = loss.tangent(model, x_t, t, data_velocity(x0, z, x_t, t, None), labels, images_seen=BIG)
    torch.manual_seed(11)
    f, w = model.raw(x_t / SD, t, labels)
    reference = w.exp() * (f - f.detach() - g).pow(2).flatten(1).mean(1) - w
    torch.testing.assert_close(per_sample, reference, rtol=1e-6, atol=0)
    for got, expected in zip(grads, torch.autograd.grad(reference.sum(), list(model.parameters())), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def _teacher_velocity(x0, z, x_t, t, labels):
    teacher = edm(unet(num_classes=3)).eval()
    return TeacherVelocity(teacher, sigma_data=SD)(x0, z, x_t, t, labels)


@pytest.mark.parametrize("c_noise", C_NOISE)
@pytest.mark.parametrize("method", ["sct", "scd"])
@pytest.mark.parametrize("r", [0.0, 0.5, 1.0])
def test_tangent_is_cos_t_times_the_total_derivative_of_f(c_noise, method, r):
    """Reference: df/dt by reverse-mode autograd (torch.autograd.functional.jvp, the double-backward trick) of
    f(x, t) = cos t x - sin t sd net(x / sd, c_noise(t)), written here from the backbone (c_noise = t, or EDM's
    ln(sd tan t) / 4), along dx/dt (sCT: the sample's own velocity; sCD: an EDM teacher's). With the warm-up r:
    g = A + r (cos t df/dt - A), A = -cos^2 t (sd F - dx/dt). The same f through the denoiser contract,
    model(x / cos t, sd tan t), checks the reference."""
    model = trigflow(unet(dropout=0.2, num_classes=3, logvar_head=True), c_noise).train()
    x0, z, x_t, t, dxdt, labels = path_batch()
    if method == "scd":
        dxdt = _teacher_velocity(x0, z, x_t, t, labels)
    torch.manual_seed(7)
    g = scm_loss().tangent(model, x_t, t, dxdt, labels, images_seen=int(r * WARMUP))

    def velocity_net(x: Tensor, time: Tensor) -> Tensor:  # F, with the tangent's dropout mask
        torch.manual_seed(7)
        return model.net(x / SD, time if c_noise == "t" else (SD * time.tan()).log() / 4, labels.labels)

    def f(x: Tensor, time: Tensor) -> Tensor:
        return col(time.cos()) * x - col(time.sin()) * SD * velocity_net(x, time)

    _, df_dt = torch.autograd.functional.jvp(f, (x_t, t), (dxdt, torch.ones_like(t)))
    with torch.no_grad():
        a = -col(t.cos()) ** 2 * (SD * velocity_net(x_t, t) - dxdt)
        torch.manual_seed(7)
        torch.testing.assert_close(model(x_t / col(t.cos()), SD * t.tan(), labels), f(x_t, t), rtol=1e-5, atol=1e-5)
    raw = a + r * (col(t.cos()) * df_dt - a)
    assert (norms(col(t.cos()) * df_dt - a) > 0.2 * norms(a)).all()  # the derivative term matters
    torch.testing.assert_close(g, normalised(raw, 0.1), rtol=0, atol=4e-6)  # rounding: measured 6e-7


# ---------------------------------------------------------------------------- 3. EDM <-> TrigFlow conversion

# NCSN++'s input path and the progressive output path, whose every output head the conversion negates.
PROGRESSIVE = {"embedding": "fourier", "fourier_scale": 0.1, "channel_mult_noise": 2, "encoder_type": "residual",
               "decoder_type": "skip", "resample_filter": (1, 3, 3, 1)}


def _converted_pair(**options) -> tuple[EDMDenoiser, TrigFlow]:
    teacher = edm(unet(num_classes=3, **options)).eval()
    torch.manual_seed(5)  # the student's own initial weights, which adopt_backbone replaces
    student = trigflow(UNet(**TINY, num_classes=3, logvar_head=True, **options), "log-sigma").eval()
    student.adopt_backbone(teacher)
    return teacher, student


@pytest.mark.parametrize("options", [{}, PROGRESSIVE], ids=["ddpmpp", "progressive"])
def test_edm_denoiser_and_its_trigflow_conversion_give_the_same_x0(options):
    teacher, student = _converted_pair(**options)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 2, 8, 8, generator=gen) * 2 - 1
    eps, labels = torch.randn(x0.shape, generator=gen), Cond(labels=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        for sigma in (0.002, 0.02, 0.2, 0.5, 2.0, 10.0, 80.0):
            x = x0 + sigma * eps
            expected = teacher(x, sigma, labels)
            c_skip = SD**2 / (sigma**2 + SD**2)
            assert (expected - c_skip * x).abs().max() > 1e-3 * sigma  # the network's term is not negligible
            torch.testing.assert_close(student(x, sigma, labels), expected, rtol=1e-5, atol=1e-5)
        _, w = student.raw(x0, torch.full((3,), 0.5), labels)
        assert torch.equal(w, torch.zeros(3))  # the log-variance head the teacher lacks starts at zero


def test_trigflow_velocity_of_the_edm_teacher_is_sigma_data_f_of_the_converted_model():
    teacher, student = _converted_pair()
    gen = torch.Generator().manual_seed(3)
    t = torch.tensor([0.05, 0.4, 0.8, 1.2, 1.5])
    x_t = torch.randn(5, 2, 8, 8, generator=gen)
    labels = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        velocity = trigflow_velocity(teacher, x_t, t, Cond(labels=labels), sigma_data=SD)
        f_student = student.raw(x_t / SD, t, Cond(labels=labels))[0]
    torch.testing.assert_close(velocity, SD * f_student, rtol=1e-4, atol=1e-4)
    # Independently of the conversion: v = (cos t x_t - D(x_t / cos t, sd tan t)) / sin t, and sd F of the
    # teacher's raw network is -v (the conversion's sign).
    with torch.no_grad():
        c_noise = (SD * t.tan()).log() / 4
        raw = teacher.net(x_t / SD, c_noise, labels)  # c_in x = (x_t / cos t) (cos t / sd)
    torch.testing.assert_close(velocity, -SD * raw, rtol=1e-4, atol=1e-4)


def test_converting_twice_returns_the_original_weights():
    state = unet(num_classes=3).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    once = edm_backbone_to_trigflow(state, "out_conv")
    twice = edm_backbone_to_trigflow(once, "out_conv")
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is not modified
    assert set(twice) == set(state) and all(torch.equal(twice[k], state[k]) for k in state)
    flipped = {k for k in state if not torch.equal(once[k], state[k])}
    assert flipped == {"out_conv.weight", "out_conv.bias"}
    assert all(torch.equal(once[k], -state[k]) for k in flipped)


# ------------------------------------------------------------------------------ 4. the boundary condition

@pytest.mark.parametrize("c_noise", C_NOISE)
@pytest.mark.parametrize("train_mode", [True, False])
def test_trigflow_boundary_is_exact(c_noise, train_mode):
    model = trigflow(unet(dropout=0.3, num_classes=3, logvar_head=True), c_noise).train(train_mode)
    x, labels = torch.randn(4, 2, 8, 8) * 3, torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        _, _, c_in, c_noise_0 = model.coefficients(torch.zeros(4))
        assert model.net(x * col(c_in), c_noise_0, labels).abs().min() > 0  # c_out = 0 is what keeps F out
        assert torch.equal(model(x, torch.zeros(4), Cond(labels=labels)), x)
        assert torch.equal(model(x, 0.0, Cond(labels=labels)), x)
        assert not torch.equal(model(x, 0.01, Cond(labels=labels)), x)


# -------------------------------------------------------------------------------------------- 5. bad input

class NaNVelocity(nn.Module):
    """A teacher whose answer for sample ``row`` is not finite."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, row: int, value: float) -> None:
        super().__init__()
        self.row, self.value = row, value

    def forward(self, x: Tensor, sigma, cond=None) -> Tensor:
        out = x.clone() * 0.3
        out[self.row] = self.value
        return out


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_tangent_makes_that_samples_loss_non_finite(value):
    loss = make_loss(SCDConfig(), dim=16, total_images=1, teacher=NaNVelocity(2, value))
    per_sample = loss(oracle(), torch.randn(5, 1, 4, 4) * S, None, images_seen=BIG,
                      noise=BatchNoise(0, start=0, total=5))
    assert torch.isfinite(per_sample).tolist() == [True, True, False, True, True]
    assert not torch.isfinite(per_sample.mean())


def test_a_t_conditioned_student_refuses_an_edm_backbone():
    teacher = edm(unet())
    student = trigflow(UNet(**TINY, logvar_head=True), "t")
    with pytest.raises(CmkitError, match=r"method\.c_noise"):
        student.adopt_backbone(teacher)


# ------------------------------------------------------------------------------- 6. the adaptive weighting

@pytest.mark.parametrize("w", [-1.0, 0.5])
def test_adaptive_weighting_value_and_gradients(w):
    """loss_i = e^w / D ||F - sg(F) - g_i||^2 - w = e^w ||g_i||^2 / D - w; dL_i/dF = -2 e^w g_i / D (F moves along
    g); dL/dw = e^w mean ||g||^2 / D - 1, zero at w* = -log(mean ||g||^2 / D), pushing w towards w*."""
    n, a = 64, 1.05
    model, loss = oracle(a=a, n=n, w=w), gaussian_loss("sct")
    x0, *_ = gaussian_batch(n, S)
    per_sample = loss(model, x0, None, images_seen=BIG, noise=BatchNoise(6, start=0, total=n))
    per_sample.sum().backward()
    replay = BatchNoise(6, start=0, total=n)  # the same t and z, drawn in the loss's order
    t = loss.times(n, replay, torch.device("cpu"))
    z = replay.randn(n, 1, 4, 4) * SD
    x_t = col(t.cos()) * x0 + col(t.sin()) * z
    g = loss.tangent(model, x_t, t, data_velocity(x0, z, x_t, t, None), None, images_seen=BIG)
    squared = g.pow(2).flatten(1).mean(1)  # ||g||^2 / D
    torch.testing.assert_close(per_sample.detach(), math.exp(w) * squared - w, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        f_star = model.raw(x_t / SD, t)[0] / a  # dF/da
    expected = -2 * math.exp(w) * (g * f_star).flatten(1).mean(1)
    torch.testing.assert_close(model.net.a.grad.flatten(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.net.w.grad, math.exp(w) * squared.sum() - n, rtol=1e-5, atol=1e-5)

    def w_gradient(value: float) -> float:
        m = oracle(a=a, n=n, w=value)
        loss(m, x0, None, images_seen=BIG, noise=BatchNoise(6, start=0, total=n)).mean().backward()
        return m.net.w.grad.item()

    best = -math.log(squared.mean().item())
    assert abs(w_gradient(best)) < 1e-5
    assert w_gradient(best - 0.5) < -0.1 and w_gradient(best + 0.5) > 0.1  # descent moves w towards w*


# ---------------------------------------------------------------------------------------- 7. the U-Net

def test_every_parameter_gets_a_gradient_with_double_norm_and_logvar_head():
    model = trigflow(unet(double_norm=True, logvar_head=True, num_classes=3, dropout=0.1)).train()
    x0, labels = torch.rand(6, 2, 8, 8) * 2 - 1, Cond(labels=torch.arange(6) % 3)
    scm_loss()(model, x0, labels, images_seen=BIG, noise=BatchNoise(0, start=0, total=6)).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


OPTIONS = {
    "positional": {},
    "fourier": {"embedding": "fourier", "fourier_scale": 0.1},
    "classes": {"num_classes": 3},
    "dropout": {"dropout": 0.3},
    "double-norm": {"double_norm": True},
    "adaptive-scale": {"adaptive_scale": True},
    "all": {"embedding": "fourier", "fourier_scale": 0.1, "num_classes": 3, "dropout": 0.3, "double_norm": True},
    # NCSN++ as EDM configures it (Fourier features at sCM's small scale), and the skip paths with two heads
    "ncsnpp": {"embedding": "fourier", "fourier_scale": 0.1, "channel_mult_noise": 2, "encoder_type": "residual",
               "resample_filter": (1, 3, 3, 1)},
    "skip-paths": {"encoder_type": "skip", "decoder_type": "skip", "resample_filter": (1, 3, 3, 1), "attn_heads": 2},
}


def _jvp(forward, primals, tangents, api: str):
    if api == "func":
        return torch.func.jvp(forward, primals, tangents)[1]
    fwad = torch.autograd.forward_ad
    with fwad.dual_level():
        out = forward(*(fwad.make_dual(p, d) for p, d in zip(primals, tangents, strict=True)))
        return tuple(fwad.unpack_dual(o).tangent for o in out)


@pytest.mark.parametrize(("option", "api"), [*((name, "func") for name in OPTIONS), ("all", "forward_ad"),
                                             ("ncsnpp", "forward_ad")])
def test_unet_forward_mode_jvp_matches_finite_differences(option, api):
    """Forward-mode AD (torch.func.jvp, and torch.autograd.forward_ad) through every option, attention included
    (TINY has it at 4x4 and in the middle), inside forward_mode, against finite differences with the same
    dropout mask: the output and the log-variance head, along x and along the noise label separately. Fourier
    features at scale 0.1 (sCM uses small scales) turn at most 1.4 rad per unit of noise label, like the positional
    embedding's 1 rad; at scale 1 (14 rad) h = 0.02 would be too coarse for the finite differences (2e-2 error)."""
    net = unet(logvar_head=True, **OPTIONS[option]).train()
    gen = torch.Generator().manual_seed(4)
    x, v = torch.randn(3, 2, 8, 8, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    c, u = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    labels = torch.tensor([0, 1, 2]) if net.num_classes else None

    def forward(x_in: Tensor, c_in: Tensor) -> tuple[Tensor, Tensor]:
        torch.manual_seed(9)
        return net(x_in, c_in, labels), net.logvar(c_in)

    for dx, dc in ((v, torch.zeros_like(c)), (torch.zeros_like(x), u)):
        with torch.no_grad(), forward_mode():
            jvps = _jvp(forward, (x, c), (dx, dc), api)
            for k, jvp in enumerate(jvps):
                fd = path_derivative(lambda s, k=k, dx=dx, dc=dc: forward(x + s * dx, c + s * dc)[k])
                assert (jvp - fd).abs().max() <= FD_RTOL * jvp.abs().max()
                assert jvp.abs().max() > 0 or (k == 1 and not dc.any())  # w does not depend on x
