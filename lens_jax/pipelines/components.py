"""The components a pipeline is built from, from a diffusers folder, a conversion output or thin air.

`Components` holds (config, params) of the DiT and the VAE with numpy or device leaves, a
factory for the text encoder (loaded lazily: it is the largest part and often released after
encoding), the tokenizer, the scheduler config and the text offset. The pipeline places the
parameters on its mesh.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from .. import configs, parallel
from ..parallel import offload
from ..parallel.offload import streams
from ..models import gpt_oss_decode as decode_lib
from ..models import quant
from ..models import text_encoder as te_lib
from ..models import transformer as dit
from ..models import vae as vae_lib
from ..sampling.scheduler import SchedulerConfig
from ..weights import hub, orbax_io
from ..weights import text_encoder as te_weights
from ..weights.dit import convert_transformer
from ..weights.vae import convert_vae
from . import prompt as prompt_lib


@dataclass
class Component:
    config: Any
    params: Any


@dataclass
class Components:
    transformer: Component
    vae: Component
    tokenizer: Any
    text_encoder_factory: Callable[[], te_lib.TextEncoder]
    scheduler: SchedulerConfig
    txt_offset: int


def load_components(root: Path, dtype, keep_mxfp4: bool | None = None, mesh=None, fsdp: bool = True,
                    rules=None, offload: str = "none") -> Components:
    """Read every component of a Lens diffusers folder (text encoder lazily, via a factory).

    A conversion output (it has a manifest.json) is restored from its orbax checkpoints instead,
    each parameter directly into its sharding on `mesh`, without torch. Under `offload` the
    streamed components' stacked layers are placed in pinned host memory.
    """
    if orbax_io.is_converted(root):
        return load_converted(root, dtype, keep_mxfp4=keep_mxfp4, mesh=mesh, fsdp=fsdp, rules=rules, offload=offload)
    hub.check_layout(root)
    dit_config, dit_params = convert_transformer(root / "transformer", dtype)
    vae_config, vae_params = convert_vae(root / "vae", dtype)
    selected = tuple(dit_config.selected_layer_index)
    # Loaded lazily, but its files are checked now: a damaged text encoder fails at load, not at the first prompt.
    te_weights.check_text_encoder(root / "text_encoder", dtype, keep_mxfp4=keep_mxfp4, num_layers=max(selected) + 1)

    def text_encoder_factory():
        place = None
        if mesh is not None:
            def place(host_params):
                return place_text_encoder(host_params, mesh, fsdp, rules, offload)
        return te_weights.load(root / "text_encoder", selected, dtype, keep_mxfp4=keep_mxfp4, place=place)

    return assemble(root, Component(dit_config, dit_params), Component(vae_config, vae_params), text_encoder_factory)


def place_text_encoder(host_params, mesh, fsdp: bool = True, rules=None, offload_mode: str = "none"):
    """Put text-encoder parameters (numpy) on `mesh` by their logical axes; stacked layers in host
    memory when the text encoder streams under `offload_mode`."""
    if fsdp:
        axes = te_lib.param_axes(None, params=host_params)
        shardings = parallel.logical_shardings(host_params, axes, mesh, rules or parallel.DEFAULT_RULES)
    else:
        shardings = parallel.replicated_shardings(host_params, mesh)
    if offload.streams(offload_mode, "text_encoder"):
        shardings = offload.on_host(shardings, "layers")
    return parallel.put_tree(host_params, shardings)


def load_converted(root: str | Path, dtype, keep_mxfp4: bool | None = None, mesh=None, fsdp: bool = True,
                   rules=None, offload: str = "none") -> Components:
    """Every component of a conversion output. The DiT and VAE are restored now (into their
    shardings on `mesh`); the text encoder lazily, with only the decoder layers the DiT selects."""
    root = Path(root)
    manifest = orbax_io.check_components(root)
    te_config = te_lib.TextEncoderConfig.from_json(root / "text_encoder" / "config.json")
    orbax_io.text_encoder_packed(root, manifest, keep_mxfp4)  # a contradicting keep_mxfp4 fails now
    dit_config, dit_params = orbax_io.load_component(root, "transformer", dtype, mesh=mesh, fsdp=fsdp, rules=rules,
                                                     layers_on_host=streams(offload, "transformer"))
    vae_config, vae_params = orbax_io.load_component(root, "vae", dtype, mesh=mesh, fsdp=False)
    selected = tuple(dit_config.selected_layer_index)
    needed = max(selected) + 1
    te_lib.check_selected_layers(selected, te_config.num_hidden_layers)
    orbax_io.check_component(root, "text_encoder", dtype, keep_mxfp4=keep_mxfp4, num_layers=needed)  # eager check

    def text_encoder_factory():
        config, params = orbax_io.load_component(root, "text_encoder", dtype, mesh=mesh, fsdp=fsdp,
                                                 keep_mxfp4=keep_mxfp4, num_layers=needed, rules=rules,
                                                 layers_on_host=streams(offload, "text_encoder"))

        def lm_loader():  # every layer + the causal-LM head, for the prompt reasoner
            return orbax_io.load_component(root, "text_encoder", dtype, mesh=mesh, fsdp=fsdp, keep_mxfp4=keep_mxfp4,
                                           rules=rules, lm_head=True)[1]

        return decode_lib.CausalLM(config, params, te_lib.check_selected_layers(selected, needed,
                                                                                config.num_hidden_layers),
                                   lm_loader=lm_loader)

    return assemble(root, Component(dit_config, dit_params), Component(vae_config, vae_params), text_encoder_factory)


def assemble(root: Path, transformer: Component, vae: Component, text_encoder_factory) -> Components:
    """Components from the DiT, the VAE and the text-encoder factory, with the tokenizer, scheduler
    config and txt_offset read from `root`."""
    return Components(
        transformer=transformer,
        vae=vae,
        tokenizer=prompt_lib.load_tokenizer(root / "tokenizer"),
        text_encoder_factory=text_encoder_factory,
        scheduler=SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
        txt_offset=prompt_lib.read_txt_offset(root),
    )


def tree_bytes(tree) -> int:
    """Bytes of a parameter tree (concrete or abstract leaves)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate_bytes(root: Path, dtype, keep_mxfp4: bool | None = None,
                   quantize: str | None = None) -> tuple[int, int, int, int]:
    """(DiT, text encoder, activations, DiT modulation) bytes on the device for a checkpoint root, from its
    configs alone (the DiT as `quant.quantize_params` holds it when `quantize` is a mode; the last is what
    `offload="text_encoder"` takes off the device, `dit_device_bytes`)."""
    dit_config = dit.TransformerConfig.from_json(Path(root) / "transformer" / "config.json")
    te_config = te_lib.TextEncoderConfig.from_json(Path(root) / "text_encoder" / "config.json")
    needed = max(dit_config.selected_layer_index) + 1
    packed = te_config.quant_method == "mxfp4" if keep_mxfp4 is None else keep_mxfp4
    dit_shapes = jax.eval_shape(lambda: dit.init_params(dit_config, jax.random.key(0), dtype))
    if quantize is not None:
        dit_shapes = jax.eval_shape(functools.partial(quant.quantize_params, mode=quantize), dit_shapes)
    te_bytes = tree_bytes(jax.eval_shape(lambda: te_lib.init_params(te_config.truncated(needed), jax.random.key(0), dtype,
                                                              packed=packed)))
    dit_bytes, modulation_bytes = dit_device_bytes(dit_shapes, quantize)
    return dit_bytes, te_bytes, 4 * 2**30, modulation_bytes  # activations: a generous bound for 1440^2, CFG, bf16


