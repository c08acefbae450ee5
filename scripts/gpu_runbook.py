#!/usr/bin/env python
"""Every missing GPU figure of issues 11 and 16, in groups that each fit one <= 10-minute device command.

Before the lease (on the CPU box, from the checkout the session runs in, i.e. the lead's):

    scripts/gpu_prepare.sh --reference PATH   # wheels missing on the device image -> .gpu_wheels/, upstream DiT -> .gpu_ref/
    python scripts/gpu_runbook.py --dry-run --group 1     # same steps, tiny sizes, on CPU (also 2, 3)

During the lease, one `run` tool call per group, most important first (each call <= 2000 characters;
`python scripts/gpu_runbook.py --print-commands` prints them):

    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_runbook.py --group 1 --out $OUT", timeout_s=600,
        carry=[".gpu_wheels", ".gpu_ref"])
    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_runbook.py --group 2 --out $OUT", timeout_s=600,
        carry=[".gpu_wheels", ".gpu_ref"])
    run(command="PYTHONUNBUFFERED=1 python3 scripts/gpu_runbook.py --group 3 --out $OUT", timeout_s=600,
        carry=[".gpu_wheels", ".gpu_ref"])

Groups (`--list` prints every step with its command, time cap and the issue row it fills):
  1. issue 11, the headline rows: DiT step MFU at 1024² / 1440² (bf16), Lens / Turbo 1024² end to end
     (text encoding + sampling + decode), text encoder one prompt / CFG pair, the DiT step with cuBLAS
     instead of Triton GEMMs and Lens 1024² with the sampler's XLA defaults (Triton GEMMs; the sampler
     compiles with cuBLAS GEMMs on GPU, lens_jax.sampling.compiler_options), a profiler breakdown of
     the DiT step per kernel.
  2. issue 11, quantised and side by side: FP8 and int8 DiT end to end with the cosine of the final
     latents vs bf16, the MXFP4 decode fusion check (optimised HLO), the MoE dispatch per token count,
     lens-jax vs PyTorch on the same GPU (upstream DiT from .gpu_ref/, transformers GPT-OSS, diffusers VAE).
  3. issue 16, offload: scripts/benchmark_offload.py per (card size, resolution, mode), each in its own
     process under XLA_PYTHON_CLIENT_MEM_FRACTION for 8 / 12 / 16 / 24 GiB, then end to end with the text
     encoder under "all" / "text_encoder".

Each group starts with a preflight (devices, versions, the carried wheels installed into /tmp/gpu_site,
the project installed with --no-deps, imports of every runtime dependency, real-size shape checks);
each step runs in its own process with a time cap, inside the group's budget (default 480 s, so the
command ends inside the run tool's 600 s and three groups plus a machine start fit the session's 30
minutes of device time); a failed or timed-out step is recorded and the next one runs. Group 3 has more
cells than its budget reaches (ordered by importance): before its call read `status`'s budget_left_s and
give `--budget` (budget_left_s - 120, at most 560); cells left over can run in a later call with
`--steps name,name`.
Written under --out: `group<N>.log` (every step's output) and `summary_group<N>.json` (rewritten after
every step: status, seconds, command, the output's tail, the JSON rows of steps that write them), two
files a group, well inside the tool's 8 files.

`--dry-run` (alias `--config tiny`) runs the same steps on this CPU box with tiny sizes and one run each.
After the lease, `python scripts/gpu_runbook.py --report <files_at>` prints every group's results as
markdown (step table, commands, the JSON rows as tables, each step's output tail) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ".gpu_wheels"
REF_DIR = ".gpu_ref"
REFERENCE_DIT = f"{REF_DIR}/lens_transformer_ref.py"
CARRY = (WHEELS, REF_DIR)
SITE = "/tmp/gpu_site"
GROUP_BUDGET_S = 480
TAIL_LINES = 25
TRITON_OFF = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}


@dataclasses.dataclass(frozen=True)
class Step:
    """One benchmark process. `args` at real size on the GPU; `tiny` the same code paths at tiny size for
    the CPU dry-run (None: not run in a dry-run, with the reason in `fills`)."""

    name: str
    group: int
    script: str  # under scripts/
    args: tuple[str, ...]
    tiny: tuple[str, ...] | None
    cap_s: int
    fills: str  # the issue row(s) the figure goes into
    env: tuple[tuple[str, str], ...] = ()
    mem_cap_gib: float | None = None  # XLA_PYTHON_CLIENT_MEM_FRACTION for a card of this size
    writes_json: bool = False  # the script takes --json PATH; the rows go into the summary
    needs_reference: bool = False  # --reference-dit: skipped when the upstream DiT was not carried


def _offload(name: str, gib: float | None, size: int, mode: str, cap: int = 120) -> Step:
    card = f"{gib:g} GiB card" if gib else "whole GPU"
    return Step(name, 3, "benchmark_offload.py",
                ("--config", "lens", "--size", f"{size}x{size}", "--variants", "lens,lens-turbo", "--modes", mode,
                 "--runs", "2"),
                ("--config", "tiny", "--size", "64x64", "--variants", "lens-turbo", "--modes", mode, "--runs", "1"),
                cap, f"issue 16 offload table: {mode}, {size}², {card}, Lens + Turbo (peak GiB, s/image)",
                mem_cap_gib=gib)


def _e2e_offload(name: str, gib: float, mode: str) -> Step:
    return Step(name, 3, "benchmark_end_to_end.py",
                ("--size", "1024x1024", "--variants", "lens,lens-turbo", "--quantize", "none", "--offload", mode,
                 "--runs", "2"),
                ("--config", "tiny", "--size", "64x64", "--variants", "lens-turbo", "--offload", mode, "--runs", "1"),
                240, f"issue 16: peak over encoding + sampling with offload={mode} in {gib:g} GiB, 1024²",
                mem_cap_gib=gib, writes_json=True)


def _dit(name: str, size: int, cap: int, fills: str, env=(), runs: int = 10, check: bool = True) -> Step:
    return Step(name, 1, "benchmark_transformer.py",
                ("--config", "full", "--height", str(size), "--width", str(size), "--runs", str(runs))
                + (("--check",) if check else ()),
                ("--config", "tiny", "--dtype", "f32", "--height", "64", "--width", "64", "--runs", "1")
                + (("--check",) if check else ()),
                cap, fills, env=tuple(env))


STEPS: tuple[Step, ...] = (
    # ---- group 1: issue 11's headline rows
    _dit("dit_step_1024", 1024, 150, "issue 11: DiT MFU at 1024² (bf16, cuDNN attention)"),
    _dit("dit_step_1440", 1440, 150, "issue 11: DiT MFU at 1440²"),
    Step("e2e_bf16_1024", 1, "benchmark_end_to_end.py",
         ("--size", "1024x1024", "--variants", "lens,lens-turbo", "--quantize", "none", "--runs", "3"),
         ("--config", "tiny", "--size", "64x64", "--variants", "lens,lens-turbo", "--runs", "1"),
         240, "issue 11: Lens 1024² 20 steps CFG and Turbo 4 steps, end to end incl. text encoding",
         writes_json=True),
    Step("text_encoder_1x192", 1, "benchmark_text_encoder.py",
         ("--config", "full", "--tokens", "192", "--batch", "1", "--moe", "all", "--runs", "5"),
         ("--config", "tiny", "--tokens", "32", "--batch", "1", "--moe", "all", "--runs", "1", "--no-compare-torch"),
         120, "issue 11: text encoder, one prompt (192-token bucket); every MoE dispatch, 'auto' is production"),
    Step("text_encoder_2x192", 1, "benchmark_text_encoder.py",
         ("--config", "full", "--tokens", "192", "--batch", "2", "--moe", "all", "--no-moe-layer", "--runs", "5"),
         ("--config", "tiny", "--tokens", "32", "--batch", "2", "--moe", "all", "--no-moe-layer", "--runs", "1",
          "--no-compare-torch"),
         120, "issue 11: text encoder, CFG pair (2 x 192 tokens)"),
    _dit("dit_step_1024_cublas", 1024, 120, "issue 11 item 3: DiT step with cuBLAS GEMMs (Triton GEMM off)",
         env=TRITON_OFF.items(), check=False),
    Step("e2e_lens_1024_xla_defaults", 1, "benchmark_end_to_end.py",
         ("--size", "1024x1024", "--variants", "lens", "--quantize", "none", "--runs", "3"),
         ("--config", "tiny", "--size", "64x64", "--variants", "lens", "--runs", "1"),
         180, "issue 11 item 3: the sampler without its GPU compiler options (Triton GEMMs; e2e_bf16_1024 has "
         "cuBLAS): keep lens_jax.sampling.compiler_options' GPU row only if e2e_bf16_1024 is faster",
         env=(("LENS_JAX_XLA_OPTIONS", "off"),), writes_json=True),
    Step("dit_profile_1024", 1, "profile_dit_step.py",
         ("--config", "full", "--height", "1024", "--width", "1024", "--runs", "3"),
         ("--config", "tiny", "--dtype", "f32", "--height", "64", "--width", "64", "--runs", "1"),
         120, "issue 11 item 3: where the DiT step's time goes (profiler trace summed per kernel and kind)",
         writes_json=True),
    # ---- group 2: quantised DiT, MXFP4 fusion, MoE dispatch, side by side with PyTorch
    Step("e2e_quantized_1024", 2, "benchmark_end_to_end.py",
         ("--size", "1024x1024", "--variants", "lens,lens-turbo", "--quantize", "none,fp8,int8", "--runs", "3"),
         ("--config", "tiny", "--size", "64x64", "--variants", "lens-turbo", "--quantize", "none,fp8,int8",
          "--runs", "1"),
         300, "issue 11: FP8 / int8 DiT end to end at 1024², cosine of the final latents vs bf16, peak memory",
         writes_json=True),
    Step("mxfp4_fusion", 2, "check_mxfp4_fusion.py", ("--tokens", "1024"),
         ("--width", "64", "--tokens", "16"),
         90, "issue 11 item 4: is the MXFP4 decode fused into the expert GEMMs (optimised HLO)", writes_json=True),
    Step("moe_dispatch", 2, "benchmark_moe.py", ("--tokens", "8", "64", "192", "1024", "4096", "--runs", "5",
                                                 "--impls", "grouped", "tiled", "ragged", "dense", "gmm"),
         ("--width", "64", "--tokens", "8", "64", "--runs", "1", "--impls", "grouped", "dense", "gmm"),
         150, "issue 11 item 4: MOE_DISPATCH GPU rows (grouped / ragged / dense per token count), and the opt-in "
              "MXFP4 kernel gmm with its max difference from dense: if it wins, its rows go into MOE_DISPATCH"),
    Step("vs_torch", 2, "benchmark_vs_torch.py",
         ("--reference-dit", REFERENCE_DIT, "--torch-device", "cuda", "--dtype", "bf16", "--dit-blocks", "8",
          "--grid", "64x64", "--text-tokens", "512", "--te-layers", "2", "--te-vocab", "8192", "--runs", "5"),
         ("--reference-dit", REFERENCE_DIT, "--torch-device", "cpu", "--dtype", "bf16", "--dit-blocks", "1",
          "--grid", "4x4", "--text-tokens", "16", "--te-layers", "1", "--te-vocab", "512", "--runs", "1",
          "--skip", "text_encoder"),
         300, "issue 11 item 7: side by side with PyTorch on the GPU (DiT / text encoder / VAE)",
         env=(("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45"),),  # leave PyTorch the other half of the GPU
         needs_reference=True),
    # ---- group 3: issue 16's offload table, each cell in its own process
    _offload("offload_1024_all_8g", 8, 1024, "all"),
    _offload("offload_1440_all_12g", 12, 1440, "all", cap=150),
    _offload("offload_1024_none_full", None, 1024, "none"),
    _offload("offload_1440_none_full", None, 1440, "none", cap=150),
    _e2e_offload("e2e_offload_all_8g", 8, "all"),
    _offload("offload_1024_none_12g", 12, 1024, "none"),
    _offload("offload_1024_none_8g", 8, 1024, "none", cap=90),
    _offload("offload_1440_none_16g", 16, 1440, "none", cap=150),
    _offload("offload_1440_all_8g", 8, 1440, "all", cap=150),
    _e2e_offload("e2e_offload_text_encoder_16g", 16, "text_encoder"),
    _offload("offload_1440_none_24g", 24, 1440, "none", cap=150),
    _offload("offload_1440_none_12g", 12, 1440, "none", cap=90),
)
GROUPS = sorted({s.group for s in STEPS})

PREFLIGHT_IMPORTS = """
import importlib, json, sys
mods = ["jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "transformers", "jinja2", "safetensors", "numpy",
        "ml_dtypes", "huggingface_hub", "tqdm", "PIL", "httpx", "torch", "diffusers", "lens_jax"]
