"""`lens-jax generate`: images from prompts, written as PNGs with their settings in the metadata."""

from __future__ import annotations

import argparse  # noqa: F401
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from . import bulk
from .runtime import enable_compilation_cache

TINY_RANDOM = "tiny-random"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images with Lens. `--model tiny-random` runs offline on a tiny random model.")
    p.add_argument("--prompt", action="append", help="the prompt (repeat for several prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder, hub id, or '{TINY_RANDOM}' (default: the variant's hub id)")
    p.add_argument("--variant", default="lens", choices=["lens", "lens-base", "lens-turbo"],
                   help="sampling defaults of a published variant (steps, guidance)")
    p.add_argument("--aspect-ratio", default=None, help="e.g. 1:1, 16:9, 9:16, 4:3 ... (default 1:1)")
    p.add_argument("--base-resolution", type=int, default=None, choices=[1024, 1440])
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (with --width)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (with --height)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the variant's; 1.0 = no CFG)")
    p.add_argument("--seed", type=int, default=None, help="noise seed (jax.random; default: random, recorded in the PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"], help="default: bf16 on GPU/TPU, f32 on CPU")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                   help="quantise the DiT: int8 weight-only or fp8 (e4m3 weights and activations; H100)")
    p.add_argument("--out", default="outputs", help="output folder (created if needed)")
    p.add_argument("--offload", default="none", choices=["none", "text_encoder", "all", "auto"],
                   help="stream layers from host memory: the text encoder's, or the DiT's too (small GPUs)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:MULT]",
                   help="a LoRA (diffusers/PEFT, kohya or ComfyUI safetensors) merged at multiplier MULT "
                        "(default 1.0); repeat to stack several")
    bulk.add_arguments(p)
    g = p.add_argument_group("image-to-image / inpainting (docs/img2img.md)")
    g.add_argument("--image", default=None, help="start from this image (fitted to the closest bucket)")
    g.add_argument("--strength", type=float, default=None,
                   help="with --image: how much to change it, in (0, 1] (default 0.4, with --mask 1.0; 1 = pure noise)")
    g.add_argument("--mask", default=None, help="with --image: inpainting mask, white = repaint, black = keep")
    r = p.add_argument_group("prompt reasoner (docs/reasoner.md)")
    r.add_argument("--reasoner", action="store_true", help="rewrite the prompt with GPT-OSS before generating")
    r.add_argument("--reasoner-system-prompt", default=None, metavar="FILE", help="replace the reasoner's rules")
    r.add_argument("--api-url", default=None, help="OpenAI-compatible endpoint for the reasoner instead of local GPT-OSS")
    r.add_argument("--api-key", default=None, help="its key (default: $LENS_REASONER_API_KEY or $OPENAI_API_KEY)")
    r.add_argument("--api-model", default=None, help="the model name the endpoint serves")
    r.add_argument("--api-timeout", type=float, default=None, help="seconds per request (default 120)")


def _load_pipeline(args):
    from lens_jax.pipelines.text_to_image import LensPipeline, load_preset

    if args.model == TINY_RANDOM:
        print("note: --model tiny-random uses a tiny randomly initialised model; its picture is noise.",
              file=sys.stderr)
        pipe = LensPipeline.tiny_random(seed=0, dtype=args.dtype or "f32", offload=args.offload,
                                        quantize=args.quantize)
        pipe.defaults.update({k: load_preset(args.variant)[k] for k in ("num_inference_steps", "guidance_scale")})
        return pipe, TINY_RANDOM
    model = args.model or load_preset(args.variant)["repo_id"]
    return LensPipeline.from_pretrained(model, dtype=args.dtype, variant=args.variant, offload=args.offload,
                                        quantize=args.quantize), model


def parse_lora_arg(spec: str) -> tuple[str, float]:
    """'FILE[:MULT]' -> (FILE, MULT); a ':' that is not followed by a number belongs to the path."""
    from lens_jax.errors import InputError

    path, sep, mult = spec.rpartition(":")
    if sep:
        try:
            return path, float(mult)
        except ValueError:
            pass
    if not spec:
        raise InputError("--lora needs a file: --lora FILE[:MULT], e.g. --lora style.safetensors:0.8.")
    return spec, 1.0


