"""Per-method configs: one small frozen dataclass per training method, selected by its ``name``.

Every method shares the noise range of the parameterisation (:class:`MethodConfig`); each subclass adds only
the fields its loss reads. ``kind`` says what the method trains (``edm``: a diffusion denoiser; ``consistency``:
a consistency model), ``parameterisation`` which wrapper of :mod:`cmkit.precond` (``edm``, ``consistency``,
``trigflow``), ``logvar_head`` whether its loss learns the network's log-variance head, ``needs_teacher``
whether it takes a trained diffusion model, ``teacher_optional`` whether it can also train without one and
``teacher_seeds_only`` whether the teacher serves only as the student's starting weights (so it must be a
cmkit model). The methods that take a teacher share its fields (:class:`TaughtConfig`): the teacher, whether
the student's network is the teacher's or the config's own, and the length of a warm-start.
Adding a method means adding a class here (registered in :data:`METHODS`) and a loss builder in
:mod:`cmkit.losses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from cmkit.errors import CmkitError
from cmkit.precond import C_NOISE

DISTANCES = ("l2", "pseudo-huber")
STUDENT_NETS = ("teacher", "own")


@dataclass(frozen=True)
class MethodConfig:
    """The fields of every method: the noise range [sigma_min, sigma_max] and the data's standard deviation.

    ``name`` is fixed by the subclass (it is saved, and selects the class when a config is read back).
    """

    name: str = field(default="", init=False)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    kind: ClassVar[str] = "consistency"
    parameterisation: ClassVar[str] = "consistency"
    logvar_head: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    teacher_optional: ClassVar[bool] = False
    teacher_seeds_only: ClassVar[bool] = False
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def problems(self) -> list[str]:
        """What makes this config unusable, one message per problem (empty when valid)."""
        out = [f"method.{key}: unknown value '{getattr(self, key)}'; expected one of {', '.join(options)}"
               for key, options in self.choices.items() if getattr(self, key) not in options]
        for key in ("sigma_min", "sigma_data", *self._positive()):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                out.append(f"method.{key}: expected a positive number, got {value}")
        checks = [(self.sigma_max > self.sigma_min,
                   f"method.sigma_max: expected > sigma_min ({self.sigma_min}), got {self.sigma_max}"),
                  *self._checks()]
        return out + [message for ok, message in checks if not ok]

    def wrapper_options(self) -> dict[str, Any]:
        """Keyword arguments of the method's wrapper (:data:`cmkit.precond.WRAPPERS`) beyond the noise range."""
        return {}

    @property
    def warm_start_images(self) -> int:
        """Training images spent regressing a teacher's denoiser before the method's own loss (:class:`TaughtConfig`);
        none for a method without a teacher."""
        return 0

    @property
    def loss_averages_values(self) -> bool:
        """True when the loss of one sample is a mean over its D values (EDM's weighted squared error, the l2
        distance, sCM's ``||.||^2 / D``), so that ``train.loss_reduction=sum`` can sum them instead."""
        return True

    def _positive(self) -> tuple[str, ...]:
        """The fields that must be positive and finite."""
        return ()

    def _checks(self) -> list[tuple[bool, str]]:
        """The method's own constraints: (holds, message) pairs."""
        return []


@dataclass(frozen=True)
class _ConsistencyDistance(MethodConfig):
    """A consistency method's distance: ``l2`` or ``pseudo-huber`` with constant ``huber_c`` (None: the iCT
    paper's c = 0.00054 sqrt(D); 0 is allowed and gives the plain l2 norm)."""

    distance: str = "pseudo-huber"
    huber_c: float | None = None

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"distance": DISTANCES}

    @property
    def loss_averages_values(self) -> bool:
        """The pseudo-Huber distance is a function of the whole sample's norm, not a mean over its values."""
        return self.distance != "pseudo-huber"

    def _checks(self) -> list[tuple[bool, str]]:
        ok = self.huber_c is None or (self.huber_c >= 0 and math.isfinite(self.huber_c))
        return [(ok, f"method.huber_c: expected >= 0 (or auto), got {self.huber_c}")]


