"""Finding and loading a Lens checkpoint: the upstream diffusers directory, or a hub id.

Each component is converted to a pytree with numpy leaves on the host; the pipeline then
places it on its mesh, so no component is ever fully materialised on one device first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import prompt as prompt_lib
from .scheduler import SchedulerConfig

COMPONENT_DIRS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint folder or hub repository could not be found or is incomplete."""


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id resolved to its local snapshot."""
    p = Path(path_or_repo_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointNotFoundError(f"{p} is a file; pass the checkpoint folder (with model_index.json).")
        return p
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise CheckpointNotFoundError(f"{repo_id} is neither an existing folder nor a hub id like 'owner/name'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached (offline?). "
            "Download it on a connected machine (`huggingface-cli download " + repo_id + "`) or pass a local folder."
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(
            f"could not fetch {repo_id} from the hub ({e.__class__.__name__}: {e}). The microsoft/Lens repos were "
            "withdrawn in 2026; pass a local copy or a mirror's id."
        ) from None


def check_layout(root: Path) -> None:
    missing = [c for c in COMPONENT_DIRS if not (root / c).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise CheckpointNotFoundError(
            f"{root} is missing component folder(s) {missing} of the Lens diffusers layout "
            f"({', '.join(COMPONENT_DIRS)} + model_index.json); found {present}."
        )


def load_components(root: Path, dtype, keep_mxfp4: bool | None = None, mesh=None, fsdp: bool = True) -> dict[str, Any]:
    """Read every component of a Lens diffusers folder (text encoder lazily, via a factory).

    A `python -m convert` output (it has a manifest.json) is restored from its orbax checkpoints
    instead, each parameter directly into its sharding on `mesh`, without torch.
    """
    from convert.orbax_io import is_converted, load_converted

    if is_converted(root):
        return load_converted(root, dtype, keep_mxfp4=keep_mxfp4, mesh=mesh, fsdp=fsdp)
    from convert.transformer import convert_transformer
    from convert.vae import convert_vae

    from . import text_encoder as te_lib

    check_layout(root)
    dit_config, dit_params = convert_transformer(root / "transformer", dtype)
    vae_config, vae_params = convert_vae(root / "vae", dtype)
    selected = tuple(dit_config.selected_layer_index)

    def text_encoder_factory():
        return te_lib.load(root / "text_encoder", selected, dtype, keep_mxfp4=keep_mxfp4)

    return assemble_components(root, (dit_config, dit_params), (vae_config, vae_params), text_encoder_factory)


def assemble_components(root: Path, transformer: tuple, vae: tuple, text_encoder_factory) -> dict[str, Any]:
    """The dict `LensPipeline` is built from: (config, params) of the DiT and VAE, the text-encoder
    factory, and the tokenizer, scheduler config and txt_offset read from `root`."""
    from .pipeline import _Component

    return {
        "transformer": _Component(*transformer),
        "vae": _Component(*vae),
        "tokenizer": prompt_lib.load_tokenizer(root / "tokenizer"),
        "text_encoder_factory": text_encoder_factory,
        "scheduler": SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
        "txt_offset": prompt_lib.read_txt_offset(root),
    }


def tiny_random_components(seed: int, dtype) -> dict[str, Any]:
    """Tiny random Lens components built in memory from `configs/tiny` (no download, no torch)."""
    import configs
    from . import transformer as dit
    from . import vae as vae_lib
    from .text_encoder import TextEncoder, TextEncoderConfig, init_params as te_init

    k_dit, k_vae, k_te = jax.random.split(jax.random.key(seed), 3)
    dit_config = dit.TransformerConfig.from_dict(configs.load_json("tiny/transformer.json"))
    vae_config = vae_lib.VAEConfig.from_dict(configs.load_json("tiny/vae.json"))
    te_config = TextEncoderConfig.from_dict(configs.load_json("tiny/text_encoder.json"))
    to_host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731

    def init(fn, config, key):
        # One compiled program instead of hundreds of eager ops; XLA's optimisation passes would
        # cost more than they save on a program that runs once.
        options = {"xla_backend_optimization_level": 0}
        return jax.jit(fn, static_argnums=(0, 2), compiler_options=options)(config, key, dtype)

    te_params = to_host(init(te_init, te_config, k_te))  # host copy: the pipeline may free the device one

    def text_encoder_factory():
        return TextEncoder(te_config, jax.tree.map(jax.numpy.asarray, te_params), tuple(dit_config.selected_layer_index))

    # configs/tiny is laid out like a checkpoint root for the tokenizer, scheduler and model_index.
    return assemble_components(
        configs.path("tiny"),
        (dit_config, to_host(init(dit.init_params, dit_config, k_dit))),
        (vae_config, to_host(init(vae_lib.init_params, vae_config, k_vae))),
        text_encoder_factory,
    )
