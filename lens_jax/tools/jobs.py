"""One image per job, many jobs per sampler batch: the core shared by bulk generation and the server.

A job is one image: its prompt, negative prompt, seed, size, steps and guidance. Jobs with the same
`Bucket` (size, steps, guidance) run in one sampler call. Two rules make every image depend on its
own job only, so it can be regenerated alone, bit for bit:

- each image's initial noise is drawn from its own seed (`job_noise`), not one tensor per batch;
- a batch is always run at the same number of rows (`batch_size`), the missing rows filled with
  copies of the first job and thrown away. XLA may round differently for a different batch size,
  never (on the backends tested) for a different neighbour in the same row position or any other.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..pipelines import validation
from ..sampling.resolution import PIXELS_PER_TOKEN, resolve_size

MAX_SEED = validation.SEED_MAX  # 2**64 - 1, as `lens-jax generate --seed` and the pipeline take
RANDOM_SEED_MAX = 2**31 - 1  # drawn seeds stay small (exact in JavaScript, short in file names)


@dataclass(frozen=True)
class Bucket:
    """What decides the compiled program (and the guidance scalar, one per sampler call)."""

    height: int
    width: int
    steps: int
    guidance: float

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt: str
    seed: int
    height: int
    width: int
    steps: int
    guidance: float
    negative_prompt: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # LoRA set ((name, multiplier), ...) applied to the DiT; the runner resolves the names.
    loras: tuple[tuple[str, float], ...] = ()

    def __post_init__(self):  # lists (from JSON) -> a hashable tuple of (str, float) pairs
        object.__setattr__(self, "loras", tuple((str(n), float(m)) for n, m in self.loras))

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.height, self.width, self.steps, self.guidance)

    def settings(self) -> dict:
        """The settings that reproduce this image (for metadata); `loras` only when set."""
        d = asdict(self)
        d.pop("extra")
        if not self.loras:
            d.pop("loras")
        return d


def make_job(pipe_defaults: dict, prompt: str, *, seed: int | None = None, negative_prompt: str = "",
             height: int | None = None, width: int | None = None, aspect_ratio: str | None = None,
             base_resolution: int | None = None, steps: int | None = None, guidance: float | None = None,
             **extra: Any) -> Job:
    """A validated `Job`, defaults (steps, guidance) from `pipe_defaults`; raises InputError naming the field."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty string.")
    try:
        H, W = resolve_size(height, width, base_resolution, aspect_ratio)
    except ValueError as e:
        raise InputError(str(e)) from None
    # the same checks as the pipeline's: 2.7 steps, "abc", NaN or negative guidance never reach the sampler
    steps = validation.check_steps(steps, "steps")
    steps = int(pipe_defaults["num_inference_steps"] if steps is None else steps)
    guidance = validation.check_guidance(guidance, "guidance")
    guidance = float(pipe_defaults["guidance_scale"] if guidance is None else guidance)
    if seed is not None and not validation.is_integer(seed):
        raise InputError(f"seed must be an integer in [0, {MAX_SEED}]; got {seed!r} ({type(seed).__name__}).")
    seed = random.randrange(RANDOM_SEED_MAX) if seed is None else int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed={seed} must be in [0, {MAX_SEED}].")
    return Job(prompt, seed, H, W, steps, guidance, negative_prompt or "", dict(extra))


def job_noise(seed: int, height: int, width: int, channels: int) -> np.ndarray:
    """The packed initial noise [1, h*w, channels] of one image, from its seed alone."""
    import jax
    import jax.numpy as jnp

    from ..pipelines.text_to_image import seed_key  # all 64 bits; jax.random.key(seed) below 2**32

    tokens = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
    return np.asarray(jax.random.normal(seed_key(int(seed)), (1, tokens, channels), jnp.float32))


def group_by_bucket(jobs: Sequence[Job]) -> dict[Bucket, list[int]]:
    """Indices of `jobs` per bucket, buckets in order of first appearance, indices in order."""
    groups: dict[Bucket, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.bucket, []).append(i)
    return groups


def generate_batch(pipe, jobs: Sequence[Job], batch_size: int,
                   callback: Callable[[int, float, Any], None] | None = None, dit_params: Any = None) -> np.ndarray:
    """Images (float32 [len(jobs), H, W, 3] in [0, 1]) of up to `batch_size` jobs of one bucket.

    The sampler always runs `batch_size` rows (see the module docstring); `callback(step, t, latents)`
    is the pipeline's per-step callback. `dit_params` (e.g. with the jobs' LoRAs merged,
    `LensPipeline.lora_params`) replaces the pipeline's DiT parameters for this batch.
    """
    if not jobs:
        raise InputError("generate_batch needs at least one job.")
    if len(jobs) > batch_size:
        raise InputError(f"{len(jobs)} jobs do not fit a batch of {batch_size}; split them.")
    bucket = jobs[0].bucket
    if any(j.bucket != bucket for j in jobs):
        raise InputError("all jobs of a batch must share one bucket (size, steps, guidance).")
    if any(j.loras != jobs[0].loras for j in jobs):
        raise InputError("all jobs of a batch must share one LoRA set.")
    if jobs[0].loras and dit_params is None:
        raise InputError("jobs with LoRAs need dit_params with them merged (LensPipeline.lora_params).")
    extra = {} if dit_params is None else {"dit_params": dit_params}
    rows = list(jobs) + [jobs[0]] * (batch_size - len(jobs))
    channels = pipe.dit_config.in_channels
    latents = np.concatenate([job_noise(j.seed, j.height, j.width, channels) for j in rows])
    out = pipe(
        [j.prompt for j in rows], negative_prompt=[j.negative_prompt for j in rows],
        height=bucket.height, width=bucket.width, num_inference_steps=bucket.steps,
        guidance_scale=bucket.guidance, latents=latents, output_type="np", callback=callback, **extra,
    )
    return np.asarray(out.images[: len(jobs)])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8, rounded as LensPipeline's PIL output."""
    return np.round(np.asarray(image) * 255.0).clip(0, 255).astype(np.uint8)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(f)` into a hidden file of our own beside `path`, renamed to `path` only when complete and
    removed on any failure. O_EXCL, so two runs never share it; created with the umask's permissions
    (mkstemp's would be 0600, unreadable to the group and a web server)."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.part"
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def to_png_bytes(image: np.ndarray, metadata: dict | None = None) -> bytes:
    """A PNG of one float image, with `metadata` as text chunks (and all of it as JSON in 'parameters')."""
    import io
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, str(v))
    if metadata:
        info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