@dataclass(frozen=True)
class TaughtConfig(MethodConfig):
    """The fields of the methods that take a diffusion ``teacher`` (a path; empty until ``--teacher``).

    ``student_net``: ``teacher`` makes the student's network the teacher's (``--teacher`` copies a cmkit teacher's
    net section into the config, and ``net.*`` settings that differ are refused); ``own`` keeps the config's net
    section, which may be smaller or otherwise shaped. A student whose network equals the teacher's starts from
    the teacher's weights; any other starts from fresh weights, and for the first ``warm_start_kimg`` thousand
    images regresses the teacher's denoiser outputs at EDM's noise levels (one teacher evaluation per image)
    before its own loss begins (:class:`cmkit.losses.WarmStarted`).
    """

    teacher: str = ""
    student_net: str = "teacher"
    warm_start_kimg: float = 0.0

    needs_teacher: ClassVar[bool] = True

    @property
    def warm_start_images(self) -> int:
        return round(self.warm_start_kimg * 1000)

    def problems(self) -> list[str]:
        warm = self.warm_start_kimg
        checks = [(self.student_net in STUDENT_NETS, f"method.student_net: unknown value '{self.student_net}'; "
                   f"expected one of {', '.join(STUDENT_NETS)}"),
                  (warm >= 0 and math.isfinite(warm), f"method.warm_start_kimg: expected >= 0, got {warm}")]
        return super().problems() + [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class EDMConfig(MethodConfig):
    """EDM diffusion training (Karras et al. 2022): ln sigma ~ N(p_mean, p_std^2)."""

    name: str = field(default="edm", init=False)
    p_mean: float = -1.2
    p_std: float = 1.2

    kind: ClassVar[str] = "edm"
    parameterisation: ClassVar[str] = "edm"

    def _positive(self) -> tuple[str, ...]:
        return ("p_std",)


@dataclass(frozen=True)
class CTConfig(_ConsistencyDistance):
    """Consistency training (CM paper, Alg. 3): a Karras grid of N(k) levels growing as sqrt from s0 + 1 to
    s1 + 1, a uniformly drawn adjacent pair, weight 1, and an EMA target with rate mu(k) from ``mu0``
    (``mu0 = 0``: the target is the student under stop-grad)."""

    name: str = field(default="ct", init=False)
    distance: str = "l2"
    rho: float = 7.0
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9

    def _positive(self) -> tuple[str, ...]:
        return ("rho", "s0")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), _grid_sizes(self.s0, self.s1), _ema_rate("mu0", self.mu0)]


@dataclass(frozen=True)
class ICTConfig(_ConsistencyDistance):
    """Improved consistency training (Song and Dhariwal 2023): N(k) doubling from s0 + 1 to s1 + 1, the pair
    index from the discretised lognormal (p_mean, p_std), weight 1 / (sigma_{i+1} - sigma_i), no EMA target."""

    name: str = field(default="ict", init=False)
    rho: float = 7.0
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0

    def _positive(self) -> tuple[str, ...]:
        return ("rho", "s0", "p_std")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), _grid_sizes(self.s0, self.s1)]


@dataclass(frozen=True)
class CDConfig(_ConsistencyDistance, TaughtConfig):
    """Consistency distillation (CM paper, Alg. 2): a fixed Karras grid of ``num_scales`` levels, a uniformly
    drawn adjacent pair, one Euler or Heun step of the ``teacher``'s ODE, weight 1, EMA target rate ``mu``."""

    name: str = field(default="cd", init=False)
    distance: str = "l2"
    rho: float = 7.0
    num_scales: int = 18
    mu: float = 0.0
    solver: str = "heun"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"distance": DISTANCES, "solver": ("heun", "euler")}

    def _positive(self) -> tuple[str, ...]:
        return ("rho",)

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), _ema_rate("mu", self.mu),
                (self.num_scales >= 2, f"method.num_scales: expected at least 2 grid levels, got {self.num_scales}")]


@dataclass(frozen=True)
class ECTConfig(_ConsistencyDistance, TaughtConfig):
    """Easy consistency tuning (Geng et al. 2024) of a ``teacher``: ln t ~ N(p_mean, p_std^2), r(t) shrinking
    t - r by ``q`` every ``stage_kimg`` thousand images, weight 1 / (t - r)."""

    name: str = field(default="ect", init=False)
    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 2.0
    stage_kimg: float = 3_200.0

    teacher_seeds_only: ClassVar[bool] = True

    def _positive(self) -> tuple[str, ...]:
        return ("p_std", "stage_kimg")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), (self.q > 1, f"method.q: expected a ratio > 1, got {self.q}")]


@dataclass(frozen=True)
class _SCMConfig(TaughtConfig):
    """Continuous-time consistency models in TrigFlow form (sCM, Lu and Song 2024, Alg. 1).

    ``tau ~ N(p_mean, p_std^2)``, ``t = arctan(e^tau / sigma_data)`` (kept within the model's
    [sigma_min, sigma_max]); the tangent ``g`` is warmed up over ``tangent_warmup_kimg`` thousand images and
    normalised as ``g / (||g|| + tangent_c)``; ``c_noise`` is the network's time input (:class:`TrigFlow`):
    ``log-sigma`` lets a cmkit EDM ``teacher`` seed the student exactly, ``t`` is the paper's.
    """

    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup_kimg: float = 5_120.0
    tangent_c: float = 0.1
    c_noise: str = "log-sigma"

    parameterisation: ClassVar[str] = "trigflow"
    logvar_head: ClassVar[bool] = True
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"c_noise": C_NOISE}

    def wrapper_options(self) -> dict[str, Any]:
        return {"c_noise": self.c_noise}

    def _positive(self) -> tuple[str, ...]:
        return ("p_std", "tangent_c")

    def _checks(self) -> list[tuple[bool, str]]:
        ok = self.tangent_warmup_kimg >= 0 and math.isfinite(self.tangent_warmup_kimg)
        return [(ok, f"method.tangent_warmup_kimg: expected >= 0, got {self.tangent_warmup_kimg}")]


