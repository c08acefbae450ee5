"""Converted Lens checkpoints on disk: streamed orbax writing, sharded reading, the manifest.

A conversion output (`lens-jax convert`) is a folder:

    OUT/manifest.json                what was converted from what (see `lens_jax/tools/convert.py`)
    OUT/model_index.json             the upstream file, with `txt_offset`
    OUT/scheduler/scheduler_config.json
    OUT/tokenizer/...                copied as is
    OUT/<component>/config.json      the component's upstream config
    OUT/<component>/params/          an orbax checkpoint of the component's parameters

for <component> in transformer, text_encoder, vae. In `params/` every per-layer ("stacked")
subtree is stored one layer per entry: the DiT's `transformer_blocks` leaf `attn.img_qkv.kernel`
[L, d, 3, inner] is saved as `transformer_blocks/0/attn/img_qkv/kernel` ... `transformer_blocks/{L-1}/...`,
each [d, 3, inner]; the text encoder's `layers` likewise; everything else is saved as in the
in-memory pytree. That lets the writer save one layer per `ocp.partial.save` call (host memory
~ one layer, never the model) and the reader restore only the layers it needs.

Reading (`load_params`) restores every leaf straight into the sharding it is given (so each host
reads only its own shards) and stacks each per-layer leaf on the devices one leaf at a time, so
the device peak is the parameters plus one stacked leaf. The result has exactly the structure
of the model's `init_params`, which `lens_jax.transformer.apply` etc. expect.

Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .. import parallel
from ..models import quant
from ..parallel import offload
from ..errors import ConvertedCheckpointError
from . import registry
from .mapping import check_state_dict, read_target, unflatten
from .registry import COMPONENTS
from .safetensors_io import SafetensorsReader

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "PARAMS_DIR",
    "ConvertedCheckpointError",
    "stream_params",
    "save_streamed",
    "load_params",
    "is_converted",
    "read_manifest",
    "check_components",
    "load_component",
    "check_component",
    "QUANTIZED_FORMAT_VERSION",
    "stored_quantize",
    "find_converted",
]

FORMAT = "lens-jax-orbax"
FORMAT_VERSION = 2  # 2: the DiT's fused qkv kernels stored as [d, 3, inner]
# Written instead of FORMAT_VERSION by a conversion with a quantised DiT (`convert --quantize`), so
# that a lens-jax from before quantised checkpoints refuses it ("written by a newer lens-jax")
# rather than reading int8 kernels as floats; unquantised outputs keep version 2. Readers accept both.
QUANTIZED_FORMAT_VERSION = 3
MANIFEST = "manifest.json"
PARAMS_DIR = "params"


# ----------------------------------------------------------------------------------------------
# writing


def stream_params(
    reader: SafetensorsReader,
    rules,
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    *,
    stacked_key: str | None,
    source_prefix: str = "",
    ignore: Sequence[str] = (),
    what: str = "checkpoint",
) -> Iterator[dict]:
    """Convert with `rules` (the component modules' mapping tables) one layer at a time.

    Checks the whole checkpoint first (every missing, unexpected and mis-shaped key, nothing
    read), then yields pytrees with numpy leaves: first every target outside `stacked_key`, then
    `{stacked_key: {"i": layer i's subtree}}` for each layer i. At most one such piece is alive
    at a time when the caller writes and drops each one.
    """
    plans = check_state_dict(reader, rules, expected, source_prefix=source_prefix, ignore=ignore, what=what)
    head = f"{stacked_key}." if stacked_key else None
    per_layer = [p for p in plans if head and p.rule.target.startswith(head)]
    rest = [p for p in plans if p not in per_layer]
    if any(not p.rule.stacked for p in per_layer):
        bad = [p.rule.target for p in per_layer if not p.rule.stacked]
        raise ValueError(f"targets under {stacked_key!r} without a per-layer source key: {bad}")
    yield unflatten({p.rule.target: read_target(reader, p, source_prefix=source_prefix, what=what) for p in rest})
    num_layers = {p.target_shape[0] for p in per_layer}
    if len(num_layers) > 1:
        raise ValueError(f"{stacked_key} leaves disagree on the number of layers: {sorted(num_layers)}")
    for i in range(num_layers.pop() if num_layers else 0):
        layer = {
            p.rule.target[len(head):]: read_target(reader, p, source_prefix=source_prefix, layer=i, what=what)
            for p in per_layer
        }
        yield {stacked_key: {str(i): unflatten(layer)}}


def save_streamed(path: str | Path, pieces: Iterator[dict], on_piece: Callable[[int], None] | None = None) -> int:
    """Write pytree pieces with disjoint leaves as one orbax checkpoint, one `partial.save` per piece.

    The checkpoint exists at `path` only after the last piece (orbax writes to `path` +
    '.partial_save' until `finalize`). Returns the number of bytes of parameters written.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    path = Path(path)
    total = 0
    ctx = ocp.Context()
    # Uncompressed: orbax's compressed writes keep ~2-3 pieces' worth of buffers alive across calls
    # (measured: 160 MB pieces, +450 MB retained vs +0 uncompressed) for ~20 % less disk on
    # random bf16; weights barely compress and loading skips the decompression.
    ctx.array.saving.use_compression = False
    with ctx:
        for n, piece in enumerate(pieces):
            ocp.partial.save(path, piece)
            total += sum(np.asarray(x).nbytes for x in jax.tree.leaves(piece))
            del piece
            if on_piece is not None:
                on_piece(n)
        ocp.partial.finalize(path)
    return total


# ----------------------------------------------------------------------------------------------
# reading


def _path_tuple(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _stored_shapes(path: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    import orbax.checkpoint.experimental.v1 as ocp

    try:
        meta = ocp.metadata(path).metadata
    except Exception as e:  # orbax raises a variety of errors for a damaged or missing checkpoint
        raise ConvertedCheckpointError(f"{path} is not a readable orbax checkpoint ({_first_line(e)}); "
                                       f"{_REDO}") from None
    flat = traverse_util.flatten_dict(meta)
    return {tuple(str(k) for k in key): (tuple(v.shape), np.dtype(v.dtype)) for key, v in flat.items()}


_REDO = ("convert it again (`lens-jax convert --src SOURCE --dst ROOT --overwrite --verify`; --verify checks "
         "the new output against its source).")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(" See full TensorStore details")[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}"


def _damaged(what: str, path: Path, e: BaseException) -> ConvertedCheckpointError:
    return ConvertedCheckpointError(f"{what} at {path} is damaged (missing or truncated files: {_first_line(e)}); "
                                    f"{_REDO}")


def _stacker(sharding) -> Callable:
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _layer_sharding(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked leaf whose sharding is `sharding` (layer axis unsharded)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError(f"stacked leaves must not be sharded on the layer axis; got {sharding.spec}.")
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    raise TypeError(f"unsupported sharding {sharding!r}; use NamedSharding or SingleDeviceSharding.")


def load_params(path: str | Path, abstract: Any, shardings: Any = None, *, stacked_key: str | None = None,
                what: str = "converted checkpoint") -> Any:
    """Restore a `save_streamed` checkpoint into the structure, shapes and dtypes of `abstract`.

    `abstract`: the model's abstract params (`jax.eval_shape` of `init_params`); leaves are cast to
    its dtypes. `shardings`: a matching tree of shardings (e.g. `lens_jax.parallel.logical_shardings`
    on `abstract`), default: everything on the first device. Each leaf is read directly into its
    sharding. Under `stacked_key` the stored per-layer entries 0..L-1 are read, L being the
    leading dimension in `abstract` (the checkpoint may hold more layers), and stacked on the
    devices one leaf at a time.
    """
    import orbax.checkpoint.experimental.v1 as ocp

    path = Path(path)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    check_files(path, what)
    stored = _stored_shapes(path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sharding_leaves = treedef.flatten_up_to(shardings)

    rest: list[tuple[tuple[str, ...], jax.ShapeDtypeStruct]] = []
    stacked: list[tuple[int, tuple[str, ...], jax.ShapeDtypeStruct, Any]] = []
    problems, quantized = [], []
    for n, ((kp, leaf), sharding) in enumerate(zip(leaves, sharding_leaves)):
        key = _path_tuple(kp)
        shape, dtype = tuple(leaf.shape), jnp.dtype(leaf.dtype)
        if stacked_key is not None and key[0] == stacked_key:
            inner = key[1:]
            for i in range(shape[0]):
                got = stored.get((stacked_key, str(i), *inner))
                if got is None or got[0] != shape[1:]:
                    problems.append(f"{'/'.join((stacked_key, str(i), *inner))}: expected {list(shape[1:])}, "
                                    f"found {'nothing' if got is None else list(got[0])}")
                elif _cast_loses(got[1], dtype):
                    quantized.append("/".join((stacked_key, str(i), *inner)))
            stacked.append((n, inner, leaf, sharding))
        else:
            got = stored.get(key)
            if got is None or got[0] != shape:
                problems.append(f"{'/'.join(key)}: expected {list(shape)}, found {'nothing' if got is None else list(got[0])}")
            elif _cast_loses(got[1], dtype):
                quantized.append("/".join(key))
            rest.append((n, key, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)))
    if problems:
        raise ConvertedCheckpointError(
            f"{what} at {path} does not match its config.json ({len(problems)} problems, first: {problems[0]}); "
            f"{_REDO}"
        )
    if quantized:
        raise ConvertedCheckpointError(
            f"{what} at {path} stores quantised kernels ({quantized[0]}: {_stored_dtype_name(stored, quantized[0])}) "
            "that this reader would load as floats without their scales; restore it with "
            "`orbax_io.load_component` / `LensPipeline.from_pretrained`, which read the quantisation from the manifest."
        )

    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    out: list[Any] = [None] * len(leaves)
    with ctx:
        if rest:
            tree = traverse_util.unflatten_dict({key: sds for _, key, sds in rest})
            got = traverse_util.flatten_dict(_load(ocp, path, tree, what))
            for n, key, _ in rest:
                out[n] = got[key]
        stackers: dict = {}  # one compiled stack per sharding, for this call only (no module-level cache)
        for n, inner, leaf, sharding in stacked:
            layers = int(leaf.shape[0])
            per_layer = jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype,
                                             sharding=_layer_sharding(sharding, len(leaf.shape)))
            tree = traverse_util.unflatten_dict({(stacked_key, str(i), *inner): per_layer for i in range(layers)})
            got = traverse_util.flatten_dict(_load(ocp, path, tree, what))
            pieces = [got[(stacked_key, str(i), *inner)] for i in range(layers)]
            del got
            if sharding not in stackers:
                stackers[sharding] = _stacker(sharding)
            out[n] = stackers[sharding](*pieces)
            del pieces
    return jax.tree_util.tree_unflatten(treedef, out)


def _cast_loses(stored: np.dtype, wanted: np.dtype) -> bool:
    # An int8 / float8 leaf read into a float leaf is a quantised kernel read without its scale.
    return stored in (np.dtype(np.int8), np.dtype(quant.FP8)) and stored != wanted


def _stored_dtype_name(stored: dict, key: str) -> str:
    return str(stored[tuple(key.split("/"))][1])


def _load(ocp, path: Path, tree, what: str):
    try:
        return ocp.load(path, tree)
    except Exception as e:  # TensorStore/orbax errors of missing or truncated files: one line instead
        raise _damaged(what, path, e) from None


def param_files(path: Path) -> dict[str, int]:
    """{relative path: bytes} of every file of an orbax checkpoint folder (recorded in the manifest)."""
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}


def check_files(path: Path, what: str, expected: Mapping[str, int] | None = None) -> None:
    """The checkpoint folder exists and, when the manifest recorded them, every file has its size."""
    if not path.is_dir():
        raise ConvertedCheckpointError(f"{what}: {path} is missing; {_REDO}")
    for rel, size in (expected or {}).items():
        f = path / rel
        got = f.stat().st_size if f.is_file() else None
        if got != size:
            state = "missing" if got is None else f"{got} bytes instead of {size} (truncated or altered)"
            raise ConvertedCheckpointError(f"{what} at {path} is damaged: {rel} is {state}; {_REDO}")


# ----------------------------------------------------------------------------------------------
# a whole conversion output


def is_converted(root: str | Path) -> bool:
    """Whether `root` is a `python -m convert` output (it has a manifest of ours)."""
    p = Path(root) / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def find_converted(path: str | Path) -> tuple[Path, str] | None:
    """(root, description) when `path` is a conversion output or a folder/file inside one, else None;
    the description names the format, dtype and DiT quantisation (for "this is not what I read" errors)."""
    p = Path(path)
    for root in (p, *p.parents[:3]):
        if is_converted(root):
            m = json.loads((root / MANIFEST).read_text())
            quantised = _dit_quantize(m)
            return root, (f"a lens-jax conversion output (orbax, {m.get('dtype')}"
                          f"{f', DiT quantised {quantised}' if quantised else ''})")
    return None


def read_manifest(root: str | Path) -> dict:
    p = Path(root) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConvertedCheckpointError(f"{root} has no {MANIFEST}; it is not a `python -m convert` output.") from None
    except json.JSONDecodeError as e:
        raise ConvertedCheckpointError(f"{p} is not valid JSON ({e}).") from None
    if manifest.get("format") != FORMAT:
        raise ConvertedCheckpointError(f"{p} is not a lens-jax conversion manifest (format {manifest.get('format')!r}).")
    if int(manifest.get("format_version", 0)) < FORMAT_VERSION:
        raise ConvertedCheckpointError(
            f"{root} was written by an older lens-jax (format version {manifest.get('format_version')}, now "
            f"{FORMAT_VERSION}); convert the PyTorch checkpoint again with `lens-jax convert`."
        )
    if int(manifest.get("format_version", 0)) > QUANTIZED_FORMAT_VERSION:
        raise ConvertedCheckpointError(
            f"{root} was written by a newer lens-jax (format version {manifest['format_version']}); upgrade lens-jax."
        )
    return manifest


def _component_entry(root: Path, manifest: dict, component: str) -> dict:
    entry = manifest.get("components", {}).get(component)
    if entry is None or not (root / component / PARAMS_DIR).is_dir():
        present = sorted(manifest.get("components", {}))
        raise ConvertedCheckpointError(
            f"{root} has no converted {component} (it holds {present}); convert it with "
            f"`lens-jax convert --src ... --dst {root} --components {component} ...` into a full output."
        )
    return entry


def text_encoder_packed(root: Path, manifest: dict, keep_mxfp4: bool | None) -> bool:
    """Whether the converted text encoder keeps MXFP4 experts; refuses a contradicting `keep_mxfp4`."""
    entry = manifest["components"]["text_encoder"]
    packed = bool(entry.get("keep_mxfp4", manifest.get("keep_mxfp4", False)))
    if keep_mxfp4 is not None and bool(keep_mxfp4) != packed:
        raise ConvertedCheckpointError(
            f"{root}/text_encoder was converted with{'' if packed else 'out'} --keep-mxfp4 "
            f"(experts {'MXFP4-packed' if packed else 'dequantised'}) but keep_mxfp4={keep_mxfp4} was asked; "
            "load with keep_mxfp4=None or convert again with the other setting."
        )
    return packed


def stored_quantize(root: str | Path, quantize: str | None = None, manifest: dict | None = None) -> str | None:
    """The quantisation the converted DiT was stored with (None: unquantised), after checking `quantize`.

    `quantize=None` means "as stored"; a mode equal to the stored one is fine; another mode on a
    quantised checkpoint is refused (the float weights are gone). On an unquantised checkpoint any
    mode is accepted: the caller quantises after loading."""
    quant.check_mode(quantize)
    manifest = read_manifest(root) if manifest is None else manifest
    stored = _dit_quantize(manifest)
    if stored is not None and stored not in quant.MODES:
        raise ConvertedCheckpointError(f"{root}: unknown DiT quantisation {stored!r} in {MANIFEST}; {_REDO}")
    if stored is not None and quantize is not None and quantize != stored:
        raise ConvertedCheckpointError(
            f"{root} stores the DiT quantised as {stored} but quantize={quantize!r} was asked; load with "
            f"quantize={stored!r} or None (as stored), or convert again with `--quantize {quantize}` (or without "
            "--quantize to keep float weights)."
        )
    return stored


def _quantized(abstract, mode: str | None):
    """The abstract params as stored quantised in `mode` (unchanged when None)."""
    return abstract if mode is None else jax.eval_shape(lambda a: quant.quantize_params(a, mode), abstract)


def _dit_quantize(manifest: dict) -> str | None:
    """The DiT quantisation a manifest records (None: unquantised or no DiT)."""
    return (manifest.get("components", {}).get("transformer") or {}).get("quantize")


def check_components(root: str | Path, names: Sequence[str] = tuple(COMPONENTS)) -> dict:
    """The manifest of `root` after checking that it holds `names`, a tokenizer and a scheduler."""
    root = Path(root)
    manifest = read_manifest(root)
    for name in names:
        _component_entry(root, manifest, name)
    for folder in ("tokenizer", "scheduler"):
        if not (root / folder).is_dir():
            raise ConvertedCheckpointError(f"{root} has no {folder}/ folder; the conversion output is incomplete.")
    return manifest


def load_component(root: str | Path, component: str, dtype, *, mesh=None, fsdp: bool = True,
                   keep_mxfp4: bool | None = None, num_layers: int | None = None, rules=None,
                   layers_on_host: bool = False, lm_head: bool = False, quantize: str | None = None):
    """(config, params) of one converted component; params placed on `mesh` (default: first device).

    dtype: the parameter dtype to restore into (leaves the model keeps in float32, such as the
    VAE's BatchNorm statistics or the text encoder's norms, stay float32). Each parameter is read
    straight into the sharding its logical axes get from `rules` (default
    `lens_jax.parallel.DEFAULT_RULES`; `fsdp=False` replicates). `keep_mxfp4` (text encoder):
    None = as converted; a value contradicting the conversion is an error. `num_layers` (text
    encoder): restore only the first decoder layers. `layers_on_host`: the stacked layers go to
    pinned host memory (streamed offload, `lens_jax.parallel.offload`), never through the device.
    `lm_head` (text encoder): also restore the final norm and the LM head (the conversion must
    have stored them). `quantize` (transformer): None = as converted (a `convert --quantize` output
    restores its int8 / fp8 kernels and kernel_scale leaves, sharded by `quant.quantized_axes`, never
    a float copy); a mode contradicting a quantised conversion is an error (`stored_quantize`).
    """
    spec = registry.component(component)
    root = Path(root)
    manifest = read_manifest(root)
    _component_entry(root, manifest, component)  # raises when the component is missing
    config = spec.config_from_json(root / component / "config.json")
    options = {}
    if component == "text_encoder":
        options = {"packed": text_encoder_packed(root, manifest, keep_mxfp4), "num_layers": num_layers}
        if lm_head:
            if not manifest["components"]["text_encoder"].get("lm_head", False):
                raise ConvertedCheckpointError(
                    f"{root}/text_encoder was converted without the causal-LM head (lm_head + final norm), which "
                    "text generation (the prompt reasoner) needs; convert it again with this lens-jax version."
                )
            options["lm_head"] = True
    mode = stored_quantize(root, quantize, manifest) if component == "transformer" else None
    abstract = _quantized(spec.abstract_params(config, dtype, **options), mode)
    if mesh is None:
        shardings = None
    elif fsdp:
        axes = spec.param_axes(config, **options)
        axes = axes if mode is None else quant.quantized_axes(axes, abstract)
        shardings = parallel.logical_shardings(abstract, axes, mesh, rules or parallel.DEFAULT_RULES)
    else:
        shardings = parallel.replicated_shardings(abstract, mesh)
    if layers_on_host and shardings is not None and spec.stacked_key:
        shardings = offload.on_host(shardings, spec.stacked_key)
    check_files(root / component / PARAMS_DIR, f"converted {component}",
                manifest["components"][component].get("param_files"))
    params = load_params(root / component / PARAMS_DIR, abstract, shardings, stacked_key=spec.stacked_key,
                         what=f"converted {component}")
    return config, params


def check_component(root: str | Path, component: str, dtype, *, keep_mxfp4: bool | None = None,
                    num_layers: int | None = None, quantize: str | None = None) -> None:
    """Check one converted component without reading its parameters: manifest entry, config, the
    orbax metadata and every stored leaf's shape against the config (what `load_component` needs)."""
    spec = registry.component(component)
    root = Path(root)
    manifest = read_manifest(root)
    _component_entry(root, manifest, component)
    config = spec.config_from_json(root / component / "config.json")
    options = {}
    if component == "text_encoder":
        options = {"packed": text_encoder_packed(root, manifest, keep_mxfp4), "num_layers": num_layers}
    mode = stored_quantize(root, quantize, manifest) if component == "transformer" else None
    abstract = _quantized(spec.abstract_params(config, dtype, **options), mode)
    path = root / component / PARAMS_DIR
    what = f"converted {component}"
    check_files(path, what, manifest["components"][component].get("param_files"))
    stored = _stored_shapes(path)
    problems = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        key, shape = _path_tuple(kp), tuple(leaf.shape)
        if spec.stacked_key is not None and key[0] == spec.stacked_key:
            wanted = [((spec.stacked_key, str(i), *key[1:]), shape[1:]) for i in range(shape[0])]
        else:
            wanted = [(key, shape)]
        for k, s in wanted:
            got = stored.get(k)
            if got is None or got[0] != s:
                problems.append(f"{'/'.join(k)}: expected {list(s)}, found {'nothing' if got is None else list(got[0])}")
    if problems:
        raise ConvertedCheckpointError(f"{what} at {path} does not match its config.json ({len(problems)} problems, "
                                       f"first: {problems[0]}); {_REDO}")
