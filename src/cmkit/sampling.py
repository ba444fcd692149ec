"""Samplers: pure functions of (denoiser, sigmas, noise), sharing one signature, and the sampling policy.

``sampler(model, sigmas, noise, cond=None) -> x`` where
- ``model`` follows the denoiser contract ``(x, sigma, cond) -> x0`` (``cond`` a :class:`cmkit.cond.Cond` or None)
  and has ``sigma_min``/``sigma_max``;
- ``sigmas`` is a DESCENDING 1-D list of noise levels within [sigma_min, sigma_max] (checked here);
- ``noise()`` returns a fresh standard-normal batch [N, C, H, W] on each call (the first call is x_T / T);
- the result is in the model's space (:mod:`cmkit.codec`), NOT clamped: callers decode it
  (:meth:`cmkit.codec.Codec.to_images`).

Building the sigma list is separate (:func:`default_sigmas`), so any list works with any sampler. How a
model samples by default is its :class:`SamplingSpec`: its method's :class:`SamplingPolicy` (one per registry
entry, :mod:`cmkit.methods`) resolved for its noise range, with any schedules ``cmkit tune-steps`` found; the
export stores it beside the weights (:mod:`cmkit.checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from cmkit import schedules
from cmkit.cond import ClassifierFree, Cond, check_guidance, check_labels, of_labels, pad_rows, seed_labels
from cmkit.errors import CmkitError
from cmkit.rng import NoiseSource, SeededNoise

# The Karras grids sampling schedules are cut from (EDM's rho).
SAMPLING_RHO = 7.0


def check_sigmas(sigmas: Sequence[float] | Tensor, *, sigma_min: float, sigma_max: float) -> Tensor:
    """Validate a sampling schedule: non-empty, strictly descending, inside [sigma_min, sigma_max]."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    text = ",".join(f"{v:g}" for v in s.tolist())
    if s.numel() == 0:
        raise CmkitError("sigmas: expected at least one noise level")
    if not torch.isfinite(s).all() or (s.numel() > 1 and not (s[1:] < s[:-1]).all()):
        raise CmkitError(f"sigmas {text}: expected strictly descending finite values, e.g. 80,0.821")
    tol = 1e-6 * sigma_max
    if s.max() > sigma_max + tol or s.min() < sigma_min - 1e-9:
        raise CmkitError(f"sigmas {text}: expected values within [sigma_min, sigma_max] = "
                         f"[{sigma_min:g}, {sigma_max:g}]")
    return s


def consistency_sample(model: nn.Module, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
                       cond: Cond | None = None) -> Tensor:
    """One-step (one sigma) or multistep consistency sampling (CM paper, Alg. 1).

    ``x = f(tau_1 z, tau_1)``; for each later tau: ``x = f(x + sqrt(tau^2 - eps^2) z', tau)``.
    Returns float32 [N, C, H, W] in model space, not clamped.
    """
    s = check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max).tolist()
    x = model(s[0] * noise(), s[0], cond)
    for tau in s[1:]:
        x = model(x + (tau**2 - model.sigma_min**2) ** 0.5 * noise(), tau, cond)
    return x


def ode_step(model: nn.Module, x: Tensor, sigma: float | Tensor, sigma_next: float | Tensor,
             cond: Cond | None = None, *, heun: bool) -> Tensor:
    """One Euler or Heun step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM, Alg. 1).

    ``sigma`` (> 0) and ``sigma_next`` (>= 0) are numbers, 0-d tensors or float [N] tensors (one level per
    sample). Heun's correction needs D at ``sigma_next > 0`` (EDM, Alg. 1, line 8): a sample whose ``sigma_next``
    is 0 takes the Euler step, which lands on D(x, sigma), and the others the Heun step; when every
    ``sigma_next`` is 0 the second evaluation is not made. Returns x at ``sigma_next``, float32 [N, C, H, W].
    Used by the EDM samplers and by CD's teacher step.
    """
    s, s_next = (torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
                 for v in (sigma, sigma_next))
    d = (x - model(x, sigma, cond)) / s
    x_next = x + (s_next - s) * d
    at_zero = s_next == 0
    if not heun or bool(at_zero.all()):
        return x_next
    s_heun = torch.where(at_zero, s, s_next)  # a stand-in level > 0 for the rows at 0, whose result is dropped
    d_next = (x_next - model(x_next, s_heun.flatten().expand(len(x)), cond)) / s_heun
    return torch.where(at_zero, x_next, x + (s_next - s) * (d + d_next) / 2)


