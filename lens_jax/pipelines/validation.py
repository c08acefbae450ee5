"""Checks of every generation argument, made before any weight is loaded or any step runs.

Each check returns the normalised value or raises `lens_jax.errors.InputError` with one line
naming the argument, what was given and what is accepted. `LensPipeline.__call__` and
`lens-jax generate` both call these, so the API and the command line answer alike.

Rules (documented in docs/reliability.md):
- steps: an integer >= 1 (None = the variant's default).
- guidance: a finite number >= 0. 1.0 switches classifier-free guidance off (one DiT pass per
  step, Lens-Turbo). 0 gives the unconditional prediction only (the prompt is ignored, rescaled to
  the conditional norm); between 0 and 1 the prompt is weakened; above 1 it is strengthened.
- seed: an integer in [0, 2**64 - 1]; image k of a call (prompt-major order) uses seed + k, so
  seed + (number of images) - 1 must also fit. The noise of each image depends only on its
  own seed: regenerating image k alone with seed + k reproduces it.
- prompt / negative prompt: a string or a non-empty list of strings.
- latents: finite numbers.
- output folder: a folder (or a path that can become one) that this user can write, with room
  for the images.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError

SEED_MAX = 2**64 - 1


def is_integer(x: Any) -> bool:
    """An integer proper: not a bool, not a float with an integral value."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_steps(steps: Any, name: str = "num_inference_steps") -> int | None:
    """None (use the default) or an integer >= 1."""
    if steps is None:
        return None
    if not is_integer(steps):
        raise InputError(f"{name} must be an integer >= 1; got {steps!r} ({type(steps).__name__}).")
    if steps < 1:
        raise InputError(f"{name} must be at least 1; got {steps}. Pass a positive number of denoising steps.")
    return int(steps)


def check_guidance(guidance: Any, name: str = "guidance_scale") -> float | None:
    """None (use the default) or a finite number >= 0 (1.0 = no classifier-free guidance)."""
    if guidance is None:
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise InputError(f"{name} must be a number >= 0; got {guidance!r} ({type(guidance).__name__}).")
    g = float(guidance)
    if not math.isfinite(g) or g < 0:
        raise InputError(f"{name} must be a finite number >= 0 (1.0 = no guidance, 0 = unconditional only); "
                         f"got {guidance}.")
    return g


def check_num_images(n: Any, name: str = "num_images_per_prompt") -> int:
    if not is_integer(n) or n < 1:
        raise InputError(f"{name} must be >= 1 (an integer); got {n!r}.")
    return int(n)


def check_seed(seed: Any, count: int = 1, name: str = "seed") -> int | None:
    """None (draw one) or an integer with seed + count - 1 <= 2**64 - 1 (image k uses seed + k)."""
    if seed is None:
        return None
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed.item()
    if not is_integer(seed):
        raise InputError(f"{name} must be an integer in [0, 2**64 - 1]; got {seed!r} ({type(seed).__name__}).")
    seed = int(seed)
    if seed < 0 or seed + count - 1 > SEED_MAX:
        raise InputError(f"{name} must be an integer in [0, 2**64 - 1] (image k uses {name} + k, here up to "
                         f"{name} + {count - 1}); got {seed}.")
    return seed


def check_lora_multiplier(multiplier: Any, name: str = "multiplier") -> float:
    """A finite real number (a NaN or infinite multiplier turns every adapted kernel into NaN)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or not math.isfinite(multiplier):
        raise InputError(f"LoRA {name} must be a finite number (1.0 = the adapter as trained); got {multiplier!r}.")
    return float(multiplier)


def check_prompts(prompt: Any, name: str = "prompt") -> list[str]:
    """A string or a non-empty list/tuple of strings -> list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InputError(f"{name} is an empty list; give at least one string.")
        bad = [p for p in prompt if not isinstance(p, str)]
        if not bad:
            return list(prompt)
        raise InputError(f"{name} must be a string or a list of strings; it holds {bad[0]!r} "
                         f"({type(bad[0]).__name__}).")
    raise InputError(f"{name} must be a string or a list of strings; got {prompt!r} ({type(prompt).__name__}).")


def check_negative(negative: Any, n_prompts: int, name: str = "negative_prompt") -> list[str]:
    """A string (for every prompt) or one string per prompt."""
    if negative is None:
        return [""] * n_prompts
    negatives = check_prompts(negative, name)
    if isinstance(negative, str):
        return negatives * n_prompts
    if len(negatives) != n_prompts:
        raise InputError(f"{name} has {len(negatives)} entries for {n_prompts} prompts; give one per prompt "
                         "(or a single string for all).")
    return negatives


