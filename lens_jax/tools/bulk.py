"""Bulk generation: `lens-jax generate --prompts FILE` turns a prompt file into one image per line.

Input: a text file (one prompt a line) or JSONL (`.jsonl`, or a file whose first line starts with `{`)
with, per line, `prompt` and optionally `negative` (or `negative_prompt`), `seed`, `size` ("WxH"),
`width`/`height`, `aspect_ratio`, `steps`, `guidance`. Blank lines are skipped.

- Line numbers are 1-based lines of the file. A line's image is `<line:06d>.png`; its seed is the
  line's `seed`, else `base_seed + line` (base seed `--seed`, default 0). Generating a line alone
  (a one-line file with the same seed) makes the same image bit for bit (`lens_jax.tools.jobs`).
- Lines are grouped by bucket (size, steps, guidance) and run `batch_size` at a time (default: the
  mesh's `data` axis size), so each compiled program is reused.
- Each image is written atomically (temporary file, then rename) and then recorded in
  `metadata.jsonl` (one JSON object a line: file name, settings, model). A rerun skips a line whose
  image exists and whose recorded settings match, and makes the rest.
- Multi-host: every host runs the same command on the same file (and sees the same output folder
  or its own); all hosts run every batch together, and host `p` of `P` writes the lines with
  `index % P == p` (its metadata in `metadata.host<p>.jsonl`). Which lines are done is agreed on by
  an all-gather, so a host that lost its files regenerates them. One progress bar, on host 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import InputError
from . import jobs as jobs_lib

METADATA = "metadata.jsonl"
JSON_FIELDS = {"prompt", "negative", "negative_prompt", "seed", "size", "width", "height", "aspect_ratio", "steps",
               "guidance"}


@dataclass(frozen=True)
class Line:
    """One line of a prompt file and the image it asks for."""

    number: int  # 1-based line of the file
    job: jobs_lib.Job

    @property
    def name(self) -> str:
        return f"{self.number:06d}.png"


def parse_size(size: str, where: str = "size") -> tuple[int, int]:
    """'WxH' -> (height, width)."""
    try:
        w, h = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise InputError(f"{where}={size!r} must be 'WIDTHxHEIGHT', e.g. '1024x768'.") from None
    return h, w


def read_prompt_file(path: str | Path, defaults: dict, base_seed: int = 0) -> list[Line]:
    """Parse a prompt file into `Line`s. `defaults`: the pipeline's defaults plus optional
    negative_prompt / height / width / aspect_ratio / steps / guidance for lines that do not set them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompt file {str(path)!r} does not exist; give a text or JSONL file.")
    text = path.read_text(encoding="utf-8").splitlines()
    first = next((t.strip() for t in text if t.strip()), "")
    is_jsonl = path.suffix == ".jsonl" or first.startswith("{")
    lines = []
    for number, raw in enumerate(text, start=1):
        if not raw.strip():
            continue
        where = f"{path.name}:{number}"
        if is_jsonl:
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise InputError(f"{where} is not valid JSON ({e.msg}); give one JSON object a line.") from None
            if not isinstance(rec, dict) or "prompt" not in rec:
                raise InputError(f"{where} needs a 'prompt' field.")
            unknown = set(rec) - JSON_FIELDS
            if unknown:
                raise InputError(f"{where} has unknown field(s) {sorted(unknown)}; known: {sorted(JSON_FIELDS)}.")
        else:
            rec = {"prompt": raw.strip()}
        size = {k: rec.get(k, defaults.get(k)) for k in ("height", "width", "aspect_ratio")}
        if "size" in rec:
            size = {"aspect_ratio": None}
            size["height"], size["width"] = parse_size(rec["size"], f"{where} size")
        elif "aspect_ratio" in rec or "height" in rec:
            size = {k: rec.get(k) for k in ("height", "width", "aspect_ratio")}
        try:
            job = jobs_lib.make_job(
                defaults, rec["prompt"],
                seed=rec.get("seed", base_seed + number),
                negative_prompt=rec.get("negative", rec.get("negative_prompt", defaults.get("negative_prompt", ""))),
                steps=rec.get("steps", defaults.get("steps")),
                guidance=rec.get("guidance", defaults.get("guidance")),
                **size,
            )
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        lines.append(Line(number, job))
    if not lines:
        raise InputError(f"prompt file {str(path)!r} has no prompts.")
    return lines


def _record(line: Line, model: str) -> dict:
    return {"file": line.name, "line": line.number, **line.job.settings(), "model": model, "software": "lens-jax"}


def read_metadata(out_dir: Path) -> dict[str, dict]:
    """file name -> its last recorded metadata, from every metadata*.jsonl in `out_dir`."""
    records: dict[str, dict] = {}
    for meta in sorted(out_dir.glob("metadata*.jsonl")):
        for raw in meta.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if isinstance(rec, dict) and "file" in rec:
                records[rec["file"]] = rec
    return records


def done_lines(lines: Sequence[Line], out_dir: Path, model: str) -> np.ndarray:
    """bool per line: its image exists and its recorded settings are this line's."""
    records = read_metadata(out_dir)
    return np.array([(out_dir / ln.name).is_file() and records.get(ln.name) == _record(ln, model) for ln in lines],
                    bool)


