"""What every method shares: the config bases, the registry entry and its vocabulary.

A method (:mod:`cmkit.methods`) is one :class:`MethodEntry` in its own module: its config class (a small frozen
dataclass deriving from :class:`MethodConfig`, selected by its ``name``), its loss builder, the wrapper of
:mod:`cmkit.precond` its model is, its :class:`cmkit.sampling.SamplingPolicy`, its :class:`TeacherRole`, whether
its loss learns the network's log-variance head, its :class:`Capability` set and its own checks of a whole
config. Callers ask the entry (:func:`cmkit.methods.method_entry`), never compare method names.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from cmkit.distances import Distance, make_distance
from cmkit.losses import GridPairs, Loss
from cmkit.precond import Preconditioned
from cmkit.sampling import SamplingPolicy

if TYPE_CHECKING:
    from cmkit.config import Config

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
        """Keyword arguments of the method's wrapper (:attr:`MethodEntry.wrapper`) beyond the noise range."""
        return {}

    @property
    def warm_start_images(self) -> int:
        """Training images spent regressing a teacher's denoiser before the method's own loss (:class:`TaughtConfig`);
        none for a method without a teacher."""
        return 0

    @property
    def warm_start_rate(self) -> float | None:
        """The learning rate of the warm-start phase (:class:`TaughtConfig`); None: the run's ``train.lr``."""
        return None

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """[w_min, w_max] of the guidance scale w the method trains its model to take as an input (its network has
        ``net.guidance_dim > 0`` and its teacher is sampled with classifier-free guidance at w: LCM); None for a
        method whose model takes no guidance scale."""
        return None

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
class ConsistencyDistance(MethodConfig):
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
    images regresses the teacher's denoiser outputs at EDM's noise levels (one teacher evaluation per image; output
    distillation, as BK-SDM's output loss) before its own loss begins (:class:`cmkit.losses.WarmStarted`). That
    phase trains at ``warm_start_lr`` (None, ``auto``: ``train.lr``), a denoiser's rate rather than the consistency
    recipe's (:func:`cmkit.schedules.learning_rate`).
    """

    teacher: str = ""
    student_net: str = "teacher"
    warm_start_kimg: float = 0.0
    warm_start_lr: float | None = None

    @property
    def warm_start_images(self) -> int:
        return round(self.warm_start_kimg * 1000)

    @property
    def warm_start_rate(self) -> float | None:
        return self.warm_start_lr

    def problems(self) -> list[str]:
        warm, rate = self.warm_start_kimg, self.warm_start_lr
        checks = [(self.student_net in STUDENT_NETS, f"method.student_net: unknown value '{self.student_net}'; "
                   f"expected one of {', '.join(STUDENT_NETS)}"),
                  (warm >= 0 and math.isfinite(warm), f"method.warm_start_kimg: expected >= 0, got {warm}"),
                  (rate is None or (rate > 0 and math.isfinite(rate)),
                   f"method.warm_start_lr: expected a positive number (or auto: train.lr), got {rate}"),
                  (rate is None or warm > 0, f"method.warm_start_lr={rate}: the rate of a warm-start, but there is "
                   "none (method.warm_start_kimg=0); set method.warm_start_kimg or method.warm_start_lr=auto")]
        return super().problems() + [message for ok, message in checks if not ok]


def jvp_step(step: float) -> tuple[bool, str]:
    """(holds, message): a finite-difference JVP's step ``method.jvp_step`` is positive and finite."""
    return step > 0 and math.isfinite(step), f"method.jvp_step: expected a positive number, got {step}"


def grid_sizes(s0: int, s1: int) -> tuple[bool, str]:
    """(holds, message): a curriculum's final grid size ``s1`` is at least its first, ``s0``."""
    return s1 >= s0, f"method.s1: expected >= s0 ({s0}), got {s1}"


def ema_rate(key: str, value: float) -> tuple[bool, str]:
    """(holds, message): an EMA rate ``method.key`` lies in [0, 1)."""
    return 0 <= value < 1, f"method.{key}: expected a value in [0, 1), got {value}"


def init_fields(cls: type[MethodConfig]) -> list[str]:
    """The fields of method class ``cls`` that a config sets (all but ``name``)."""
    return [f.name for f in fields(cls) if f.init]


# ------------------------------------------------------------------------------------------- the entry

class TeacherRole(enum.Enum):
    """What a trained diffusion model (``--teacher``) is to a method."""

    NONE = "none"  # the method trains without one (EDM, CT, iCT)
    INIT_OPTIONAL = "init-optional"  # it may seed the student's weights, or the method trains from scratch (sCT)
    INIT_REQUIRED = "init-required"  # it must seed the student's weights: a cmkit EDM model (ECT)
    TARGET = "target"  # its outputs are the loss's target, a cmkit or diffusers model (CD, sCD)
    STAGE_ONE = "stage-one"  # a cmkit consistency model: it seeds the student and is the target below t' (TCM)

    @property
    def takes_teacher(self) -> bool:
        """True when ``--teacher`` applies to the method at all."""
        return self is not TeacherRole.NONE

    @property
    def seeds_only(self) -> bool:
        """True when the teacher only seeds the student's weights (so it must be a cmkit model)."""
        return self in (TeacherRole.INIT_OPTIONAL, TeacherRole.INIT_REQUIRED)

    @property
    def required_by_loss(self) -> bool:
        """True when the method's loss evaluates the teacher (so a run without one is refused)."""
        return self in (TeacherRole.TARGET, TeacherRole.STAGE_ONE)


class Capability(enum.Enum):
    """What a method's models can do or be used for beyond training and ``cmkit sample``/``eval``."""

    EDIT = "edit"  # zero-shot editing (CM paper, Alg. 4): cmkit edit, the studio's edits
    EXPORT = "export"  # cmkit export --diffusers (a ConsistencyModelPipeline)
    TUNE_STEPS = "tune-steps"  # cmkit tune-steps (the 2-step intermediate level)
    SERVE = "serve"  # cmkit serve (the studio's model)
    TEACH = "teach"  # be the --teacher of a method that takes one, or the studio's comparison
    AUGMENT = "augment"  # train with EDM's augmentation pipeline (data.augment)
    CONSISTENCY_METRIC = "consistency-metric"  # scored by cmkit.monitor's consistency metric (a consistency function)


# A configuration check of a whole config: (holds, message).
ConfigCheck = Callable[["Config"], tuple[bool, str]]
LossBuilder = Callable[..., Loss]


@dataclass(frozen=True)
class MethodEntry:
    """One method: everything the rest of cmkit asks about it.

    ``config``: its config class (``config.name`` is the method's name); ``build_loss(method, *, dim,
    total_images, teacher, augment)``: its loss (:func:`cmkit.methods.make_loss` adds a warm-start);
    ``wrapper``: the parameterisation its model is; ``policy``: how its models sample by default;
    ``teacher``: its teacher role; ``logvar_head``: whether its loss learns the network's log-variance head
    (so the head is built, and rests unused during a warm-start); ``time2_embedding``: whether its network takes a
    second time input (:class:`cmkit.nets.UNet`, MeanFlow's ``t - r``); ``capabilities``; ``checks``: its own
    constraints on a whole config (beyond its method section's :meth:`MethodConfig.problems`).
    """

    config: type[MethodConfig]
    build_loss: LossBuilder
    wrapper: type[Preconditioned]
    policy: SamplingPolicy
    teacher: TeacherRole
    capabilities: frozenset[Capability]
    logvar_head: bool = False
    time2_embedding: bool = False
    checks: tuple[ConfigCheck, ...] = ()

    @property
    def name(self) -> str:
        return self.config.name

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def problems(self, config: Config) -> list[str]:
        """The messages of this method's checks that ``config`` fails."""
        return [message for ok, message in (check(config) for check in self.checks) if not ok]


# Consistency models sample in one step (CM paper); 2 steps pass through the published level 0.821 (iCT and
# ECT on CIFAR-10, sigma_data 0.5).
CONSISTENCY_POLICY = SamplingPolicy("consistency", 1, (1, 2, 4), ("consistency",), lambda sigma_data: 0.821)
# TrigFlow models: sCM's 2-step sampling passes through t_mid = 1.1 (Lu and Song 2024), sigma = sigma_data tan t.
TRIGFLOW_POLICY = SamplingPolicy("consistency", 1, (1, 2, 4), ("consistency",),
                                 lambda sigma_data: sigma_data * math.tan(1.1))
# EDM diffusion models: Heun with 18 levels, 35 evaluations (EDM).
DIFFUSION_POLICY = SamplingPolicy("heun", 18, (18,), ("heun", "euler"))

# What every consistency method's models can do.
CONSISTENCY_CAPABILITIES = frozenset({Capability.EDIT, Capability.EXPORT, Capability.TUNE_STEPS, Capability.SERVE,
                                      Capability.CONSISTENCY_METRIC})


def shared_dropout(config: Config) -> tuple[bool, str]:
    """A consistency loss replays the generators so student and target draw one dropout mask; a compiled network
    draws its masks with its own generator, so that guarantee would not hold."""
    t, dropout = config.train, config.net.dropout
    return (not (t.compile and dropout > 0),
            f"train.compile=true with net.dropout={dropout}: a compiled network does not replay the dropout mask "
            "that a consistency loss's student and target must share; set train.compile=false or net.dropout=0")


# ------------------------------------------------------------------------------ parts of the loss builders

def grid_pairs(method: Any, num_scales: Callable[[int], int], **kw: Any) -> GridPairs:
    """Adjacent pairs of the Karras grid of ``method``'s noise range and ``rho`` (CT, iCT, CD)."""
    return GridPairs(num_scales, sigma_min=method.sigma_min, sigma_max=method.sigma_max, rho=method.rho, **kw)


def distance_of(method: Any, dim: int) -> Distance:
    """The distance a consistency method's config names (its ``distance`` and ``huber_c``: a
    :class:`ConsistencyDistance`, or LCM's), for samples of ``dim`` values."""
    return make_distance(method.distance, dim=dim, c=method.huber_c)


def no_target(images_seen: int) -> None:
    """The target-rate schedule of a method without a target network (its target is the student under stop-grad)."""
    return None
