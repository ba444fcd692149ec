"""Training methods: one module per method (its config class, loss builder and registry entry), one table.

- :mod:`~cmkit.methods.base`: what every method shares: :class:`MethodConfig` (the noise range),
  :class:`TaughtConfig` (the fields of the methods that take a teacher), :class:`MethodEntry`,
  :class:`TeacherRole`, :class:`Capability` and the sampling policies;
- :mod:`~cmkit.methods.edm`, :mod:`~cmkit.methods.ct`, :mod:`~cmkit.methods.ict`, :mod:`~cmkit.methods.cd`,
  :mod:`~cmkit.methods.ect`, :mod:`~cmkit.methods.scm` (sCT and sCD), :mod:`~cmkit.methods.lcm`,
  :mod:`~cmkit.methods.meanflow`, :mod:`~cmkit.methods.tcm`: the methods;
- :mod:`~cmkit.methods.registry`: :data:`REGISTRY` and its lookups; :func:`make_loss`;
- :mod:`~cmkit.methods.legacy`: method sections written before per-method configs.

Adding a method means adding its module and one line in :data:`REGISTRY`.
"""

from cmkit.methods.base import Capability, MethodConfig, MethodEntry, TaughtConfig, TeacherRole, init_fields
from cmkit.methods.cd import CDConfig
from cmkit.methods.ct import CTConfig
from cmkit.methods.ect import ECTConfig
from cmkit.methods.edm import EDMConfig
from cmkit.methods.ict import ICTConfig
from cmkit.methods.lcm import LCMConfig
from cmkit.methods.legacy import convert_flat, is_flat
from cmkit.methods.meanflow import MeanFlowConfig
from cmkit.methods.registry import (
    REGISTRY,
    make_loss,
    method_class,
    method_entry,
    methods_that,
    model_entry,
    model_spec,
    require,
    sampling_spec,
    switch_method,
    teacher_methods,
)
from cmkit.methods.scm import SCDConfig, SCTConfig
from cmkit.methods.tcm import TCMConfig

__all__ = ["REGISTRY", "CDConfig", "CTConfig", "Capability", "ECTConfig", "EDMConfig", "ICTConfig", "LCMConfig",
           "MeanFlowConfig",
           "MethodConfig", "MethodEntry", "SCDConfig", "SCTConfig", "TCMConfig", "TaughtConfig", "TeacherRole",
           "convert_flat",
           "init_fields", "is_flat", "make_loss", "method_class", "method_entry", "methods_that", "model_entry",
           "model_spec", "require", "sampling_spec", "switch_method", "teacher_methods"]