def write_image(out_dir: Path, line: Line, image: np.ndarray, model: str, metadata_file: str = METADATA) -> Path:
    """Write the PNG atomically, then append its record to the metadata file (flushed to disk)."""
    rec = _record(line, model)
    path = out_dir / line.name
    png = jobs_lib.to_png_bytes(image, rec)
    jobs_lib.write_atomically(path, lambda f: f.write(png))
    with open(out_dir / metadata_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def plan(lines: Sequence[Line], done: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches (indices into `lines`) of the lines not done: by bucket, at most `batch_size` each."""
    pending = [i for i in range(len(lines)) if not done[i]]
    groups = jobs_lib.group_by_bucket([lines[i].job for i in pending])
    return [[pending[k] for k in idx[s:s + batch_size]] for idx in groups.values()
            for s in range(0, len(idx), batch_size)]


def _agree(done: np.ndarray) -> np.ndarray:
    """Across hosts: a line is done only if every host that owns it says so (AND over hosts' views)."""
    import jax

    if jax.process_count() == 1:
        return done
    from jax.experimental import multihost_utils

    n, p = jax.process_count(), jax.process_index()
    owned = np.arange(len(done)) % n == p
    # Each host vouches only for the lines it writes; the others report True.
    mine = np.where(owned, done, True).astype(np.int8)
    views = np.asarray(multihost_utils.process_allgather(mine))
    return views.reshape(n, -1).all(axis=0)


def run_bulk(pipe, lines: Sequence[Line], out_dir: str | Path, batch_size: int, model: str,
             on_image: Callable[[Path], None] | None = None, progress: bool = True) -> list[Path]:
    """Generate every line not yet done into `out_dir`; returns the paths written by this host.

    `on_image(path)` is called after each image is written (tests interrupt the run from it).
    """
    import jax
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch size {batch_size} must be at least 1.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_hosts, host = jax.process_count(), jax.process_index()
    metadata_file = METADATA if host == 0 else f"metadata.host{host}.jsonl"
    done = _agree(done_lines(lines, out_dir, model))
    batches = plan(lines, done, batch_size)
    written = []
    bar = tqdm(total=int((~done).sum()), initial=0, desc="images", unit="img",
               disable=not progress or host != 0, dynamic_ncols=True)
    try:
        for batch in batches:
            images = jobs_lib.generate_batch(pipe, [lines[i].job for i in batch], batch_size)
            for i, image in zip(batch, images):
                if i % n_hosts == host:
                    path = write_image(out_dir, lines[i], image, model, metadata_file)
                    written.append(path)
                    if on_image is not None:
                        on_image(path)
            bar.update(len(batch))
    finally:
        bar.close()
    return written


# ---------------------------------------------------------------------- command line (via `generate`)


def add_arguments(p) -> None:
    """The bulk options of `lens-jax generate`."""
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="bulk: a text (one prompt a line) or JSONL prompt file; one image per line into --out, "
                        "resumable (see docs/serving.md)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="bulk: images per sampler call (default: the mesh's data axis size)")
    p.add_argument("--data", type=int, default=None, help="bulk: mesh data-parallel size (default 1)")
    p.add_argument("--fsdp", type=int, default=None, help="bulk: mesh fsdp size (default: the remaining devices)")
    p.add_argument("--tensor", type=int, default=1, help="bulk: mesh tensor-parallel size")


def load_pipeline(model: str | None, variant: str, dtype: str | None, mesh=None, offload: str = "none",
                  quantize: str | None = None):
    """(pipeline, model name): a checkpoint, or 'tiny-random' with the variant's steps/guidance."""
    from lens_jax.pipelines.text_to_image import LensPipeline, load_preset

    if model == "tiny-random":
        pipe = LensPipeline.tiny_random(seed=0, dtype=dtype or "f32", mesh=mesh, offload=offload, quantize=quantize)
        pipe.defaults.update({k: load_preset(variant)[k] for k in ("num_inference_steps", "guidance_scale")})
        return pipe, model
    model = model or load_preset(variant)["repo_id"]
    return LensPipeline.from_pretrained(model, dtype=dtype, variant=variant, mesh=mesh, offload=offload,
                                        quantize=quantize), model


def run_cli(args) -> int:
    """`lens-jax generate --prompts FILE`."""
    import sys

    from lens_jax import parallel

    from .runtime import enable_compilation_cache

    defaults = {"negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
                "aspect_ratio": args.aspect_ratio, "steps": args.steps, "guidance": args.guidance,
                # placeholders until the pipeline is loaded: only used if neither line nor flag sets them
                "num_inference_steps": 1, "guidance_scale": 1.0}
    read_prompt_file(args.prompts, defaults, args.seed or 0)  # validate before loading anything
    enable_compilation_cache()
    mesh = parallel.make_mesh(args.data, args.fsdp, args.tensor)
    pipe, model = load_pipeline(args.model, args.variant, args.dtype, mesh, getattr(args, "offload", "none"),
                                getattr(args, "quantize", None))
    defaults.update(pipe.defaults)
    lines = read_prompt_file(args.prompts, defaults, args.seed or 0)
    batch_size = args.batch_size or mesh.shape["data"]
    written = run_bulk(pipe, lines, args.out, batch_size, model)
    print(f"{len(written)} new image(s) in {args.out} ({len(lines)} lines)", file=sys.stderr)
    return 0
