"""`python -m convert` (also `lens-jax convert`): PyTorch Lens checkpoints -> orbax, streamed and atomic.

    python -m convert --src PATH_OR_HUB_ID --dst OUT [--dtype bf16|f32]
        [--components transformer,text_encoder,vae] [--keep-mxfp4]
        [--transformer FILE] [--vae FILE] [--text-encoder DIR] [--overwrite] [--verify]
        [--quantize int8|fp8]

Sources. `--src` is a Lens diffusers folder (or a hub id resolved to its local snapshot): the
components come from its `transformer/`, `vae/` and `text_encoder/` unless `--transformer`,
`--vae` or `--text-encoder` name other files (a ComfyUI `lens_bf16.safetensors`, a
`flux2-vae.safetensors`, a FLUX.2 `ae.safetensors`, an `openai/gpt-oss-20b` folder). The
layout of each is detected from its tensor names (`convert/layouts.py`). A component's config
is the `config.json` beside its weights, else the one in `--src`, else the real Lens config.
The tokenizer, scheduler config and model_index.json come from `--src` (the tokenizer may also
come from the `--text-encoder` folder; the scheduler and model_index default to the real Lens
ones).

Output: see `convert/orbax_io.py` (one orbax checkpoint per component, configs, tokenizer,
scheduler, model_index.json, manifest.json). Everything is written into a temporary folder
beside `--dst` and renamed at the end; a failure or an interrupt leaves neither.

`--quantize int8|fp8` stores the DiT quantised (`lens_jax.models.quant`: int8 or e4m3 kernels +
float32 `kernel_scale` leaves for the Linears in the blocks; the modulation and the small Linears
stay in --dtype). Each block is quantised as it is read, so host memory holds one block in --dtype
plus its quantised copy, never the whole DiT. The manifest records the mode; from_pretrained
restores the quantised leaves directly.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import configs
from ..errors import CheckpointError, ConvertError
from ..weights import layouts, registry
from ..weights.orbax_io import (FORMAT, FORMAT_VERSION, MANIFEST, PARAMS_DIR, QUANTIZED_FORMAT_VERSION, param_files,
                                save_streamed, stream_params)
from ..weights.safetensors_io import SafetensorsReader, open_checkpoint
from . import interrupts

COMPONENTS = tuple(registry.COMPONENTS)
DTYPES = {"bf16": "bfloat16", "f32": "float32"}
PROG = "convert"


# ----------------------------------------------------------------------------------------------
# planning: which files, which layout, which config, which rules


@dataclass
class Job:
    component: str
    reader: SafetensorsReader
    source: Path                   # what the user pointed at (file or folder)
    config_path: Path
    config_note: str
    config: Any
    layout: layouts.Detected
    rules: list
    expected: dict
    ignore: tuple = ()
    keep_mxfp4: bool = False
    lm_head: bool = False  # text encoder: the causal-LM head (final norm + lm_head) is converted too
    stacked_key: str | None = None
    what: str = ""
    load_source: Callable[[], Any] | None = field(default=None, repr=False)  # the component module's own loader
    quantize: str | None = None  # transformer: store the DiT quantised ("int8" / "fp8")

    def pieces(self):
        pieces = stream_params(self.reader, self.rules, self.expected, stacked_key=self.stacked_key,
                               source_prefix=self.layout.prefix, ignore=self.ignore, what=self.what)
        return pieces if self.quantize is None else quantized_pieces(pieces, self.quantize, self.stacked_key)

    def check(self) -> None:
        from ..weights.mapping import check_state_dict

        check_state_dict(self.reader, self.rules, self.expected, source_prefix=self.layout.prefix,
                         ignore=self.ignore, what=self.what)


def quantized_pieces(pieces, mode: str, stacked_key: str | None):
    """`stream_params` pieces with the DiT's Linears quantised piece by piece (numpy leaves).

    A per-layer piece `{stacked_key: {"i": layer}}` is quantised with `quant.layer_table`, which
    gives bit for bit the layer-i slices of `quant.quantize_params` on the stacked DiT."""
    import jax

    from ..models import quant

    layer_table = quant.layer_table(quant.DIT_QUANTISED, stacked_key) if stacked_key else ()
    for piece in pieces:
        out = {k: v for k, v in piece.items() if k != stacked_key}
        out = quant.quantize_params(out, mode) if out else out
        if stacked_key in piece:
            out[stacked_key] = {i: quant.quantize_params(layer, mode, layer_table)
                                for i, layer in piece[stacked_key].items()}
        del piece
        yield jax.tree.map(np.asarray, out)


def _packaged(name: str) -> Path:
    return configs.path(name)


def _component_source(component: str, given: str | None, base: Path | None) -> Path:
    flag = {"transformer": "--transformer FILE", "vae": "--vae FILE", "text_encoder": "--text-encoder DIR"}[component]
    if given is not None:
        p = Path(given).expanduser()
        if not p.exists():
            raise CheckpointError(f"missing component {component}: {p} does not exist.")
        return p
    if base is None:
        raise CheckpointError(f"missing component {component}: give --src (a Lens folder) or {flag}, "
                              f"or leave {component} out of --components.")
    p = base / component
    if not p.exists():
        present = sorted(x.name for x in base.iterdir())
        raise CheckpointError(
            f"missing component {component}: {base} has no {component}/ folder (it holds {present}); "
            f"pass {flag} or leave {component} out of --components."
        )
    return p


def _config_for(component: str, source: Path, base: Path | None, packaged: str) -> tuple[Path, str]:
    beside = (source if source.is_dir() else source.parent) / "config.json"
    if beside.is_file():
        return beside, "beside the weights"
    if base is not None and (base / component / "config.json").is_file():
        return base / component / "config.json", "from --src"
    return _packaged(packaged), "the real Lens config (none beside the weights or in --src)"


def plan_transformer(source: Path, base: Path | None, dtype) -> Job:
    from ..models.transformer import TransformerConfig

    from ..weights.dit import convert_dit_weights, dit_rules, dit_expected_shapes

    reader = open_checkpoint(source)
    detected = layouts.detect_dit(reader)
    config_path, note = _config_for("transformer", source, base, "lens/transformer.json")
    config = TransformerConfig.from_json(config_path)
    return Job(
        "transformer", reader, source, config_path, note, config, detected, dit_rules(config),
        dit_expected_shapes(config, dtype), stacked_key=registry.component("transformer").stacked_key,
        what=f"transformer checkpoint ({detected.describe()}; config {config_path})",
        load_source=lambda: convert_dit_weights(reader, config, dtype, source_prefix=detected.prefix),
    )


def plan_vae(source: Path, base: Path | None, dtype) -> Job:
    import jax

    from ..models.vae.config import VAEConfig
    from ..models.vae.model import init_params

    from ..weights.mapping import expected_shapes
    from ..weights.vae import IGNORE, LAYOUTS, convert_vae, vae_rules

    reader = open_checkpoint(source)
    detected = layouts.detect_vae(reader)
    config_path, note = _config_for("vae", source, base, "lens/vae.json")
    try:
        config = VAEConfig.from_json(config_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))
    return Job(
        "vae", reader, source, config_path, note, config, detected, vae_rules(config, LAYOUTS[detected.name]),
        expected_shapes(abstract), ignore=tuple(IGNORE), stacked_key=None,
        what=f"VAE checkpoint ({detected.describe()} layout; config {config_path})",
        load_source=lambda: convert_vae(source, dtype, config=config, layout=detected.name)[1],
    )


def plan_text_encoder(source: Path, dtype, keep_mxfp4: bool) -> Job:
    from ..models.text_encoder import TextEncoderConfig

    from ..weights.text_encoder import IGNORED, convert_text_encoder_weights, text_encoder_expected_shapes, text_encoder_rules
    from ..weights.text_encoder import has_lm_head

    folder = source if source.is_dir() else source.parent
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"no config.json in {folder}: --text-encoder takes an HF GPT-OSS folder (config.json + "
            "model*.safetensors), e.g. a Lens checkpoint's text_encoder/ or openai/gpt-oss-20b."
        )
    reader = open_checkpoint(source)
    detected = layouts.detect_text_encoder(reader)
    expert_layout = "mxfp4" if detected.name == "gpt-oss-mxfp4" else "float"
    if keep_mxfp4 and expert_layout != "mxfp4":
        raise CheckpointError(f"--keep-mxfp4 needs MXFP4 experts (*_blocks/*_scales); {source} has float experts.")
    try:
        config = TextEncoderConfig.from_json(config_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    head = has_lm_head(reader)  # converted when present: the reasoner decodes with it
    rules = text_encoder_rules(config.attention_bias, expert_layout, keep_mxfp4, lm_head=head)
    return Job(
        "text_encoder", reader, source, config_path, "beside the weights", config, detected, rules,
        text_encoder_expected_shapes(config, dtype, keep_mxfp4, head), ignore=() if head else tuple(IGNORED),
        keep_mxfp4=keep_mxfp4, lm_head=head,
        stacked_key=registry.component("text_encoder").stacked_key,
        what=f"GPT-OSS text encoder checkpoint ({detected.name}; config {config_path})",
        load_source=lambda: convert_text_encoder_weights(reader, config, dtype, keep_mxfp4=keep_mxfp4),
    )


@dataclass
class Support:
    """The non-parameter files of the output and where they come from."""

    tokenizer: list[Path]               # files to copy into OUT/tokenizer
    tokenizer_note: str
    scheduler: Path
    model_index: Path
    txt_offset: int


def _tokenizer_files(folder: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
             "generation_config.json")
    return [folder / n for n in names if (folder / n).is_file()]


def plan_support(base: Path | None, text_encoder_dir: Path | None, need_tokenizer: bool) -> Support:
    from ..pipelines.prompt import REAL_TXT_OFFSET, read_txt_offset

    tokenizer, note = [], "none"
    if base is not None and (base / "tokenizer").is_dir():
        tokenizer = sorted(p for p in (base / "tokenizer").iterdir() if p.is_file())
        note = str(base / "tokenizer")
    elif text_encoder_dir is not None and (text_encoder_dir / "tokenizer.json").is_file():
        tokenizer, note = _tokenizer_files(text_encoder_dir), str(text_encoder_dir)
    if not tokenizer and need_tokenizer:
        raise CheckpointError(
            "missing component tokenizer: no tokenizer/ folder in --src"
            + (f" ({base})" if base else "")
            + " and no tokenizer.json in the --text-encoder folder."
        )
    scheduler = base / "scheduler" / "scheduler_config.json" if base is not None else None
    if scheduler is None or not scheduler.is_file():
        scheduler = _packaged("lens/scheduler.json")
    model_index = base / "model_index.json" if base is not None else None
    if model_index is None or not model_index.is_file():
        model_index = _packaged("lens/model_index.json")
    txt_offset = read_txt_offset(base) if base is not None else REAL_TXT_OFFSET
    return Support(tokenizer, note, scheduler, model_index, txt_offset)


# ----------------------------------------------------------------------------------------------
# writing


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("lens-jax", "jax", "jaxlib", "orbax-checkpoint", "numpy", "ml_dtypes", "flax"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)  # contents only: a read-only source does not make a read-only output


def write_component(job: Job, out: Path, progress: bool, between: Callable[[], None] = lambda: None) -> dict:
    folder = out / job.component
    folder.mkdir(parents=True)
    _copy(job.config_path, folder / "config.json")
    layers = 0 if job.stacked_key is None else int(next(
        shape for target, (shape, _) in job.expected.items() if target.startswith(job.stacked_key + "."))[0])
    bar = None
    if progress and layers:
        from tqdm.auto import tqdm

        bar = tqdm(total=layers + 1, desc=job.component, unit="piece", file=sys.stderr, leave=False)
    start = time.perf_counter()

    def on_piece(n: int) -> None:
        if bar is not None:
            bar.update(1)
        between()  # a Ctrl-C raises here, between two complete orbax writes

    nbytes = save_streamed(folder / PARAMS_DIR, job.pieces(), on_piece=on_piece)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    _log(f"{job.component}: {nbytes / 2**20:.1f} MiB of parameters written in {seconds:.1f} s")
    entry = {
        "layout": job.layout.to_json(),
        "config": f"{job.component}/config.json",
        "config_source": {**_file_record(job.config_path), "note": job.config_note},
        "params": f"{job.component}/{PARAMS_DIR}",
        "stacked_key": job.stacked_key,
        "num_layers": layers,
        "param_bytes": nbytes,
        "param_files": param_files(folder / PARAMS_DIR),  # sizes: a truncated or missing file is found at load
        "sources": [_file_record(f) for f in job.reader.files],
    }
    if job.component == "text_encoder":
        entry["keep_mxfp4"] = job.keep_mxfp4
        entry["lm_head"] = job.lm_head
    if job.component == "transformer":
        entry["quantize"] = job.quantize
    return entry


def write_support(support: Support, out: Path) -> dict:
    for f in support.tokenizer:
        _copy(f, out / "tokenizer" / f.name)
    _copy(support.scheduler, out / "scheduler" / "scheduler_config.json")
    index = json.loads(support.model_index.read_text())
    index["txt_offset"] = support.txt_offset
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {
        "tokenizer": [_file_record(f) for f in support.tokenizer],
        "scheduler": _file_record(support.scheduler),
        "model_index": _file_record(support.model_index),
        "txt_offset": support.txt_offset,
    }


# ----------------------------------------------------------------------------------------------
# verification: forward passes of the reloaded output against the source loaded directly


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    d = np.abs(a - b)
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.where(both_nan, 0.0, d)
    return float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0


def verify(job: Job, out: Path, dtype) -> float:
    """Max |converted - source| over a forward pass of the component; the caller decides pass/fail."""
    import jax

    from ..weights.orbax_io import load_component

    _, converted = load_component(out, job.component, dtype, keep_mxfp4=job.keep_mxfp4 if job.component ==
                                  "text_encoder" else None)
    got = [np.asarray(x) for x in registry.component(job.component).verify_forward(job.config, converted, dtype)]
    del converted
    source = jax.tree.map(jax.numpy.asarray, job.load_source())
    if job.quantize is not None:  # the stored quantised DiT against the source quantised in memory
        from ..models import quant

        source = quant.quantize_params(source, job.quantize)
    ref = [np.asarray(x) for x in registry.component(job.component).verify_forward(job.config, source, dtype)]
    del source
    if len(got) != len(ref):
        return float("inf")
    return max(_max_abs(a, b) for a, b in zip(got, ref))


# ----------------------------------------------------------------------------------------------
# the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert PyTorch Lens checkpoints (safetensors) to orbax checkpoints that "
                    "LensPipeline.from_pretrained(OUT) loads without torch.",
    )
    p.add_argument("--src", help="Lens diffusers folder or hub id (components, tokenizer, scheduler, model_index)")
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="parameter dtype written (default bf16)")
    p.add_argument("--components", default=",".join(COMPONENTS),
                   help="comma-separated subset of transformer,text_encoder,vae (default: all)")
    p.add_argument("--keep-mxfp4", action="store_true",
                   help="keep MXFP4 text-encoder experts packed (uint8; ~13 GB for GPT-OSS-20B instead of ~42 GB "
                        "dequantised in bf16)")
    p.add_argument("--transformer", metavar="FILE",
                   help="DiT weights: a single file (diffusers names, optionally prefixed, e.g. ComfyUI "
                        "lens_bf16.safetensors), a shard index or a folder")
    p.add_argument("--vae", metavar="FILE", help="VAE weights: diffusers names (flux2-vae.safetensors) or FLUX.2 "
                                                 "ae.safetensors names, or a folder")
    p.add_argument("--text-encoder", metavar="DIR", help="HF GPT-OSS folder (config.json + safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst (a previous conversion)")
    p.add_argument("--verify", action="store_true",
                   help="reload the output and compare a forward pass of each component with the source")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                   help="store the DiT quantised: int8 weight-only or fp8 (e4m3) kernels with per-channel scales "
                        "(img_mod/txt_mod and the small Linears stay in --dtype); see docs/quantization.md")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _components(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in COMPONENTS]
    if bad or not names:
        raise ConvertError(f"--components: unknown {bad or 'empty list'}; choose from {','.join(COMPONENTS)}.")
    return [c for c in COMPONENTS if c in names]


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_destination(dst: Path, overwrite: bool, sources: list[Path]) -> None:
    from ..weights.orbax_io import is_converted

    for s in sources:
        if _inside(dst, s) or _inside(s, dst):
            raise ConvertError(f"--dst {dst} overlaps the source {s}; write the output somewhere else.")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise ConvertError(f"--dst {dst} already exists; pass --overwrite to replace it, or choose another folder.")
        if not dst.is_dir() or (any(dst.iterdir()) and not is_converted(dst)):
            raise ConvertError(
                f"refusing to overwrite {dst}: it is not a previous conversion output (no lens-jax {MANIFEST}); "
                "remove it yourself if it should go."
            )
    if not dst.parent.is_dir():
        raise ConvertError(f"the parent folder of --dst ({dst.parent}) does not exist.")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise ConvertError(f"cannot write into {dst.parent} (the parent folder of --dst is read-only for this "
                           "user); choose a --dst in a folder you can write.")


def run(args) -> int:
    import jax.numpy as jnp

    components = _components(args.components)
    dtype = jnp.dtype(DTYPES[args.dtype])
    dst = Path(args.dst).expanduser().absolute()
    base = None
    if args.src is not None:
        from ..weights.hub import resolve_checkpoint

        base = resolve_checkpoint(args.src)
    if args.keep_mxfp4 and "text_encoder" not in components:
        _log("note: --keep-mxfp4 has no effect without the text_encoder component.")
    quantize = getattr(args, "quantize", None)
    if quantize is not None and "transformer" not in components:
        raise ConvertError(f"--quantize {quantize} quantises the DiT; add transformer to --components or drop --quantize.")

    given = {"transformer": args.transformer, "vae": args.vae, "text_encoder": args.text_encoder}
    sources = {c: _component_source(c, given[c], base) for c in components}
    _check_destination(dst, args.overwrite, [s for s in [base, *sources.values()] if s is not None])

    jobs: list[Job] = []
    for c in components:
        if c == "transformer":
            jobs.append(plan_transformer(sources[c], base, dtype))
            jobs[-1].quantize = quantize
        elif c == "vae":
            jobs.append(plan_vae(sources[c], base, dtype))
        else:
            jobs.append(plan_text_encoder(sources[c], dtype, args.keep_mxfp4))
    te_source = sources.get("text_encoder") or (Path(args.text_encoder) if args.text_encoder else None)
    te_dir = None if te_source is None else (te_source if te_source.is_dir() else te_source.parent)
    support = plan_support(base, te_dir, need_tokenizer="text_encoder" in components)
    for job in jobs:  # every key of every component checked before anything is written
        job.check()
        _log(f"{job.component}: {job.layout.describe()} layout, {len(job.reader)} tensors in "
             f"{len(job.reader.files)} file(s) from {job.source}; config {job.config_path} ({job.config_note})")

    interrupts.clean_leftovers(dst, (".convert-tmp-*", ".convert-old-*"), _log)
    tmp = dst.parent / f".{dst.name}.convert-tmp-{uuid.uuid4().hex[:12]}"
    old = None
    with interrupts.deferred_interrupt(f"{PROG}: interrupt: finishing the current write, then removing {tmp.name} "
                                       "...") as interrupt:
        try:
            tmp.mkdir()
            interrupts.mark_owner(tmp)
            old = _write_all(args, jobs, support, components, base, dtype, dst, tmp, interrupt.check)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Still inside the block: the output is in place, so a Ctrl-C now is ignored rather than
        # reported as "nothing was written".
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _log(f"wrote {dst} ({', '.join(components)}; {dtype}"
             f"{'' if quantize is None else f'; DiT quantised {quantize}'})")
    return 0


def _write_all(args, jobs, support, components, base, dtype, dst: Path, tmp: Path, check: Callable[[], None]):
    """Write everything into `tmp`, then swap it in as `dst`; returns the replaced old output (or None)."""
    old = None
    start = time.perf_counter()
    entries = {job.component: write_component(job, tmp, progress=not args.no_progress, between=check)
               for job in jobs}
    check()
    files = write_support(support, tmp)
    quantize = getattr(args, "quantize", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if quantize is None else QUANTIZED_FORMAT_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": args.src,
        "source_resolved": None if base is None else str(base.resolve()),
        "dtype": str(dtype),
        "keep_mxfp4": bool(args.keep_mxfp4 and "text_encoder" in components),
        "quantize": quantize,
        "components": entries,
        "files": files,
        "versions": _versions(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if args.verify:
        failed = []
        for job in jobs:
            check()
            diff = verify(job, tmp, dtype)
            ok = diff == 0.0
            _log(f"verify {job.component}: max |converted - source| = {diff:.3g} ({'ok' if ok else 'MISMATCH'})")
            if not ok:
                failed.append(job.component)
        if failed:
            raise ConvertError(f"--verify: the converted {', '.join(failed)} differ(s) from the source; "
                               "nothing was written.")
    check()
    interrupts.unmark_owner(tmp)
    if dst.exists() or dst.is_symlink():  # --overwrite (checked above): swap, then drop the old output
        old = dst.parent / f".{dst.name}.convert-old-{uuid.uuid4().hex[:12]}"
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
            old = None
        raise
    return old


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written to {args.dst} and the temporary folder was removed.",
              file=sys.stderr)
        return 130
    except (ConvertError, CheckpointError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