def _ode_sample(model: nn.Module, sigmas: Sequence[float] | Tensor, noise: NoiseSource, cond: Cond | None,
                *, heun: bool) -> Tensor:
    s = check_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max).tolist() + [0.0]
    x = s[0] * noise()
    for cur, nxt in zip(s[:-1], s[1:], strict=True):
        x = ode_step(model, x, cur, nxt, cond, heun=heun)
    return x


def heun_sample(model: nn.Module, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
                cond: Cond | None = None) -> Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, Alg. 1) through ``sigmas`` and then 0.

    Solves dx/dsigma = (x - D(x, sigma)) / sigma; n levels cost 2n - 1 network evaluations.
    """
    return _ode_sample(model, sigmas, noise, cond, heun=True)


def euler_sample(model: nn.Module, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
                 cond: Cond | None = None) -> Tensor:
    """Euler steps of the probability-flow ODE through ``sigmas`` and then 0 (n evaluations)."""
    return _ode_sample(model, sigmas, noise, cond, heun=False)


def check_meanflow_sigmas(sigmas: Sequence[float] | Tensor, *, sigma_min: float, sigma_max: float) -> Tensor:
    """:func:`check_sigmas`, and the first level is ``sigma_max`` (MeanFlow's t = 1, where sampling starts)."""
    s = check_sigmas(sigmas, sigma_min=sigma_min, sigma_max=sigma_max)
    if s[0] < sigma_max:
        raise CmkitError(f"sigmas {','.join(f'{v:g}' for v in s.tolist())}: a MeanFlow model starts from pure "
                         f"noise at t = 1, its sigma_max; expected the first level to be {sigma_max:g}")
    return s


def meanflow_sample(model: nn.Module, sigmas: Sequence[float] | Tensor, noise: NoiseSource,
                    cond: Cond | None = None) -> Tensor:
    """MeanFlow's sampler (Geng et al. 2025; its Alg. 2 is the one-step case) through ``sigmas`` and then 0: from
    ``z_1 = e``, each step jumps ``z_r = z_t - (t - r) u(z_t, r, t)`` from the current level to the next with one
    evaluation.

    ``model`` is a :class:`cmkit.precond.MeanFlow` (or wraps one) in the denoiser contract, told the next level
    as ``cond.time2``; it returns ``D = z_t - t u(z_t, r, t)``, and the jump is the straight line through x and
    D in EDM's scale, ``x_r = D + sigma_r e_hat``, with ``e_hat = (x - D) / sigma`` (``x / sigma`` at
    ``sigma_max``, where x is pure noise). ``sigmas`` must start at the model's ``sigma_max`` (t = 1): the
    first step starts from noise alone. One level is one step: ``e - u(e, 0, 1)``.
    """
    s = check_meanflow_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max).tolist()
    x = s[0] * noise()
    for cur, nxt in zip(s, [*s[1:], 0.0], strict=True):
        step = replace(cond or Cond(), time2=torch.full((len(x),), nxt, device=x.device))
        d = model(x, cur, step)
        e_hat = (x if cur >= model.sigma_max else x - d) / cur
        x = d + nxt * e_hat
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "consistency": consistency_sample, "heun": heun_sample, "euler": euler_sample, "meanflow": meanflow_sample,
}


@dataclass(frozen=True)
class SamplingPolicy:
    """How the models of a method sample by default: ``sampler`` and ``steps`` for sampling and training
    snapshots, ``eval_steps`` for ``cmkit eval``, the ``samplers`` that apply to it at all, and
    ``two_step_level(sigma_data)``, the published intermediate level of 2-step sampling (None: the method
    samples with an ODE solver, whose 2 steps are Karras levels)."""

    sampler: str
    steps: int
    eval_steps: tuple[int, ...]
    samplers: tuple[str, ...]
    two_step_level: Callable[[float], float] | None = None