def dit_device_bytes(dit_params, quantize: str | None) -> tuple[int, int]:
    """(bytes the DiT holds on the device without offload, bytes of them that `offload="text_encoder"`
    moves to host memory): its img_mod/txt_mod kernels, which a quantised DiT keeps there anyway
    (`lens_jax.sampling.modulation.hosted`)."""
    modulation = tree_bytes([dit_params["transformer_blocks"][k]["kernel"] for k in dit.MODULATION_KEYS])
    if quantize is not None:
        return tree_bytes(dit_params) - modulation, 0
    return tree_bytes(dit_params), modulation


def tiny_random_components(seed: int, dtype) -> Components:
    """Tiny random Lens components built in memory from `lens_jax/configs/tiny` (no download, no torch)."""
    k_dit, k_vae, k_te = jax.random.split(jax.random.key(seed), 3)
    dit_config = dit.TransformerConfig.from_dict(configs.load_json("tiny/transformer.json"))
    vae_config = vae_lib.VAEConfig.from_dict(configs.load_json("tiny/vae.json"))
    te_config = te_lib.TextEncoderConfig.from_dict(configs.load_json("tiny/text_encoder.json"))
    to_host = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731

    def init(fn, config, key):
        # One compiled program instead of hundreds of eager ops; XLA's optimisation passes would
        # cost more than they save on a program that runs once.
        options = {"xla_backend_optimization_level": 0}
        return jax.jit(fn, static_argnums=(0, 2), compiler_options=options)(config, key, dtype)

    # host copy: the pipeline may free the device one; with the causal-LM head, so the reasoner can run
    te_params = to_host(init(functools.partial(te_lib.init_params, lm_head=True), te_config, k_te))

    def text_encoder_factory():
        return decode_lib.CausalLM(te_config, jax.tree.map(jax.numpy.asarray, te_params),
                                   tuple(dit_config.selected_layer_index))

    # lens_jax/configs/tiny is laid out like a checkpoint root for the tokenizer, scheduler and model_index.
    return assemble(
        configs.path("tiny"),
        Component(dit_config, to_host(init(dit.init_params, dit_config, k_dit))),
        Component(vae_config, to_host(init(vae_lib.init_params, vae_config, k_vae))),
        text_encoder_factory,
    )
