"""The fast-path profiler sorts kernels by what they compute, not by the ops named in them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_fast_step.py"


def _kind():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("profile_fast_step", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return mod.kind


def test_kernels_are_sorted_by_what_they_compute():
    kind = _kind()
    # names as the H200 profile of this stop printed them
    assert kind("gemv_kernel") == "matmul"
    assert kind("nvjet_sm90_tst_256x96_64x4_2x1_v_bz_coopA_TNT") == "matmul"
    assert kind("attention_partial_kernel") == "attention"
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    # Inductor's fused element-wise kernels, named after the ops they feed
    assert kind("triton_red_fused__to_copy_add_gemv_mean_mul_pow_rsqrt_3") == "other"
    assert kind("triton_poi_fused_add_cat_decode_attention_index_copy_mul_neg_select_slice") == "other"
    assert kind("triton_tem_fused_mm_0") == "matmul"
