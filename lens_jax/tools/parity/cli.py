"""`lens-jax parity`: does lens-jax reproduce PyTorch on these weights, on this device, in this dtype?

    lens-jax parity --model /ckpt/Lens --dtype bf16 --reference-dit /src/Lens/lens/transformer.py --report out/

Runs each component (text encoder, DiT, VAE, end to end) through lens-jax and the PyTorch
reference, one at a time, and writes report.json, summary.md and PNG plots to --report. Exit
status: 0 when every component that ran is within its tolerance, 1 when one is not (or crashed,
or none could run), 2 on bad input (checked before any work: checkpoint folders, torch, the
--reference-dit file, the --report folder). A component whose library or reference is missing is
skipped with one line; the last line is the verdict and names the first stage that differs.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from ...errors import InputError

COMPONENTS = ("text_encoder", "transformer", "vae", "pipeline")


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="compare lens-jax with the PyTorch reference, layer by layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint root in the diffusers layout (model_index.json, ...)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="compute dtype of both sides (default f32)")
    p.add_argument("--components", default=",".join(COMPONENTS),
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all)")
    p.add_argument("--size", default="512x512", help="image size HxW in pixels, multiples of 16 (default 512x512)")
    p.add_argument("--prompt", default="A red cube on a wooden table next to a small green plant.")
    p.add_argument("--seed", type=int, default=0, help="seed of every random input (numpy)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the end-to-end check (default 4)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale of the end-to-end check (default 4.0)")
    p.add_argument("--report", default="parity_report", help="folder for report.json, summary.md and the PNGs")
    p.add_argument("--reference-dit", default=None, metavar="FILE_OR_MODULE",
                   help="a .py file or module defining the upstream LensTransformer2DModel "
                        "(default: diffusers, if a release ships it)")


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r}: give HxW in pixels, e.g. 512x512.") from None
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise InputError(f"--size {text}: height and width must be positive multiples of 16.")
    return h, w


def parse_components(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in COMPONENTS]
    if bad or not names:
        raise InputError(f"--components {text!r}: unknown {bad or 'empty'}; choose from {','.join(COMPONENTS)}.")
    return names


def _devices() -> dict[str, str]:
    import jax

    from . import reference as ref_lib

    try:
        torch = ref_lib.require("torch", "the references")
        torch_dev = f"{torch.__version__} on {ref_lib.torch_device()}"
    except ref_lib.Unavailable:
        torch_dev = "not installed"
    return {"jax": f"{jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})", "torch": torch_dev}


@contextlib.contextmanager
def remembered_interrupt() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt at once *and* is remembered; the yielded `check()` raises it
    again. A KeyboardInterrupt that lands in JAX's garbage-collection callback is swallowed by
    Python ("Exception ignored in _xla_gc_callback") and the run used to go on to write its report."""
    hit = []

    def handler(signum, frame):
        hit.append(signum)
        raise KeyboardInterrupt

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # handlers are main-thread only
        yield check
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def parity(opts, components: tuple[str, ...], report_dir: Path | None, echo=print) -> dict:
    """Run the components one at a time and write the report; returns the report dict.

    The report is written only once every component has run (a Ctrl-C before leaves none)."""
    from . import components as comp
    from . import report as rep

    report = {"model": str(opts.model), "dtype": opts.dtype, "size": list(opts.size), "seed": opts.seed,
              "prompt": opts.prompt, "devices": _devices(), "components": {}}
    with remembered_interrupt() as check_interrupt:
        for name in components:
            echo(f"[parity] {name} ...", file=sys.stderr)
            section = comp.run_component(name, opts)
            check_interrupt()
            if section["status"] != "ok":
                echo(f"[parity] {name}: {section['status']}: {section['message']}", file=sys.stderr)
            elif section.get("note"):
                echo(f"[parity] {name}: note: {section['note']}", file=sys.stderr)
            report["components"][name] = section
        report["verdict"] = rep.verdict(report)
        if report_dir is not None:
            rep.write(report, opts.images, report_dir)
    echo(rep.terminal_table(report))
    if report_dir is not None:
        echo(f"report: {report_dir / 'summary.md'} (figures in report.json)")
    return report


# what each component reads from the checkpoint root
NEEDS = {
    "text_encoder": ("text_encoder", "tokenizer"),
    "transformer": ("transformer",),
    "vae": ("vae",),
    "pipeline": ("text_encoder", "tokenizer", "transformer", "vae", "scheduler"),
}


def check_inputs(model: Path, names: tuple[str, ...], reference_dit: str | None) -> None:
    """Everything the components need, checked before any of them runs (one InputError line each)."""
    from . import reference as ref_lib

    missing = sorted({sub for n in names for sub in NEEDS[n] if not (model / sub).is_dir()})
    if missing:
        raise InputError(f"--model {model} has no {', '.join(s + '/' for s in missing)} (needed by "
                         f"{', '.join(n for n in names if set(NEEDS[n]) & set(missing))}); give the full "
                         "checkpoint root or leave those out with --components.")
    try:
        ref_lib.require("torch", "lens-jax parity compares against PyTorch")
    except ref_lib.Unavailable as e:
        raise InputError(str(e)) from None
    if reference_dit and {"transformer", "pipeline"} & set(names):
        try:
            ref_lib.find_dit_class(reference_dit)
        except ref_lib.Unavailable as e:
            raise InputError(str(e)) from None


def run(args) -> int:
    import jax

    from . import components as comp

    model = Path(args.model)
    from ...weights.orbax_io import find_converted

    converted = find_converted(model)
    if converted is not None:  # e.g. a `convert --quantize` output: no PyTorch weights to compare against
        raise InputError(f"--model {model} is {converted[1]}; parity compares PyTorch weights with their JAX port, so "
                         "give the diffusers/PyTorch folder it was converted from.")
    if not (model / "model_index.json").exists() and not any((model / c).is_dir() for c in ("transformer", "vae")):
        raise InputError(f"--model {model}: not a Lens checkpoint folder (no model_index.json); give the checkpoint root.")
    from ...pipelines import validation

    # checked before any component runs: a bad --report used to fail only after the comparisons
    validation.check_steps(args.steps, "--steps")
    validation.check_guidance(args.guidance, "--guidance")
    validation.check_seed(args.seed, 3, "--seed")  # seed, seed + 1, seed + 2 draw the inputs (numpy: >= 0)
    validation.check_output_dir(args.report, name="--report")
    opts = comp.Options(model=model, dtype=args.dtype, size=parse_size(args.size), prompt=args.prompt,
                        seed=args.seed, reference_dit=args.reference_dit, steps=args.steps, guidance=args.guidance)
    names = parse_components(args.components)
    check_inputs(model, names, args.reference_dit)
    if args.dtype == "f32":
        jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 / bf16 passes on accelerators
    report = parity(opts, names, Path(args.report))
    return 0 if report["verdict"]["status"] == "pass" else 1
