"""Method sections written before per-method configs (cmkit 0.1): detected and converted on load."""

from __future__ import annotations

from typing import Any

from cmkit.errors import CmkitError
from cmkit.methods.base import init_fields
from cmkit.methods.registry import method_class

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

