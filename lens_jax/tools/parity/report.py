"""The parity report: `report.json` (every figure), `summary.md`, PNG plots and a terminal table.

Plots of error per layer / step need matplotlib (the `parity` extra); without it they are left
out with a note. Side-by-side and difference images use Pillow (a core dependency).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ...weights.staging import staged_folder
from .metrics import TOLERANCE_BASIS

TITLES = {
    "text_encoder": "Text encoder (GPT-OSS, transformers)",
    "transformer": "DiT (LensTransformer2DModel)",
    "vae": "VAE (diffusers AutoencoderKLFlux2)",
    "pipeline": "End to end (same initial latents)",
}


def _num(x: float | None, kind: str) -> str:
    if x is None:
        return "-"
    if kind == "psnr":
        return "inf" if math.isinf(x) and x > 0 else f"{x:.2f}"
    if kind == "cosine":
        return f"{x:.9f}" if x > 0.999 else f"{x:.6f}"
    return f"{x:.3g}"


def _clean(obj: Any) -> Any:
    """JSON-safe: inf/nan as strings, numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def headline_rows(report: dict) -> list[list[str]]:
    """One row per component: name, status, max abs, rel-to-scale, cosine, PSNR, first jump, verdict."""
    rows = []
    for name, sec in report["components"].items():
        if sec["status"] != "ok":
            rows.append([name, sec["status"], "-", "-", "-", "-", "-", sec.get("message", "")])
            continue
        h = sec["headline"]
        jump = sec.get("first_jump")
        rows.append([
            name, h["name"], _num(h["max_abs"], "abs"), _num(h["max_rel"], "rel"), _num(h["cosine"], "cosine"),
            _num(h["psnr"], "psnr"), jump["layer"] if jump else "none",
            "pass" if sec["passed"] else f"FAIL ({sec['tolerance_text']})",
        ])
    return rows


HEADER = ["component", "check", "max abs", "rel", "cosine", "PSNR dB", "first jump", "verdict"]
# the order data flows in: the first failing stage in this order is where the difference enters
STAGES = ("text_encoder", "transformer", "vae", "pipeline")
STAGE_HINT = {
    "text_encoder": "GPT-OSS text encoder",
    "transformer": "DiT",
    "vae": "VAE",
    "pipeline": "sampler (scheduler, CFG, latent packing); text encoder, DiT and VAE agree on their own",
}


def verdict(report: dict) -> dict:
    """{'status': 'pass' | 'fail' | 'nothing compared', 'first': stage or None, 'line': one line}.

    A failing stage is named with the layer its error enters at; stages after it in the data flow
    (the end-to-end run after a failing DiT) inherit the error and are listed after it."""
    secs = report["components"]
    order = [n for n in STAGES if n in secs] + [n for n in secs if n not in STAGES]
    failing = [n for n in order if secs[n]["status"] == "failed" or (secs[n]["status"] == "ok" and not secs[n]["passed"])]
    ran = [n for n in order if secs[n]["status"] == "ok"]
    skipped = [n for n in order if secs[n]["status"] == "skipped"]
    basis = TOLERANCE_BASIS.get(report.get("dtype", "f32"), "")
    not_checked = f"; NOT CHECKED: {', '.join(skipped)} (skipped, see above)" if skipped else ""
    if failing:
        first = failing[0]
        sec = secs[first]
        if sec["status"] == "failed":
            where = f"{first} crashed ({sec.get('message', '')})"
        else:
            jump = sec.get("first_jump")
            hint = STAGE_HINT.get(first, first) if first != "pipeline" or {"text_encoder", "transformer", "vae"} <= set(ran) \
                else "end-to-end run"
            where = f"{first} differs first ({hint}" + (f"; from {jump['layer']}" if jump else "") + ")"
        later = f"; also failing: {', '.join(failing[1:])}" if failing[1:] else ""
        line = f"verdict: FAIL: {where}{later}{not_checked}"
        return {"status": "fail", "first": first, "line": line}
    if not ran:
        return {"status": "nothing compared", "first": None,
                "line": f"verdict: NOTHING COMPARED: every component was skipped{not_checked}"}
    return {"status": "pass", "first": None,
            "line": f"verdict: PASS: {', '.join(ran)} within tolerance ({basis}){not_checked}"}


