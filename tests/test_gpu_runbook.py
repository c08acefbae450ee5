"""The GPU runbook (scripts/gpu_runbook.py) names only scripts and flags that exist, and runs on CPU.

Every step's real-size and dry-run command line is parsed by the target script's own argparse parser
(the script's `main()` runs up to its `parse_args` call, which is intercepted), so a renamed flag fails
here rather than in a GPU lease. The runner itself is checked on fast steps: a failed and a timed-out
step are recorded and the group goes on; a tiny dry-run of two group-2 steps writes its log and summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts import their siblings (`from _timing import best_of`)

import gpu_runbook as rb  # noqa: E402


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def _load(script: str):
    spec = importlib.util.spec_from_file_location(f"_runbook_target_{script[:-3]}", SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_with_script(monkeypatch, script: str, args: list[str]) -> argparse.Namespace:
    """`args` parsed by `script`'s own parser (its main() stops right after parsing)."""
    original = argparse.ArgumentParser.parse_args

    def intercept(self, argv=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    module = _load(script)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", intercept)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(_Parsed) as parsed:
        module.main()
    return parsed.value.namespace


def _commands():
    for step in rb.STEPS:
        for tiny in (False, True):
            argv = rb.step_argv(step, tiny, python="python")
            if argv is not None:
                yield pytest.param(step, argv, id=f"{step.name}-{'tiny' if tiny else 'real'}")


@pytest.mark.parametrize("step,argv", list(_commands()))
def test_step_command_parses(monkeypatch, step, argv):
    script = Path(argv[1]).name
    assert (SCRIPTS / script).is_file(), f"{step.name}: scripts/{script} does not exist"
    if step.writes_json:
        argv = [*argv, "--json", "/tmp/x.json"]
    namespace = parse_with_script(monkeypatch, script, argv[2:])
    assert namespace is not None


def test_unknown_flag_is_caught(monkeypatch):
    """The check above can fail: a flag the script does not have is refused by its parser."""
    with pytest.raises(SystemExit):
        parse_with_script(monkeypatch, "benchmark_moe.py", ["--no-such-flag"])


def test_run_calls_fit_the_device_tool():
    for group in rb.GROUPS:
        call = rb.run_call(group)
        assert len(call["command"]) <= 2000 and call["timeout_s"] <= 600 and len(call["carry"]) <= 8
        assert f"--group {group}" in call["command"]
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in rb.CARRY:  # carried paths must be git-ignored, or they would travel (and be committed) anyway
        assert f"/{path}/" in ignored
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_runbook.py"), "--print-commands"], capture_output=True,
                         text=True, check=True).stdout
    assert out.count("run(command=") == len(rb.GROUPS)


def test_memory_caps():
    total = 80 * 10**9
    assert rb.mem_fraction(8, total) == f"{8 * 2**30 / total:.4f}"
    assert rb.mem_fraction(200, total) == "1.0000"
    capped = next(s for s in rb.STEPS if s.mem_cap_gib == 8)
    assert rb.step_env(capped, False, total)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == rb.mem_fraction(8, total)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in rb.step_env(capped, True, total)  # dry run: CPU, no cap
    assert all(s.mem_cap_gib in (None, 8, 12, 16, 24) for s in rb.STEPS)
    assert {8, 12, 16, 24} <= {s.mem_cap_gib for s in rb.STEPS if s.script == "benchmark_offload.py"}


def test_failed_and_timed_out_steps_do_not_stop_the_group(monkeypatch, tmp_path):
    steps = (
        rb.Step("bad_flag", 7, "benchmark_moe.py", ("--bogus",), ("--bogus",), 60, "fails at once"),
        rb.Step("too_slow", 7, "benchmark_moe.py", ("--tokens", "8"), ("--width", "64", "--tokens", "8"), 1,
                "killed at its cap"),
        rb.Step("fine", 7, "check_mxfp4_fusion.py", ("--help",), ("--help",), 60, "runs"),
    )
    monkeypatch.setattr(rb, "STEPS", steps)
    summary = rb.run_group(7, tmp_path, tiny=True, budget_s=120, reference=rb.REFERENCE_DIT, only=None,
                           skip_preflight=True)
    assert [s["status"] for s in summary["steps"]] == ["failed", "timeout", "ok"]
    assert json.loads((tmp_path / "summary_group7.json").read_text())["steps"][2]["status"] == "ok"
    log = (tmp_path / "group7.log").read_text()
    assert "===== step bad_flag" in log and "unrecognized arguments: --bogus" in log