@dataclass(frozen=True)
class SCTConfig(_SCMConfig):
    """sCT: the tangent's ``dx_t/dt = cos t z - sin t x0`` comes from the data. It starts from a ``teacher``'s
    weights where one is given (the paper's setting), else from scratch."""

    name: str = field(default="sct", init=False)

    teacher_optional: ClassVar[bool] = True
    teacher_seeds_only: ClassVar[bool] = True


@dataclass(frozen=True)
class SCDConfig(_SCMConfig):
    """sCD: the tangent's ``dx_t/dt`` is the ``teacher``'s TrigFlow velocity (an EDM denoiser converted by
    matching signal-to-noise ratios, :func:`cmkit.precond.trigflow_velocity`)."""

    name: str = field(default="scd", init=False)


def _grid_sizes(s0: int, s1: int) -> tuple[bool, str]:
    return s1 >= s0, f"method.s1: expected >= s0 ({s0}), got {s1}"


def _ema_rate(key: str, value: float) -> tuple[bool, str]:
    return 0 <= value < 1, f"method.{key}: expected a value in [0, 1), got {value}"


METHODS: dict[str, type[MethodConfig]] = {
    c.name: c for c in (EDMConfig, CTConfig, ICTConfig, CDConfig, ECTConfig, SCTConfig, SCDConfig)}
TEACHER_METHODS = tuple(name for name, c in METHODS.items() if c.needs_teacher)


def method_class(name: str, *, where: str = "method.name") -> type[MethodConfig]:
    """The config class of method ``name``; CmkitError listing the known methods otherwise."""
    if name not in METHODS:
        raise CmkitError(f"{where}: unknown method '{name}'; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def switch_method(method: MethodConfig, name: str) -> MethodConfig:
    """Method ``name`` with its defaults, keeping the fields it shares with ``method`` (the noise range)."""
    return method_class(name)(**{key: getattr(method, key) for key in init_fields(MethodConfig)})


# ------------------------------------------------------------------------- configs written before 0.2

# The flat method config of earlier versions: every method's fields in one dataclass.
_FLAT = {"name", "sigma_min", "sigma_max", "sigma_data", "rho", "p_mean", "p_std", "curriculum", "s0", "s1", "mu0",
         "index_sampling", "distance", "huber_c", "weighting", "teacher", "solver", "ect_q", "ect_stage_kimg"}
# What each method's loss did with the flat fields it read: they must hold these values to convert.
_IMPLIED = {
    "ct": {"curriculum": "sqrt", "index_sampling": "uniform", "weighting": "uniform"},
    "ict": {"curriculum": "exponential", "index_sampling": "lognormal", "weighting": "inverse-gap", "mu0": 0.0},
    "cd": {"curriculum": "constant", "index_sampling": "uniform", "weighting": "uniform"},
    "ect": {"weighting": "inverse-gap"},
}
_RENAMED = {"cd": {"mu0": "mu"}, "ect": {"ect_q": "q", "ect_stage_kimg": "stage_kimg"}}


def is_flat(data: dict[str, Any]) -> bool:
    """True for a method section written before per-method configs (all the flat fields)."""
    return set(data) == _FLAT


def convert_flat(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The per-method fields of a flat method section; CmkitError (saying how to convert) when it combined
    settings its method no longer offers."""
    name = data["name"]
    cls = method_class(name, where=f"{where}.name")
    clash = [f"{k}={data[k]!r}" for k, v in _IMPLIED.get(name, {}).items() if data[k] != v]
    if clash:
        raise CmkitError(f"{where}: a config from an earlier cmkit with method {name} and {', '.join(clash)}, "
                         f"which the {name} method no longer offers; retrain with a preset, or edit the file to "
                         f"drop that setting and keep {name}'s own fields ({', '.join(init_fields(cls))})")
    renamed = _RENAMED.get(name, {})
    out = {renamed.get(k, k): v for k, v in data.items() if renamed.get(k, k) in init_fields(cls)}
    if name == "cd":
        out["num_scales"] = data["s1"] + 1  # the constant curriculum's grid had s1 + 1 levels
    if "huber_c" in out and out["huber_c"] == 0:
        out["huber_c"] = None  # 0 meant "the paper's c" before
    return out


def init_fields(cls: type[MethodConfig]) -> list[str]:
    """The fields of method class ``cls`` that a config sets (all but ``name``)."""
    return [f.name for f in fields(cls) if f.init]