@dataclass(frozen=True)
class SamplingSpec:
    """How one model samples by default: its method's policy resolved for its noise range
    [``sigma_min``, ``sigma_max``], and the schedules found by ``cmkit tune-steps`` (``tuned``: step count ->
    DESCENDING sigmas). Stored in the export's metadata beside the weights (:meth:`to_json`)."""

    sampler: str
    steps: int
    eval_steps: tuple[int, ...]
    samplers: tuple[str, ...]
    sigma_min: float
    sigma_max: float
    two_step_sigma: float | None = None
    tuned: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    @classmethod
    def from_policy(cls, policy: SamplingPolicy, *, sigma_min: float, sigma_max: float,
                    sigma_data: float) -> SamplingSpec:
        """The untuned spec of a model of ``policy``'s method with this noise range and data scale."""
        level = policy.two_step_level(sigma_data) if policy.two_step_level else None
        return cls(policy.sampler, policy.steps, policy.eval_steps, policy.samplers, sigma_min, sigma_max, level)

    def with_tuned(self, steps: int, sigmas: Sequence[float]) -> SamplingSpec:
        """This spec with ``sigmas`` (DESCENDING, checked) as the schedule of ``steps`` steps."""
        s = check_sigmas(sigmas, sigma_min=self.sigma_min, sigma_max=self.sigma_max)
        if len(s) != steps:
            raise CmkitError(f"sigmas {','.join(f'{v:g}' for v in s.tolist())}: expected {steps} levels")
        return replace(self, tuned={**self.tuned, steps: tuple(s.tolist())})

    def to_json(self) -> str:
        """The spec as JSON (tuned step counts as strings); :meth:`from_json` inverts it exactly."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["tuned"] = {str(k): list(v) for k, v in sorted(self.tuned.items())}
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> SamplingSpec:
        """Inverse of :meth:`to_json`; CmkitError naming ``where`` when ``text`` is not a spec."""
        try:
            data = json.loads(text)
            spec = cls(sampler=str(data["sampler"]), steps=int(data["steps"]),
                       eval_steps=tuple(int(k) for k in data["eval_steps"]),
                       samplers=tuple(str(k) for k in data["samplers"]), sigma_min=float(data["sigma_min"]),
                       sigma_max=float(data["sigma_max"]),
                       two_step_sigma=None if data["two_step_sigma"] is None else float(data["two_step_sigma"]))
            tuned = parse_tuned(data["tuned"])
        except (ValueError, TypeError, KeyError, AttributeError):
            raise CmkitError(f"{where}: metadata 'sampling' is not a sampling spec (sampler, steps, eval_steps, "
                             "samplers, sigma_min, sigma_max, two_step_sigma, tuned)") from None
        if spec.sampler not in SAMPLERS or not set(spec.samplers) <= set(SAMPLERS):
            raise CmkitError(f"{where}: metadata 'sampling' names an unknown sampler; expected {', '.join(SAMPLERS)}")
        return replace(spec, tuned=tuned)


def parse_tuned(data: Mapping[str, Sequence[float]]) -> dict[int, tuple[float, ...]]:
    """Tuned schedules read from JSON ({"steps": [sigmas]}) as {steps: sigmas}; ValueError, TypeError or
    AttributeError when ``data`` is not such a mapping."""
    return {int(k): tuple(float(s) for s in v) for k, v in data.items()}


def default_sigmas(spec: SamplingSpec, steps: int) -> Tensor:
    """The schedule ``--steps K`` means for a model sampling as ``spec`` says: DESCENDING, float64, checked
    against the spec's sigma range.

    A schedule found by ``cmkit tune-steps`` (``spec.tuned``) comes first. Otherwise, a method without a 2-step
    level (EDM diffusion models): EDM's K Karras levels (Heun: 2K - 1 evaluations). Consistency models: 1 step
    is [sigma_max]; 2 steps add the published ``spec.two_step_sigma``; K > 2 steps take the first K levels of a
    descending (K + 1)-point Karras grid (its last point, sigma_min, would be a no-op).
    """
    if steps < 1:
        raise CmkitError(f"steps: expected a positive number of steps, got {steps}")
    lo, hi = spec.sigma_min, spec.sigma_max
    if steps in spec.tuned:
        sigmas = torch.tensor(spec.tuned[steps], dtype=torch.float64)
    elif spec.two_step_sigma is None:
        sigmas = schedules.edm_sampling_sigmas(steps, sigma_min=lo, sigma_max=hi, rho=SAMPLING_RHO)
    elif steps == 2:
        sigmas = torch.tensor([hi, spec.two_step_sigma], dtype=torch.float64)
    else:
        sigmas = schedules.karras_sigmas(steps + 1, sigma_min=lo, sigma_max=hi, rho=SAMPLING_RHO).flip(0)[:steps]
    try:
        return check_sigmas(sigmas, sigma_min=lo, sigma_max=hi)
    except CmkitError as e:
        raise CmkitError(f"the default {steps}-step schedule does not fit this model ({e}); "
                         "pass --sigmas, or run 'cmkit tune-steps'") from None


# Below this many rows, CPU BLAS kernels round differently from those for larger batches (seen: up to 1e-6 for
# batches of 1-3, 5-7 and 9-11 rows on a 2-core AMD EPYC; none from 12 rows up), enough to move a pixel by one
# uint8 level. Sampling pads smaller CPU batches to this size so that a seed identifies an image.
INVARIANT_ROWS = 16


class BatchInvariant:
    """``model`` called so that each row's result does not depend on the other rows of its batch.

    On the CPU a batch of fewer than :data:`INVARIANT_ROWS` rows is padded to that many (copies of its last row)
    and the extra rows dropped; larger batches and other devices call ``model`` as it is. Every other
    attribute is ``model``'s, so it follows the same denoiser contract.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Cond | None = None) -> Tensor:
        n = x.shape[0]
        if n >= INVARIANT_ROWS or x.device.type != "cpu":
            return self.model(x, sigma, cond)
        pad = INVARIANT_ROWS - n
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(n)
        return self.model(pad_rows(x, pad), pad_rows(sigma, pad), None if cond is None else cond.pad(pad))[:n]


