"""bench/gpu.py --smoke: every code path of the GPU readiness benchmark on tiny networks, on the CPU, in-process.

Five CIFAR-10 presets cover the paths: EDM (Heun sampling, the ratios' reference), iCT (one-step sampling),
sCT and sCD (forward-mode steps, the step-time ratios; sCD's teacher is the student's network) and CD-small (a
teacher with its own, larger network); the other presets take the same paths as one of these.
"""

import importlib.util
import json
from pathlib import Path

import torch

from cmkit.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
COVERING = ("cifar10-edm", "cifar10-ict", "cifar10-sct", "cifar10-scd", "cifar10-cd-small")


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_smoke_measures_the_presets_it_is_given(tmp_path):
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        _gpu_bench().main(["--smoke", "--presets", ",".join(COVERING), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --smoke runs on one thread
    result = json.loads(out.read_text())
    assert set(COVERING) <= set(PRESETS) and list(result["presets"]) == list(COVERING)
    for name, p in result["presets"].items():
        for precision in ("fp32", "bf16"):
            train = p["train"][precision]
            # The simulated out-of-memory error above 4 images made the 8-image batch accumulate 2 micro-batches.
            assert (train["accum"], train["micro_batch"]) == (2, 4), name
            hours = p["kimg"] * 1000 / train["images_per_s"] / 3600
            assert abs(p["projected_gpu_hours"][precision] - hours) < 1e-9 * hours
            assert p["sample"][precision]["images_per_s"] > 0
        assert p["sample"]["fp32"]["sampler"] == ("heun 35 NFE" if PRESETS[name][1].method.name == "edm" else "1 step")
    assert set(result["step_time_ratio_to_edm_bf16"]) == {"sct", "scd"}
    assert result["one_step_speedup_over_heun35_bf16"] > 0
