"""PyTorch references for `lens-jax parity`: transformers GPT-OSS, diffusers VAE and scheduler, the Lens DiT.

Every import of torch / transformers / diffusers happens inside a function, so the rest of the
tool runs without them; a missing piece raises `Unavailable` with one line saying what to install.
The Lens DiT is not in any package the project depends on: it is imported from the module or
file the user names (`--reference-dit`), or from diffusers when a release ships it.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...errors import InputError

DIT_CLASS = "LensTransformer2DModel"


class Unavailable(Exception):
    """A reference (or its library) cannot be used here; the message is one line for the user."""


def require(module: str, why: str) -> Any:
    """Import `module` or raise Unavailable naming the pip package to install."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = None
    if mod is None:  # also covers sys.modules[module] = None
        raise Unavailable(f"{module} is not installed ({why}); install it with `pip install 'lens-jax[parity]'`.")
    return mod


def torch_device() -> str:
    torch = require("torch", "the PyTorch reference")
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(dtype: str):
    torch = require("torch", "the PyTorch reference")
    return torch.float32 if dtype == "f32" else torch.bfloat16


def free(*objs) -> None:
    """Drop references and return accelerator memory (components run one at a time)."""
    del objs
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# ----------------------------------------------------------------------------- text encoder


def load_text_encoder(folder: Path, dtype: str):
    """transformers GptOssForCausalLM (eager attention), MXFP4 experts dequantised on load."""
    transformers = require("transformers", "the GPT-OSS reference")
    require("torch", "the GPT-OSS reference")
    cfg = json.loads((folder / "config.json").read_text())
    kwargs: dict[str, Any] = dict(dtype=torch_dtype(dtype), attn_implementation="eager")
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    model = transformers.GptOssForCausalLM.from_pretrained(folder, **kwargs)
    return model.to(torch_device()).eval()