def generate(model: nn.Module, seeds: Sequence[int], *, sigmas: Sequence[float] | Tensor, sampler: str,
             batch_size: int, label: int | None = None, guidance: float | None = None,
             p_uncond: float | None = None, precision: str = "fp32") -> Iterator[Tensor]:
    """Sample one image per seed, ``batch_size`` at a time, yielding float32 [B, *shape] in the model's space,
    NOT clamped (decode with :meth:`cmkit.codec.Codec.to_images`).

    Class-conditional models use ``label`` for every image, or a label drawn from each seed when None
    (:func:`cmkit.cond.seed_labels`). ``guidance = w`` samples with classifier-free guidance
    (:class:`cmkit.cond.ClassifierFree`; None or 1: none), checked by :func:`cmkit.cond.check_guidance` with
    the model's ``p_uncond`` when the caller knows it (``train.p_uncond`` of its config). A model that takes the
    scale as an input (``model.guidance_range`` set: :class:`cmkit.precond.GuidedConsistency`, LCM) is given w as
    ``Cond.guidance`` instead, one network evaluation per step, and refuses a w outside its trained range (None:
    its ``guidance_default``). ``precision="bf16"`` runs the network under bfloat16 autocast (the sampler's
    arithmetic stays fp32). A seed's image does not depend on ``batch_size`` (:class:`BatchInvariant`). ``label``
    and ``guidance`` (and a MeanFlow schedule's start) are checked when this is called, before any batch is asked
    for.
    """
    trained_range = getattr(model, "guidance_range", None)
    check_labels(model.num_classes, label)
    check_guidance(guidance, num_classes=model.num_classes, p_uncond=p_uncond, trained_range=trained_range)
    if sampler == "meanflow":
        check_meanflow_sigmas(sigmas, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    net = BatchInvariant(model)
    w_input = guidance if trained_range is not None else None
    if trained_range is None and guidance is not None and guidance != 1:
        net = ClassifierFree(net, guidance)
    return _batches(model, net, seeds, sigmas=sigmas, sampler=sampler, batch_size=batch_size, label=label,
                    w_input=w_input, precision=precision)


@torch.no_grad()
def _batches(model: nn.Module, net: BatchInvariant | ClassifierFree, seeds: Sequence[int], *,
             sigmas: Sequence[float] | Tensor, sampler: str, batch_size: int, label: int | None,
             w_input: float | None, precision: str) -> Iterator[Tensor]:
    """:func:`generate`'s batches of ``model``'s samples, computed by ``net`` (``model`` wrapped); ``w_input``:
    the guidance scale given to the network as ``Cond.guidance`` (None: none)."""
    device = next(model.parameters()).device
    shape = (model.channels, model.resolution, model.resolution)
    for start in range(0, len(seeds), batch_size):
        noise = SeededNoise(seeds[start:start + batch_size], shape, device)
        cond = of_labels(seed_labels(noise, model.num_classes, label))
        if w_input is not None:
            w = torch.full((len(noise.generators),), float(w_input), device=device)
            cond = replace(cond or Cond(), guidance=w)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            x = SAMPLERS[sampler](net, sigmas, noise, cond)
        yield x.float()