out = {"python": sys.version.split()[0]}
for m in mods:
    try:
        mod = importlib.import_module(m)
        out[m] = getattr(mod, "__version__", "ok")
    except Exception as e:  # record and go on: a missing package fails only the steps that need it
        out[m] = f"MISSING: {type(e).__name__}: {e}"
try:
    import jax
    out["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    stats = jax.devices()[0].memory_stats() or {}
    out["bytes_limit"] = stats.get("bytes_limit")
except Exception as e:
    out["devices"] = f"FAILED: {e}"
try:
    import torch
    out["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
except Exception as e:
    out["torch_cuda"] = f"FAILED: {e}"
print(json.dumps(out))
"""


def gpu_total_bytes() -> int | None:
    """The first GPU's memory (nvidia-smi, so that no JAX process has to start), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def mem_fraction(cap_gib: float, total_bytes: int) -> str:
    """XLA_PYTHON_CLIENT_MEM_FRACTION that leaves JAX's pool `cap_gib` GiB of a `total_bytes` device."""
    return f"{min(1.0, cap_gib * 2**30 / total_bytes):.4f}"


def step_argv(step: Step, tiny: bool, reference: str = REFERENCE_DIT, python: str = sys.executable) -> list[str] | None:
    """The step's command line (None: no dry-run variant)."""
    args = step.tiny if tiny else step.args
    if args is None:
        return None
    args = tuple(reference if (a == REFERENCE_DIT and step.needs_reference) else a for a in args)
    return [python, f"scripts/{step.script}", *args]


def step_env(step: Step, tiny: bool, total_bytes: int | None) -> dict[str, str]:
    """What the step adds to the environment."""
    env = dict(step.env)
    if tiny:
        env.pop("XLA_FLAGS", None)  # GPU-only flags
        env["JAX_PLATFORMS"] = "cpu"
    elif step.mem_cap_gib is not None and total_bytes:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = mem_fraction(step.mem_cap_gib, total_bytes)
    return env


def run_process(argv: list[str], env: dict[str, str], cap_s: float, log) -> tuple[str, int | None, float, str]:
    """Run `argv` in its own process group under `cap_s` seconds, teeing its output into `log`.
    Returns (status, returncode, seconds, output)."""
    t0 = time.perf_counter()
    full_env = {**os.environ, **env}
    proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    with tempfile.TemporaryFile("w+") as buf:
        import threading

        def pump():
            for line in proc.stdout:
                buf.write(line)
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, cap_s))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group only
            rc = proc.wait()
            status = "timeout"
        reader.join(timeout=10)
        buf.seek(0)
        output = buf.read()
    return status, rc, time.perf_counter() - t0, output


