"""scripts/_hlo_kernels.py (the optimised-HLO reader behind scripts/aot_gpu.py): kernels, kinds, FLOPs, bytes, sources.

The GPU compile itself needs the CUDA plugin (docs/aot_gpu.md) and is not run here; the reader is
checked on a hand-written XLA:GPU-style module (the constructs aot_gpu.py meets: a layer loop, a
Triton GEMM fusion, the cuDNN attention custom call, a per-layer weight dynamic-slice, a transpose,
stack frames) and on a program XLA:CPU compiles here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _hlo_kernels as hk  # noqa: E402

GPU_MODULE = """HloModule jit_step, is_scheduled=true

FileNames
1 "/x/lens_jax/models/transformer.py"
2 "/x/lens_jax/models/nn.py"

FunctionNames
1 "block"
2 "rms_norm"

FileLocations
1 {file_name_id=1 function_name_id=1 line=340 end_line=340 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=27 end_line=27 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}


%gemm_comp (p0: bf16[64,32], p1: bf16[32,16]) -> bf16[64,16] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  %p1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={stack_frame_id=1}
}

%fused_dynamic_slice (param_0: bf16[8,32,16], param_1: s32[]) -> bf16[1,32,16] {
  %param_0 = bf16[8,32,16]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c = s32[] constant(0)
  %dynamic_slice.1 = bf16[1,32,16]{2,1,0} dynamic-slice(%param_0, %param_1, %c, %c), dynamic_slice_sizes={1,32,16}
  ROOT %copy.1 = bf16[1,32,16]{2,1,0} copy(%dynamic_slice.1)
}

%fused_norm (param_0.1: bf16[64,16]) -> bf16[64,16] {
  %param_0.1 = bf16[64,16]{1,0} parameter(0)
  %m = bf16[64,16]{1,0} multiply(%param_0.1, %param_0.1), metadata={stack_frame_id=2}
  ROOT %r = bf16[64,16]{1,0} rsqrt(%m), metadata={stack_frame_id=2}
}

%body (carry: (s32[], bf16[64,32], bf16[8,32,16], bf16[2,64,2,8])) -> (s32[], bf16[64,32], bf16[8,32,16], bf16[2,64,2,8]) {
  %carry = (s32[], bf16[64,32]{1,0}, bf16[8,32,16]{2,1,0}, bf16[2,64,2,8]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %x = bf16[64,32]{1,0} get-tuple-element(%carry), index=1
  %w = bf16[8,32,16]{2,1,0} get-tuple-element(%carry), index=2
  %q = bf16[2,64,2,8]{3,2,1,0} get-tuple-element(%carry), index=3
  %slice_fusion = bf16[1,32,16]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_dynamic_slice
  %bc = bf16[32,16]{1,0} bitcast(%slice_fusion)
  %gemm = bf16[64,16]{1,0} fusion(%x, %bc), kind=kCustom, calls=%gemm_comp, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %norm = bf16[64,16]{1,0} fusion(%gemm), kind=kLoop, calls=%fused_norm
  %fmha = (bf16[2,2,64,8]{3,1,2,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
  %t = bf16[64,32]{0,1} transpose(%x), dimensions={1,0}
  ROOT %out = (s32[], bf16[64,32]{1,0}, bf16[8,32,16]{2,1,0}, bf16[2,64,2,8]{3,2,1,0}) tuple(%i, %t, %w, %q)
}

%cond (c: (s32[], bf16[64,32], bf16[8,32,16], bf16[2,64,2,8])) -> pred[] {
  %c = (s32[], bf16[64,32]{1,0}, bf16[8,32,16]{2,1,0}, bf16[2,64,2,8]{3,2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (a: (s32[], bf16[64,32], bf16[8,32,16], bf16[2,64,2,8])) -> (s32[], bf16[64,32], bf16[8,32,16], bf16[2,64,2,8]) {
  %a = (s32[], bf16[64,32]{1,0}, bf16[8,32,16]{2,1,0}, bf16[2,64,2,8]{3,2,1,0}) parameter(0)
  ROOT %loop = (s32[], bf16[64,32]{1,0}, bf16[8,32,16]{2,1,0}, bf16[2,64,2,8]{3,2,1,0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
}
"""


@pytest.fixture(scope="module")
def gpu_module():
    return hk.parse(GPU_MODULE)


def test_finds_the_layer_loop_and_its_kernels(gpu_module):
    assert gpu_module.entry == "main"
    assert hk.while_bodies(gpu_module) == [("main", "body")]
    assert hk.trip_count(gpu_module, "body") == 8
    kinds = [k.kind for k in hk.kernels(gpu_module, "body")]
    assert kinds == ["weight slice", "gemm", "elementwise", "attention", "layout"]


def test_flops_and_bytes(gpu_module):
    ks = {k.name: k for k in hk.kernels(gpu_module, "body")}
    assert ks["gemm"].flops == 2 * 64 * 16 * 32
    assert ks["gemm"].bytes == 2 * (64 * 32 + 32 * 16 + 64 * 16)
    assert ks["fmha"].flops == 4 * 2 * 64 * 2 * 8 * 64  # 4 B T H D S
    # The weight slice reads one layer of the [8, 32, 16] stack, not all of it.
    assert ks["slice_fusion"].bytes == 2 * (32 * 16) * 2 + 4
    assert ks["gemm"].roofline_ms(1e12, 1e30) == pytest.approx(1e3 * ks["gemm"].flops / 1e12)


def test_sources_name_the_model_line(gpu_module):
    ks = {k.name: k for k in hk.kernels(gpu_module, "body")}
    assert ks["gemm"].sources == ["models/transformer.py:340 block"]
    # frame 2 (nn.py) is called from frame 1 (parent_frame_id counts from 1): the model line, then the helper
    assert ks["norm"].sources == ["models/transformer.py:340 block (models/nn.py:27 rms_norm)"]
    assert ks["norm"].ops == {"multiply": 1, "rsqrt": 1}


def test_reads_a_compiled_cpu_program():
    def f(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
    ws = jax.ShapeDtypeStruct((5, 32, 32), jnp.float32)
    module = hk.parse(jax.jit(f).lower(x, ws).compile().as_text())
    loops = hk.while_bodies(module)
    assert loops, "the scan should compile to a while loop"
    body = loops[0][1]
    assert hk.trip_count(module, body) in (5, None)
    ks = hk.kernels(module, body)
    assert sum(k.flops for k in ks) == 2 * 16 * 32 * 32