def _save_png(image, path: Path, metadata: dict) -> None:
    """Write atomically: a temporary file beside `path`, renamed when complete."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, str(v))
    info.add_text("parameters", json.dumps(metadata))
    fd, tmp = tempfile.mkstemp(suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_extras(args) -> tuple[dict, dict]:
    """Validate the image-to-image and reasoner flags before loading anything."""
    from lens_jax.errors import InputError
    from lens_jax.pipelines import img2img, reasoner

    image_kwargs = {}
    if args.image is None:
        if args.mask is not None or args.strength is not None:
            raise InputError("--mask and --strength need --image.")
    else:
        default = 1.0 if args.mask is not None else 0.4
        strength = img2img.check_strength(default if args.strength is None else args.strength)
        image_kwargs = {"image": img2img.load_image(args.image), "strength": strength}
        if args.mask is not None:
            image_kwargs["mask_image"] = img2img.load_mask(args.mask)
    options = {}
    if not args.reasoner:
        if any(v is not None for v in (args.reasoner_system_prompt, args.api_url, args.api_model, args.api_key)):
            raise InputError("--reasoner-system-prompt / --api-url / --api-key / --api-model need --reasoner.")
    else:
        options = {"system_prompt": reasoner.load_system_prompt(args.reasoner_system_prompt), "api_url": args.api_url,
                   "api_key": args.api_key, "api_model": args.api_model, "api_timeout": args.api_timeout}
        if args.api_url or args.api_model:
            reasoner.make_reasoner(lambda: None, None, **{k: v for k, v in options.items() if v is not None})
    return image_kwargs, options


def run(args) -> int:
    from tqdm.auto import tqdm

    from lens_jax.sampling.resolution import resolve_size

    if args.prompts:
        return bulk.run_cli(args)
    if not args.prompt:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE.")
    # Validate cheap arguments before loading anything.
    height, width = resolve_size(args.height, args.width, args.base_resolution, args.aspect_ratio)
    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1.")
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    loras = [parse_lora_arg(s) for s in getattr(args, "lora", [])]
    for path, _ in loras:
        if not Path(path).is_file():
            from lens_jax.errors import InputError

            raise InputError(f"--lora {path}: no such file; pass a LoRA .safetensors file, optionally FILE:MULT.")
    image_kwargs, reasoner_options = _check_extras(args)
    enable_compilation_cache()
    pipe, model = _load_pipeline(args)
    for path, mult in loras:
        pipe.load_lora(path, mult)
    if args.reasoner:
        pipe.configure_reasoner(**reasoner_options)
    steps = args.steps or pipe.defaults["num_inference_steps"]
    guidance = pipe.defaults["guidance_scale"] if args.guidance is None else args.guidance

    bar = tqdm(total=steps, desc="denoising", unit="step")
    t0 = time.perf_counter()
    out = pipe(
        args.prompt, negative_prompt=args.negative_prompt, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance, num_images_per_prompt=args.num_images, seed=seed,
        callback=lambda step, t, latents: bar.update(1), enable_reasoner=args.reasoner, **image_kwargs,
    )
    bar.close()
    elapsed = time.perf_counter() - t0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, image in enumerate(out.images):
        prompt = args.prompt[i // args.num_images]
        meta = {
            "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": seed, "image_index": i,
            "steps": steps, "guidance": guidance, "model": model, "variant": args.variant,
            "height": height, "width": width, "software": "lens-jax",
        }
        if loras:
            meta["loras"] = [{"file": f, "multiplier": m} for f, m in loras]
        if args.reasoner:
            meta["reasoner_prompt"] = out.prompts[i // args.num_images]
        if args.image:
            meta.update(image=str(args.image), strength=image_kwargs["strength"])
            if args.mask:
                meta["mask"] = str(args.mask)
        path = out_dir / f"lens-{stamp}-seed{seed}-{i}.png"
        _save_png(image, path, meta)
        print(path)
    print(f"{len(out.images)} image(s) in {elapsed:.1f} s", file=sys.stderr)
    return 0