def text_layers(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[np.ndarray]:
    """Raw output of every decoder layer (no final norm), captured with forward hooks."""
    torch = require("torch", "the GPT-OSS reference")
    outs: list[np.ndarray] = []

    def hook(_module, _inputs, output):
        outs.append(to_numpy(output[0] if isinstance(output, tuple) else output))

    hooks = [layer.register_forward_hook(hook) for layer in model.model.layers]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.model(input_ids=torch.from_numpy(input_ids).to(device),
                        attention_mask=torch.from_numpy(attention_mask).to(device))
    finally:
        for h in hooks:
            h.remove()
    return outs


# ----------------------------------------------------------------------------- DiT


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(f"lens_parity_reference_{abs(hash(str(path)))}", path)
    if spec is None or spec.loader is None:
        raise InputError(f"--reference-dit {path}: not a Python file; give a .py file or an importable module.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_dit_class(reference: str | None):
    """The reference `LensTransformer2DModel` class: from a file or module, else from diffusers."""
    require("torch", "the Lens DiT reference")
    if reference:
        path = Path(reference)
        if path.suffix == ".py" and not path.is_file():
            raise Unavailable(f"--reference-dit {reference}: no such file; give the upstream lens/transformer.py.")
        try:
            module = _import_file(path) if path.is_file() else importlib.import_module(reference)
        except Exception as e:  # an import error inside the user's file: report it in one line
            raise Unavailable(f"--reference-dit {reference}: cannot import it ({type(e).__name__}: {e}).") from None
        if not hasattr(module, DIT_CLASS):
            raise Unavailable(f"--reference-dit {reference} defines no {DIT_CLASS}.")
        return getattr(module, DIT_CLASS)
    diffusers = require("diffusers", "the Lens DiT reference")
    cls = getattr(diffusers, DIT_CLASS, None)
    if cls is None:
        raise Unavailable(
            f"no Lens DiT reference: this diffusers ({diffusers.__version__}) has no {DIT_CLASS}; pass "
            "--reference-dit FILE_OR_MODULE (the upstream lens/transformer.py)."
        )
    return cls


def _state_dict(folder: Path):
    from safetensors.torch import load_file

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    state = {}
    for name in files:
        state.update(load_file(folder / name))
    return state


def load_dit(cls, folder: Path, dtype: str):
    """Build the reference from `config.json` and load the checkpoint strictly."""
    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    model = cls(**config)
    model.load_state_dict(_state_dict(folder), strict=True)
    return model.to(device=torch_device(), dtype=torch_dtype(dtype)).eval()


def _dit_output(out):
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def dit_forward(model, hidden_states, features: Sequence[np.ndarray], mask, timestep, img_shape, capture: bool = False):
    """One reference forward; with capture, also the (img, txt) streams after every block (forward hooks)."""
    torch = require("torch", "the Lens DiT reference")
    p = next(model.parameters())
    streams: list[tuple[np.ndarray, np.ndarray]] = []

    def hook(_module, _inputs, output):
        txt, img = output  # upstream blocks return (encoder_hidden_states, hidden_states)
        streams.append((to_numpy(img), to_numpy(txt)))

    hooks = [b.register_forward_hook(hook) for b in model.transformer_blocks] if capture else []

    def t(x, dtype=p.dtype):
        return torch.as_tensor(np.asarray(x)).to(p.device, dtype)

    try:
        with torch.no_grad():
            out = model(hidden_states=t(hidden_states), encoder_hidden_states=[t(f) for f in features],
                        encoder_hidden_states_mask=t(mask, torch.bool), timestep=t(timestep, torch.float32),
                        img_shapes=[(1, *img_shape)])
    finally:
        for h in hooks:
            h.remove()
    return _dit_output(out), streams


# ----------------------------------------------------------------------------- VAE and sampler


def load_vae(folder: Path, dtype: str):
    diffusers = require("diffusers", "the FLUX.2 VAE reference")
    require("torch", "the FLUX.2 VAE reference")
    cls = getattr(diffusers, "AutoencoderKLFlux2", None)
    if cls is None:
        raise Unavailable(f"diffusers {diffusers.__version__} has no AutoencoderKLFlux2; install diffusers >= 0.36.")
    return cls.from_pretrained(folder, torch_dtype=torch_dtype(dtype)).to(torch_device()).eval()


def decode_tokens(vae, tokens, h: int, w: int):
    """Lens' `_decode`: tokens [B, h*w, 4C] -> BN de-normalise -> unpatchify (c p1 p2) -> vae.decode."""
    torch = require("torch", "the FLUX.2 VAE reference")
    b, _, ch = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, ch, h, w).float()
    mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    x = x * std + mean
    c = ch // 4
    x = x.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
    with torch.no_grad():
        return vae.decode(x.to(next(vae.parameters()).dtype)).sample


def sample(dit, vae, scheduler_folder: Path, latents: np.ndarray, features: Sequence[np.ndarray], mask: np.ndarray,
           img_shape: tuple[int, int], steps: int, guidance: float, mu: float):
    """A small Euler loop like upstream's: [cond; uncond] batch, CFG with per-token norm rescale, decode.

    Returns (per-step latents [steps, B, h*w, C], image [B, H, W, 3] in [0, 1]).
    """
    torch = require("torch", "the PyTorch sampler")
    diffusers = require("diffusers", "the FlowMatchEulerDiscreteScheduler reference")
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(scheduler_folder)
    device = next(dit.parameters()).device
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / steps, steps)), mu=mu, device=device)
    x = torch.from_numpy(np.asarray(latents, np.float32)).to(device)
    use_cfg = guidance != 1.0
    trajectory = []
    for t in sched.timesteps:
        x_in = torch.cat([x, x]) if use_cfg else x
        sigma = (t / 1000).expand(x_in.shape[0]).float()
        v, _ = dit_forward(dit, x_in.cpu().numpy(), features, mask, sigma.cpu().numpy(), img_shape)
        v = v.float()
        if use_cfg:
            cond, uncond = v.chunk(2)
            comb = uncond + guidance * (cond - uncond)
            cond_norm = cond.norm(dim=-1, keepdim=True)
            comb_norm = comb.norm(dim=-1, keepdim=True)
            v = torch.where(comb_norm > 0, comb * (cond_norm / comb_norm.clamp_min(1e-12)), comb)
        x = sched.step(v, t, x, return_dict=False)[0]
        trajectory.append(to_numpy(x))
    image = decode_tokens(vae, x, *img_shape).float()
    image = ((image.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    return np.stack(trajectory), to_numpy(image)


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """Lens' empirical mu (kept here too so the reference does not lean on the port's scheduler)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m200 = a2 * image_seq_len + b2
    m10 = a1 * image_seq_len + b1
    a = (m200 - m10) / 190.0
    return float(a * steps + m200 - 200.0 * a)


__all__ = [
    "Unavailable", "require", "torch_device", "torch_dtype", "free", "load_text_encoder", "text_layers",
    "find_dit_class", "load_dit", "dit_forward", "load_vae", "decode_tokens", "sample", "empirical_mu",
]
