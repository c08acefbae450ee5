#!/usr/bin/env python
"""Peak host memory and time of `python -m convert` on a synthetic checkpoint of several GB.

The script writes the synthetic checkpoint itself (random weights, real Lens key names and
widths, streamed to disk tensor by tensor so the generator stays small), then runs the
conversion in a child process and reports that process's peak resident memory:

  * VmHWM: the kernel's high-water mark of the child's resident set (anonymous + file-backed
    pages, including the transiently memory-mapped source tensors);
  * peak RssAnon: the child's anonymous memory (heap: converted arrays, orbax buffers), polled
    every 20 ms by this script (the kernel keeps no high-water mark for it);
  * the baseline: VmHWM of the same child right after importing jax, orbax and the converter.

Models (the source layout is derived from the converter's own mapping tables, so the keys are
exactly those the real checkpoints use):

  python scripts/benchmark_convert.py --model dit --layers 14            # 2.4 GB bf16 DiT, full width
  python scripts/benchmark_convert.py --model text_encoder --layers 4    # 2.8 GB GPT-OSS-20B widths, MXFP4
  python scripts/benchmark_convert.py --model text_encoder --layers 4 --keep-mxfp4
  python scripts/benchmark_convert.py --model dit --layers 48 --quantize int8   # the real DiT, stored int8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

MiB = 2**20
_ST_DTYPES = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}


def _st_dtype(dtype) -> str:
    import ml_dtypes

    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return "BF16"
    return _ST_DTYPES[np.dtype(dtype)]


def source_tensors(rules, expected) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, kind) of every source tensor the mapping `rules` reads, from the target shapes."""
    from lens_jax.weights.mapping import _plan

    out = []
    for plan in _plan(rules, expected):
        per_layer = plan.target_shape[1:] if plan.rule.stacked else plan.target_shape
        shapes = plan.rule.transform.source_shapes(per_layer)
        for keys in plan.layers:
            for key, shape in zip(keys, shapes):
                kind = "blocks" if key.endswith("_blocks") else "scales" if key.endswith("_scales") else "float"
                out.append((key, tuple(int(s) for s in shape), kind))
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], seed: int = 0) -> int:
    """Write random tensors (bf16 floats, uint8 MXFP4 blocks/scales) chunk by chunk; returns the file size."""
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    header, offset = {}, 0
    for key, shape, kind in tensors:
        dtype = bf16 if kind == "float" else np.dtype(np.uint8)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _st_dtype(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    chunk = 8 * MiB  # elements per write
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, kind in tensors:
            count = int(np.prod(shape, dtype=np.int64))
            scale = 0.02
            for start in range(0, count, chunk):
                m = min(chunk, count - start)
                if kind == "float":
                    f.write((rng.standard_normal(m, dtype=np.float32) * scale).astype(bf16).tobytes())
                elif kind == "blocks":
                    f.write(rng.bytes(m))
                else:  # E8M0 scales near 2^-5 .. 2^-3: finite, weight-sized values
                    f.write(rng.integers(122, 125, m, dtype=np.uint8).tobytes())
    return path.stat().st_size


def build_source(model: str, layers: int, root: Path) -> tuple[list[str], int]:
    """Write the synthetic source under `root`; returns (convert arguments naming it, bytes written)."""
    import jax.numpy as jnp

    from lens_jax import configs

    src = root / "src"
    if model == "dit":
        from lens_jax.weights.dit import dit_expected_shapes, dit_rules
        from lens_jax.transformer import TransformerConfig

        cfg = configs.load_json("lens/transformer.json")
        cfg["num_layers"] = layers
        folder = src / "transformer"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        config = TransformerConfig.from_dict(cfg)
        tensors = source_tensors(dit_rules(config), dit_expected_shapes(config, jnp.bfloat16))
        size = write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
        return ["--components", "transformer"], size
    if model == "text_encoder":
        from lens_jax.weights.text_encoder import text_encoder_expected_shapes, text_encoder_rules
        from lens_jax.text_encoder import TextEncoderConfig

        cfg = configs.load_json("lens/text_encoder.json")
        cfg["num_hidden_layers"] = layers
        if cfg.get("layer_types"):
            cfg["layer_types"] = cfg["layer_types"][:layers]
        cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        folder = src / "text_encoder"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        shutil.copytree(configs.path("tiny/tokenizer"), src / "tokenizer")  # convert copies a tokenizer along
        config = TextEncoderConfig.from_dict(cfg)
        rules = text_encoder_rules(config.attention_bias, "mxfp4", keep_mxfp4=False)
        tensors = source_tensors(rules, text_encoder_expected_shapes(config, jnp.bfloat16, packed=False))
        tensors.append(("model.norm.weight", (config.hidden_size,), "float"))
        size = write_safetensors(folder / "model.safetensors", tensors)
        return ["--components", "text_encoder"], size
    raise SystemExit(f"unknown --model {model!r}")


_CHILD = r"""
import json, sys, time
def status():
    d = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
            d[k] = int(v.split()[0]) * 1024
    return d
import jax, numpy, orbax.checkpoint.experimental.v1  # noqa
import lens_jax.tools.convert as cli, lens_jax.weights.dit, lens_jax.weights.text_encoder  # noqa
base = status()
t = time.perf_counter()
rc = cli.main(sys.argv[1:])
seconds = time.perf_counter() - t
print('BENCH ' + json.dumps({'rc': rc, 'seconds': seconds, 'baseline': base, 'end': status()}), flush=True)
"""


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_convert(args: list[str]) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    peak = [0]
    done = threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon(proc.pid))
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    lines = [ln for ln in out.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"conversion failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(lines[-1][6:])
    result["peak_rss_anon"] = peak[0]
    result["stderr"] = err
    return result


def piece_sizes(params: Path, stacked_key: str) -> tuple[int, int]:
    """(bytes of the non-layer leaves, bytes of layer 0) as stored in the converted orbax checkpoint."""
    import orbax.checkpoint.experimental.v1 as ocp
    from flax import traverse_util

    flat = traverse_util.flatten_dict(ocp.metadata(params).metadata)
    nbytes = lambda m: int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize  # noqa: E731
    head = sum(nbytes(m) for k, m in flat.items() if k[0] != stacked_key)
    layer = sum(nbytes(m) for k, m in flat.items() if k[0] == stacked_key and k[1] == "0")
    return head, layer


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dit", "text_encoder"], default="dit")
    p.add_argument("--layers", type=int, default=None, help="layers of the synthetic model (default: dit 14, "
                                                             "text_encoder 4: both > 2 GB)")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16", help="dtype written by the conversion")
    p.add_argument("--keep-mxfp4", action="store_true", help="text encoder: keep the experts packed")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None, help="dit: store it quantised")
    p.add_argument("--workdir", default=None, help="where to write the synthetic checkpoint and the output "
                                                  "(default: a fresh temporary folder, removed at the end)")
    p.add_argument("--keep-files", action="store_true", help="do not delete the work folder")
    args = p.parse_args()
    layers = args.layers or {"dit": 14, "text_encoder": 4}[args.model]

    root = Path(tempfile.mkdtemp(prefix="conv_bench_", dir=args.workdir))
    try:
        t = time.perf_counter()
        extra, size = build_source(args.model, layers, root)
        print(f"synthetic {args.model}: {layers} layers, {size / 2**30:.2f} GiB written in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        out = root / "out"
        cmd = ["--src", str(root / "src"), "--dst", str(out), "--dtype", args.dtype, "--no-progress", *extra]
        if args.keep_mxfp4:
            cmd.append("--keep-mxfp4")
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        r = run_convert(cmd)
        manifest = json.loads((out / "manifest.json").read_text())
        component, entry = next(iter(manifest["components"].items()))
        head, layer = piece_sizes(out / entry["params"], entry["stacked_key"])
        report = {
            "model": args.model, "layers": layers, "dtype": args.dtype, "keep_mxfp4": args.keep_mxfp4, "quantize": args.quantize,
            "source_GiB": round(size / 2**30, 3),
            "output_GiB": round(du(out) / 2**30, 3),
            "param_GiB": round(entry["param_bytes"] / 2**30, 3),
            "one_layer_MiB": round(layer / MiB, 1),
            "non_layer_MiB": round(head / MiB, 1),
            "seconds": round(r["seconds"], 1),
            "VmHWM_MiB": round(r["end"]["VmHWM"] / MiB),
            "peak_RssAnon_MiB": round(r["peak_rss_anon"] / MiB),
            "baseline_VmHWM_MiB": round(r["baseline"]["VmHWM"] / MiB),
        }
        print(json.dumps(report))
        print(r["stderr"].strip(), file=sys.stderr)
    finally:
        if not args.keep_files:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