def test_mxfp4_fusion_verdict_from_hlo():
    from check_mxfp4_fusion import analyse

    fused = """HloModule m

%gemm_fusion (p0: u8[32,16], p1: f32[4,32]) -> f32[4,32] {
  %p0 = u8[32,16]{1,0} parameter(0)
  %s = u8[32,16]{1,0} shift-right-logical(%p0, %p0)
  %c = f32[32,32]{1,0} convert(%s)
  %p1 = f32[4,32]{1,0} parameter(1)
  ROOT %d = f32[4,32]{1,0} dot(%p1, %c), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: u8[32,16], b: f32[4,32]) -> f32[4,32] {
  ROOT %f = f32[4,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion
}
"""
    assert analyse(fused)["fused"] is True
    unfused = fused.replace("%s = u8[32,16]{1,0} shift-right-logical(%p0, %p0)", "%s = u8[32,16]{1,0} copy(%p0)")
    assert analyse(unfused)["fused"] is False


def test_profile_summary_picks_accelerator_streams_and_skips_python_frames():
    from profile_dit_step import summarise

    meta = lambda pid, name, tid=None: dict(ph="M", pid=pid, name="thread_name" if tid is not None else "process_name",  # noqa: E731
                                            args=dict(name=name), **({"tid": tid} if tid is not None else {}))
    op = lambda pid, name, dur, tid=0: dict(ph="X", pid=pid, tid=tid, name=name, dur=dur)  # noqa: E731
    # libtpu adds an empty "/device:CUSTOM" line on CPU: the CPU ops must still be summed, without
    # the Python tracer's "$file:line" frames.
    cpu = [meta(1, "/device:CUSTOM:Megascale Trace"), meta(2, "/host:CPU"),
           op(2, "$profiler.py:307 trace", 600_000.0), op(2, "ThunkExecutor::Execute", 50.0),
           op(2, "dot_fusion", 3000.0), op(2, "copy.1", 1000.0)]
    s = summarise(dict(traceEvents=cpu), runs=1)
    assert s["total_ms_per_step"] == 4.0 and {k["kind"] for k in s["kinds"]} == {"gemm", "copy / transpose"}
    gpu = [meta(3, "/device:GPU:0"), meta(3, "Stream #13(compute)", tid=13), meta(3, "XLA Ops", tid=2),
           op(3, "sm90_xmma_gemm", 2000.0, tid=13), op(3, "fusion.7", 2000.0, tid=2)] + cpu
    s = summarise(dict(traceEvents=gpu), runs=2)
    assert s["source"] == "device streams" and s["total_ms_per_step"] == 1.0 and s["top"][0]["kind"] == "gemm"


def test_dry_run_of_cheapest_step(tmp_path):
    """The same entry point the lease uses, tiny sizes on CPU, on group 2's cheapest step (the whole
    groups' dry-runs take 1-4 minutes each: `python scripts/gpu_runbook.py --dry-run --group N`)."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_runbook.py"), "--dry-run", "--group", "2",
                          "--steps", "mxfp4_fusion", "--skip-preflight", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "summary_group2.json").read_text())
    rows = {s["name"]: s for s in summary["steps"]}
    assert set(rows) == {"mxfp4_fusion"} and rows["mxfp4_fusion"]["status"] == "ok"
    assert set(rows["mxfp4_fusion"]["rows"]["rows"]) == {"dense", "ragged", "grouped"}
    assert any("not fused" in line for line in rows["mxfp4_fusion"]["tail"])  # XLA:CPU fuses no decode
    assert (tmp_path / "group2.log").stat().st_size > 0
    digest = rb.report(tmp_path)
    assert "| mxfp4_fusion | ok |" in digest and "check_mxfp4_fusion.py" in digest