def check_finite(array: Any, name: str = "latents") -> np.ndarray:
    """A float32 numpy array with only finite values."""
    try:
        a = np.asarray(array, np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be an array of numbers ({e}).") from None
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise InputError(f"{name} holds {bad} NaN/inf value(s); pass finite numbers (e.g. standard normal noise).")
    return a


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0, name: str = "--out") -> Path:
    """A folder that exists or can be created, that this user can write and with `need_bytes` free."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"{name} {out} is a file, not a folder; pass a folder (it is created if needed).")
    base = _existing_ancestor(out.absolute())
    if not base.is_dir():
        raise InputError(f"{name} {out} cannot be created: {base} is a file; pass a folder path.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{name} {out} is not writable ({base} is read-only for this user); "
                         "pass a folder you can write.")
    _probe_writable(out, name)
    if need_bytes:
        free = shutil.disk_usage(base).free
        if free < need_bytes:
            raise InputError(f"{name} {out}: {free / 2**20:.1f} MiB free, the images need about "
                             f"{need_bytes / 2**20:.1f} MiB; free some space or choose another folder.")
    return out


def _probe_writable(out: Path, name: str) -> None:
    """Create `out` and a file in it, then remove what was made. `os.access` answers yes to root even
    on a read-only mount or /sys, where the tool would otherwise fail only after all its work."""
    absolute = out.absolute()
    made = [p for p in (absolute, *absolute.parents) if not p.exists()]  # deepest first
    try:
        absolute.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=absolute):
            pass
    except OSError as e:
        raise InputError(f"{name} {out} is not writable ({e.strerror or e}); pass a folder you can write.") from None
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass


def png_bytes_bound(height: int, width: int, count: int) -> int:
    """An upper bound of the bytes `count` RGB PNGs of height x width take (uncompressed + slack)."""
    return count * (height * width * 3 + height + 64 * 1024)


def check_params_like(params: Any, reference: Any, name: str = "dit_params") -> None:
    """`params` must have `reference`'s tree (same keys, same leaf shapes): the compiled programs
    take either. Raises `InputError` naming the first path that differs."""
    import jax

    def path_str(path) -> str:
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path) or "(root)"

    ref = dict(jax.tree_util.tree_flatten_with_path(reference)[0])
    try:
        got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    except Exception as e:  # noqa: BLE001 - not a pytree at all
        raise InputError(f"{name} must be a parameter tree like the pipeline's dit_params; got {type(params).__name__} ({e}).") from None
    for path, leaf in ref.items():
        if path not in got:
            raise InputError(f"{name} lacks {path_str(path)} {tuple(np.shape(leaf))}: pass a tree with the "
                             "pipeline's structure (e.g. a modified copy of pipe.dit_params).")
        if np.shape(got[path]) != np.shape(leaf):
            raise InputError(f"{name}: {path_str(path)} has shape {tuple(np.shape(got[path]))}; this pipeline's DiT "
                             f"needs {tuple(np.shape(leaf))}.")
    extra = [path_str(p) for p in got if p not in ref]
    if extra:
        raise InputError(f"{name} has {extra[0]}, which this pipeline's DiT does not have"
                         f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}.")


def check_call(*, prompt: Any, negative_prompt: Any, num_inference_steps: Any, guidance_scale: Any,
               num_images_per_prompt: Any, seed: Any, latents: Any, prompt_embeds: Sequence[Any] | None) -> dict:
    """Every scalar/typed argument of `LensPipeline.__call__`, normalised (see the module rules)."""
    out: dict[str, Any] = {
        "num_inference_steps": check_steps(num_inference_steps),
        "guidance_scale": check_guidance(guidance_scale),
        "num_images_per_prompt": check_num_images(num_images_per_prompt),
    }
    if prompt_embeds is None:
        if prompt is None:
            raise InputError("give a prompt (or prompt_embeds with prompt_mask).")
        prompts = check_prompts(prompt)
        out["prompt"] = prompts
        out["negative_prompt"] = check_negative(negative_prompt, len(prompts))
        n_images = len(prompts) * out["num_images_per_prompt"]
    else:
        out["prompt"], out["negative_prompt"] = prompt, negative_prompt
        n_images = out["num_images_per_prompt"]
        try:
            n_images *= int(np.shape(prompt_embeds[0])[0])
        except (TypeError, IndexError):
            pass
    out["seed"] = check_seed(seed, n_images)
    out["latents"] = None if latents is None else check_finite(latents, "latents")
    return out
