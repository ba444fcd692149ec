"""The method table: one entry per method, one lookup.

Adding a method means one new module of :mod:`cmkit.methods` (its config, loss builder and
:class:`~cmkit.methods.base.MethodEntry`) and one line in :data:`REGISTRY`.
"""

from __future__ import annotations

from torch import nn

from cmkit.errors import CmkitError
from cmkit.losses import WARM_START_LEVELS, EDMLoss, Loss, WarmStarted
from cmkit.methods import cd, ct, ect, edm, ict, lcm, meanflow, scm, tcm
from cmkit.methods.base import Capability, MethodConfig, MethodEntry, TeacherRole, init_fields
from cmkit.sampling import SamplingSpec

REGISTRY: dict[str, MethodEntry] = {entry.name: entry for entry in (
    edm.ENTRY,
    ct.ENTRY,
    ict.ENTRY,
    cd.ENTRY,
    ect.ENTRY,
    scm.SCT,
    scm.SCD,
    lcm.ENTRY,
    meanflow.ENTRY,
    tcm.ENTRY,
)}


def method_entry(name: str, *, where: str = "method.name") -> MethodEntry:
    """The entry of method ``name``; CmkitError naming ``where`` and listing the known methods otherwise."""
    if name not in REGISTRY:
        raise CmkitError(f"{where}: unknown method '{name}'; expected one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def method_class(name: str, *, where: str = "method.name") -> type[MethodConfig]:
    """The config class of method ``name`` (CmkitError as :func:`method_entry`)."""
    return method_entry(name, where=where).config


def methods_that(capability: Capability) -> list[str]:
    """The names of the methods whose models have ``capability``, in registry order."""
    return [name for name, entry in REGISTRY.items() if entry.can(capability)]


def teacher_methods() -> list[str]:
    """The names of the methods that take a ``--teacher``."""
    return [name for name, entry in REGISTRY.items() if entry.teacher.takes_teacher]


def switch_method(method: MethodConfig, name: str) -> MethodConfig:
    """Method ``name`` with its defaults, keeping the fields it shares with ``method`` (the noise range)."""
    return method_class(name)(**{key: getattr(method, key) for key in init_fields(MethodConfig)})


def model_entry(model: nn.Module) -> MethodEntry:
    """The entry of the method that trained ``model`` (its ``method_name``, set by
    :func:`cmkit.checkpoint.build_model`); CmkitError for a model that names none."""
    name = getattr(model, "method_name", "")
    if name not in REGISTRY:
        raise CmkitError(f"a {type(model).__name__} that names no cmkit method ({name!r}); expected a model "
                         f"loaded with cmkit.load_export or built with cmkit.build_model")
    return REGISTRY[name]


def require(entry: MethodEntry, capability: Capability, what: str) -> None:
    """Refuse ``what`` (e.g. "zero-shot editing") for a model of ``entry``'s method unless it has
    ``capability``: one line naming the method, the capability and the methods that have it."""
    if not entry.can(capability):
        raise CmkitError(f"{what} needs a model with the '{capability.value}' capability (one trained with "
                         f"{', '.join(methods_that(capability))}); this model was trained with {entry.name}")


def sampling_spec(method: MethodConfig) -> SamplingSpec:
    """The untuned sampling spec of a model trained with ``method``: its entry's policy for its noise range."""
    return SamplingSpec.from_policy(method_entry(method.name).policy, sigma_min=method.sigma_min,
                                    sigma_max=method.sigma_max, sigma_data=method.sigma_data)


def model_spec(model: nn.Module) -> SamplingSpec:
    """The untuned sampling spec of ``model`` (its entry's policy for its own noise range and sigma_data);
    a loaded export's spec (:func:`cmkit.checkpoint.load_export`) adds the schedules tuned for it."""
    return SamplingSpec.from_policy(model_entry(model).policy, sigma_min=model.sigma_min, sigma_max=model.sigma_max,
                                    sigma_data=model.sigma_data)


def make_loss(method: MethodConfig, *, dim: int, total_images: int, teacher: nn.Module | None = None,
              augment: float = 0.0) -> Loss:
    """The loss a method config describes (its entry's ``build_loss``).

    ``dim`` is D, the number of values in one sample in model space (:attr:`cmkit.codec.Codec.dim`);
    ``total_images`` the run's length in training images (the curricula's K); ``teacher`` the diffusion denoiser
    whose outputs CD and sCD learn from (CmkitError when a method whose teacher is its target has none); ``augment``
    the probability p of EDM's augmentation pipeline (``data.augment``), which only the EDM loss uses (validation
    refuses it for the others), never a warm-start. A method with ``warm_start_kimg > 0`` gets its loss
    :class:`cmkit.losses.WarmStarted`, with EDM's published noise levels (:data:`cmkit.losses.WARM_START_LEVELS`);
    its own loss then sees the remaining images.
    """
    entry = method_entry(method.name)
    if entry.teacher.required_by_loss and teacher is None:
        what = "a stage-one consistency model" if entry.teacher is TeacherRole.STAGE_ONE else "a diffusion teacher"
        raise CmkitError(f"method {method.name}: {what} is required; pass --teacher MODEL")
    warm = method.warm_start_images
    loss = entry.build_loss(method, dim=dim, total_images=total_images - warm, teacher=teacher, augment=augment)
    if warm == 0:
        return loss
    if teacher is None:
        raise CmkitError(f"method.warm_start_kimg={method.warm_start_kimg:g}: a warm-start regresses a teacher's "
                         "denoiser; pass --teacher MODEL or set method.warm_start_kimg=0")
    edm_loss = EDMLoss(**WARM_START_LEVELS, sigma_data=method.sigma_data, teacher=teacher)
    return WarmStarted(loss, warm=edm_loss, images=warm)