def tail(text: str, n: int = TAIL_LINES) -> list[str]:
    """The last `n` lines, without the TPU-probing noise a CPU jax prints."""
    noise = ("W0000", "E0000", "TPU", "libtpu", "InitGoogle", "Source Location", "tfrc/runtime")
    return [line for line in text.splitlines() if not any(k in line for k in noise)][-n:]


def preflight(out: Path, log, tiny: bool, env: dict[str, str]) -> dict:
    """Devices, versions, carried wheels, project install, imports, real-size shape checks. Never fails."""
    info: dict = {}
    commands = []
    if not tiny:
        commands.append(("nvidia_smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], 30))
        wheels = sorted(str(p) for p in (ROOT / WHEELS).glob("*.whl"))
        if wheels:
            commands.append(("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], 120))
        commands.append(("project_install", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                             "--no-build-isolation", "--no-compile", "--target", SITE + "_project",
                                             "."], 120))
    commands.append(("imports", [sys.executable, "-c", PREFLIGHT_IMPORTS], 120))
    commands.append(("real_shapes", [sys.executable, "scripts/check_real_shapes.py"], 240))
    for name, argv, cap in commands:
        log.write(f"\n===== preflight {name}: {shlex.join(argv)}\n")
        try:
            status, rc, secs, output = run_process(argv, env, cap, log)
        except OSError as e:
            status, rc, secs, output = "failed", None, 0.0, str(e)
        info[name] = dict(status=status, rc=rc, seconds=round(secs, 1), tail=tail(output, 12))
        if name == "imports" and status == "ok":
            try:
                info[name]["versions"] = json.loads(output.strip().splitlines()[-1])
            except (ValueError, IndexError):
                pass
    return info


def run_group(group: int, out: Path, tiny: bool, budget_s: float, reference: str, only: set[str] | None,
              skip_preflight: bool = False) -> dict:
    """Run one group's steps in order inside `budget_s`; returns (and keeps writing) the summary."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary_path, log_path = out / f"summary_group{group}.json", out / f"group{group}.log"
    total = None if tiny else gpu_total_bytes()
    site = [SITE] if (ROOT / WHEELS).is_dir() and not tiny else []
    base_env = {"PYTHONPATH": os.pathsep.join([str(ROOT), *site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "PYTHONUNBUFFERED": "1", "LENS_JAX_COMPILATION_CACHE": "off"}
    if tiny:
        base_env["JAX_PLATFORMS"] = "cpu"
    summary: dict = dict(group=group, dry_run=tiny, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                         budget_s=budget_s, gpu_total_bytes=total, steps=[])

    def save():
        summary["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        summary_path.write_text(json.dumps(summary, indent=1))

    with open(log_path, "a") as log:
        if not skip_preflight:
            summary["preflight"] = preflight(out, log, tiny, base_env)
            save()
        for step in (s for s in STEPS if s.group == group and (only is None or s.name in only)):
            row = dict(name=step.name, fills=step.fills, cap_s=step.cap_s)
            argv = step_argv(step, tiny, reference)
            left = budget_s - (time.perf_counter() - t_start)
            if argv is None:
                row.update(status="skipped", why="no dry-run variant")
            elif step.needs_reference and not (ROOT / reference).is_file() and not Path(reference).is_file():
                row.update(status="skipped", why=f"{reference} missing: run scripts/gpu_prepare.sh and carry {REF_DIR}")
            elif left < 20:
                row.update(status="skipped", why=f"group budget spent ({budget_s:.0f} s)")
            else:
                env = {**base_env, **step_env(step, tiny, total)}
                json_path = None
                if step.writes_json:
                    json_path = Path(tempfile.mkdtemp()) / f"{step.name}.json"
                    argv = [*argv, "--json", str(json_path)]
                shown = " ".join(f"{k}={v}" for k, v in step_env(step, tiny, total).items())
                row.update(command=(shown + " " if shown else "") + shlex.join(["python", *argv[1:]]), started_s=round(
                    time.perf_counter() - t_start, 1))
                log.write(f"\n===== step {step.name} (cap {min(step.cap_s, left):.0f} s): {row['command']}\n")
                log.flush()
                status, rc, secs, output = run_process(argv, env, min(step.cap_s, left), log)
                row.update(status=status, rc=rc, seconds=round(secs, 1), tail=tail(output))
                if json_path is not None and json_path.is_file():
                    row["rows"] = json.loads(json_path.read_text())
                log.write(f"===== {step.name}: {status} (rc {rc}) in {secs:.1f} s\n")
            summary["steps"].append(row)
            save()
            print(f"[group {group}] {step.name:<30} {row['status']:<8} {row.get('seconds', 0):7.1f} s  {step.fills}",
                  flush=True)
    return summary


def report(folder: Path) -> str:
    """Markdown digest of the summaries in `folder` (what came back from the lease): per group the
    preflight versions, a table of steps, then each step's command, its JSON rows and its output tail."""
    lines = []
    for path in sorted(folder.glob("summary_group*.json")):
        summary = json.loads(path.read_text())
        lines.append(f"## group {summary['group']} ({'dry run, ' if summary.get('dry_run') else ''}"
                     f"started {summary['started']}, {summary.get('elapsed_s', 0):.0f} s)\n")
        versions = summary.get("preflight", {}).get("imports", {}).get("versions")
        if versions:
            lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
        lines.append("| step | status | seconds | fills |\n|---|---|---|---|")
        for step in summary["steps"]:
            lines.append(f"| {step['name']} | {step['status']}{' (' + step['why'] + ')' if 'why' in step else ''} | "
                         f"{step.get('seconds', '')} | {step['fills']} |")
        for step in summary["steps"]:
            if "command" not in step:
                continue
            lines.append(f"\n### {step['name']}: {step['status']}\n\n    {step['command']}\n")
            rows = step.get("rows")
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                keys = list(rows[0])
                lines.append("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
                lines += ["| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k))
                                            for k in keys) + " |" for r in rows]
            elif rows is not None:
                lines.append("```json\n" + json.dumps(rows, indent=1)[:3000] + "\n```")
            lines.append("```\n" + "\n".join(step.get("tail", [])) + "\n```")
        lines.append("")
    return "\n".join(lines) if lines else f"no summary_group*.json in {folder}"


def run_call(group: int) -> dict:
    """The device `run` tool call for one group."""
    return dict(command=f"PYTHONUNBUFFERED=1 python3 scripts/gpu_runbook.py --group {group} --out $OUT",
                timeout_s=600, carry=list(CARRY))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, choices=GROUPS, action="append",
                    help="group to run (repeatable; default: all in a dry-run, required otherwise)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="output folder (default: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, one run each (same code paths)")
    ap.add_argument("--config", choices=["real", "tiny"], default=None, help="tiny = --dry-run")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for the whole group (default {GROUP_BUDGET_S}; unbounded in a dry-run)")
    ap.add_argument("--steps", default=None, help="comma-separated step names (default: every step of the group)")
    ap.add_argument("--reference-dit", default=REFERENCE_DIT, help="the upstream DiT .py for the vs_torch step")
    ap.add_argument("--skip-preflight", action="store_true")
    ap.add_argument("--print-commands", action="store_true", help="print the device run tool calls and exit")
    ap.add_argument("--list", action="store_true", help="print every step and exit")
    ap.add_argument("--report", default=None, metavar="DIR",
                    help="print a markdown digest of the summaries in DIR (what a lease returned) and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0
    tiny = args.dry_run or args.config == "tiny"
    if args.print_commands:
        for g in GROUPS:
            call = run_call(g)
            print(f"# group {g}: " + "; ".join(s.name for s in STEPS if s.group == g))
            print(f"run(command={call['command']!r}, timeout_s={call['timeout_s']}, carry={call['carry']!r})")
        return 0
    if args.list:
        for s in STEPS:
            env = " ".join(f"{k}={v}" for k, v in s.env) + (f" [mem cap {s.mem_cap_gib:g} GiB]" if s.mem_cap_gib else "")
            print(f"group {s.group}  {s.name:<30} cap {s.cap_s:>3} s  {s.fills}\n    {env + ' ' if env else ''}"
                  f"python scripts/{s.script} {shlex.join(s.args)}")
        return 0
    groups = args.group or (GROUPS if tiny else None)
    if not groups:
        ap.error("give --group N (or --dry-run for every group on CPU)")
    only = set(args.steps.split(",")) if args.steps else None
    if only:
        unknown = only - {s.name for s in STEPS}
        if unknown:
            ap.error(f"unknown step(s) {sorted(unknown)}; see --list")
    budget = args.budget if args.budget is not None else (float("inf") if tiny else GROUP_BUDGET_S)
    failed = 0
    for g in groups:
        summary = run_group(g, Path(args.out), tiny, budget, args.reference_dit, only, args.skip_preflight)
        failed += sum(s["status"] in ("failed", "timeout") for s in summary["steps"])
    print(f"done: {failed} step(s) failed or timed out; logs and summaries in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
