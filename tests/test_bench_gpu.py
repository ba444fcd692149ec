"""bench/gpu.sh --smoke: every code path of the GPU readiness benchmark on tiny networks, on the CPU."""

import json
import subprocess
from pathlib import Path

from cmkit.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke_measures_every_cifar_preset(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--smoke", "--out", str(out)], check=True, timeout=300,
                   capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert set(result["presets"]) == {name for name in PRESETS if name.startswith("cifar10-")}
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