def terminal_table(report: dict) -> str:
    """A one-screen table of the headline figures."""
    rows = [HEADER] + headline_rows(report)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(HEADER) - 1)]
    lines = [f"lens-jax parity: {report['model']} ({report['dtype']}, {report['size'][0]}x{report['size'][1]})"]
    for k, r in enumerate(rows):
        if r[1] in ("skipped", "failed"):
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}: {r[-1]}")
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if k == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 7))
    lines.append((report.get("verdict") or verdict(report))["line"])
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The Markdown summary: headline table, then one table per component (per layer / step)."""
    out = [f"# lens-jax parity report", "",
           f"- checkpoint: `{report['model']}`", f"- dtype: {report['dtype']}; size {report['size'][0]}x"
           f"{report['size'][1]}; seed {report['seed']}; prompt: \"{report['prompt']}\"",
           f"- devices: JAX {report['devices']['jax']}; PyTorch {report['devices']['torch']}", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in headline_rows(report)]
    out += ["", (report.get("verdict") or verdict(report))["line"],
            "", f"Tolerances: {TOLERANCE_BASIS.get(report['dtype'], '')} (`lens_jax.tools.parity.metrics`)."]
    for name, sec in report["components"].items():
        out += ["", f"## {TITLES.get(name, name)}", ""]
        if sec["status"] != "ok":
            out.append(f"{sec['status']}: {sec.get('message', '')}")
            continue
        jump = sec.get("first_jump")
        out.append(f"Tolerance: {sec['tolerance_text']}. First layer where the error jumps: "
                   f"{jump['layer'] + ' (' + format(jump['error_over_bound'], '.3g') + 'x its bound)' if jump else 'none'}."
                   + (f" Largest growth from one layer to the next: {grow['layer']} (x{grow['growth']:.3g})."
                      if (grow := sec.get("largest_growth")) else "")
                   + (f" Note: {sec['note']}" if sec.get("note") else ""))
        out += ["", "| check | max abs | rel | cosine | PSNR dB | pass |", "|---|---|---|---|---|---|"]
        for r in sec["records"]:
            out.append(f"| {r['name']} | {_num(r['max_abs'], 'abs')} | {_num(r['max_rel'], 'rel')} | "
                       f"{_num(r['cosine'], 'cosine')} | {_num(r['psnr'], 'psnr')} | "
                       f"{'info' if r.get('info') else 'yes' if r.get('passed', True) else 'NO'} |")
        for png in sec.get("plots", []):
            out += ["", f"![{name}]({png})"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plots


def _error_series(name: str, sec: dict) -> dict[str, tuple[list, list[float]]]:
    """label -> (x labels, max_rel per layer/step) for the error plot of a component."""
    recs = sec["records"]
    if name == "text_encoder":
        layers = [r for r in recs if r["name"].startswith("layer")]
        return {"hidden state": ([r["name"].split()[1] for r in layers], [r["max_rel"] for r in layers])}
    if name == "transformer":
        series: dict[str, tuple[list, list[float]]] = {}
        for r in recs:
            if "block" in r:
                label = f"{r['stream']} @ sigma {r['sigma']:g}"
                xs, ys = series.setdefault(label, ([], []))
                xs.append(str(r["block"]))
                ys.append(r["max_rel"])
        return series
    if name == "pipeline":
        steps = [r for r in recs if r["name"].startswith("step")]
        return {"latents": ([r["name"].split()[1] for r in steps], [r["max_rel"] for r in steps])}
    return {}


def plot_errors(name: str, sec: dict, folder: Path) -> str | None:
    """errors_<name>.png: max error relative to max|ref| per layer or step (log scale); None without matplotlib."""
    series = _error_series(name, sec)
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(range(len(ys)), [max(y, 1e-12) for y in ys], marker="o", ms=3, label=label)
        ax.set_xticks(range(len(xs)), xs, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel({"pipeline": "step"}.get(name, "layer"))
    ax.set_ylabel("max |ours - ref| / max |ref|")
    ax.set_title(TITLES.get(name, name))
    jump = sec.get("first_jump")
    if jump:
        ax.axvline(jump["index"], color="red", ls="--", lw=1, label=f"first jump: {jump['layer']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"errors_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def save_images(name: str, ours: np.ndarray, ref: np.ndarray, folder: Path) -> str:
    """<name>_compare.png: ours | reference | |difference| (amplified to fill the range), [H, W, 3] in [0, 1]."""
    from PIL import Image

    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    gain = 1.0 / max(float(diff.max()), 1e-12)
    tiles = [ours, ref, diff * gain]
    gap = np.ones((ours.shape[0], 4, 3))
    strip = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
    img = Image.fromarray((np.clip(strip, 0, 1) * 255).round().astype(np.uint8))
    if img.height < 256:  # tiny checkpoints: enlarge so the pixels can be seen
        k = -(-256 // img.height)
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    path = folder / f"{name}_compare.png"
    img.save(path)
    return path.name


def write(report: dict, images: dict, folder: Path) -> dict[str, Path]:
    """Write report.json, summary.md and the PNGs into `folder`; returns their paths.

    Everything is written into a staging folder beside `folder` first and moved in when complete
    (report.json last), so an error or Ctrl-C while writing leaves no partial report."""
    folder = Path(folder)
    with staged_folder(folder, last=lambda name: name == "report.json") as staging:
        _write_into(report, images, staging)
    return {"json": folder / "report.json", "markdown": folder / "summary.md"}


def _write_into(report: dict, images: dict, folder: Path) -> None:
    notes = []
    for name, sec in report["components"].items():
        if sec["status"] != "ok":
            continue
        plots = []
        png = plot_errors(name, sec, folder)
        if png:
            plots.append(png)
        elif _error_series(name, sec):
            notes.append(f"{name}: error plot left out (matplotlib not installed; `pip install 'lens-jax[parity]'`)")
        for key, (ours, ref) in images.items():
            if key.startswith(name):
                plots.append(save_images(key, ours, ref, folder))
        sec["plots"] = plots
    if notes:
        report["notes"] = notes
    (folder / "report.json").write_text(json.dumps(_clean(report), indent=1))
    (folder / "summary.md").write_text(markdown(report))
