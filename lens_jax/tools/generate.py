"""`lens-jax generate`: images from prompts, written as PNGs with their settings in the metadata."""

from __future__ import annotations

import argparse  # noqa: F401
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

from lens_jax.errors import InputError
from lens_jax.pipelines import validation

from . import bulk, jobs
from .runtime import enable_compilation_cache, quiet_third_party

TINY_RANDOM = "tiny-random"
NO_MODEL = (
    "no --model given: pass a Lens checkpoint folder (diffusers layout or a `lens-jax convert` output) or a hub id "
    "of a copy (`hf download OWNER/NAME --local-dir DIR`; the microsoft/Lens repos were withdrawn), or "
    "--model tiny-random to try offline."
)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images with Lens. `--model tiny-random` runs offline on a tiny random model.")
    p.add_argument("--prompt", action="append", help="the prompt (repeat for several prompts)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default: none)")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder, hub id, or '{TINY_RANDOM}' (required: there is no public default)")
    p.add_argument("--variant", default="lens", choices=["lens", "lens-base", "lens-turbo"],
                   help="sampling defaults of a published variant (steps, guidance)")
    p.add_argument("--aspect-ratio", default=None, help="e.g. 1:1, 16:9, 9:16, 4:3 ... (default 1:1)")
    p.add_argument("--base-resolution", type=int, default=None, choices=[1024, 1440])
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (with --width)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (with --height)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the variant's; 1.0 = no CFG)")
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed in [0, 2**64-1]; image k uses seed + k (default: random; recorded in each PNG)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--dtype", default=None, choices=["bf16", "f32"], help="default: bf16 on GPU/TPU, f32 on CPU")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                   help="quantise the DiT: int8 weight-only or fp8 (e4m3 weights and activations; H100)")
    p.add_argument("--out", default="outputs", help="output folder (created if needed)")
    p.add_argument("--offload", default="none", choices=["none", "text_encoder", "all", "auto"],
                   help="stream layers from host memory (small GPUs): the text encoder's (and the DiT's modulation "
                        "kernels, read once per image), or the DiT's blocks too")
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
    p.add_argument("--from-png", metavar="FILE", default=None,
                   help="regenerate the image FILE was made from its metadata (other flags override)")


def _load_pipeline(args):
    from lens_jax.pipelines.text_to_image import LensPipeline, load_preset

    if args.model == TINY_RANDOM:
        print("note: --model tiny-random uses a tiny randomly initialised model; its picture is noise.",
              file=sys.stderr)
        pipe = LensPipeline.tiny_random(seed=0, dtype=args.dtype or "f32", offload=args.offload,
                                        quantize=args.quantize)
        pipe.defaults.update({k: load_preset(args.variant)[k] for k in ("num_inference_steps", "guidance_scale")})
        return pipe, TINY_RANDOM
    model = args.model
    return LensPipeline.from_pretrained(model, dtype=args.dtype, variant=args.variant, offload=args.offload,
                                        quantize=args.quantize), model


def parse_lora_arg(spec: str) -> tuple[str, float]:
    """'FILE[:MULT]' -> (FILE, MULT); a ':' that is not followed by a number belongs to the path."""
    from lens_jax.errors import InputError

    path, sep, mult = spec.rpartition(":")
    if sep:
        try:
            value = float(mult)
        except ValueError:
            value = None  # not a number: the ':' is part of the path
        if value is not None:
            return path, validation.check_lora_multiplier(value, f"multiplier in --lora {spec}")
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
    jobs.write_atomically(path, lambda f: image.save(f, format="PNG", pnginfo=info))


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


def read_png_settings(path: str | os.PathLike) -> dict:
    """The generation settings a `lens-jax generate` PNG records (its "parameters" text chunk)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}))
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError) as e:
        raise InputError(f"--from-png {path}: not a readable PNG ({type(e).__name__}); pass a PNG that "
                         "`lens-jax generate` wrote.") from None
    try:
        meta = json.loads(text["parameters"])
        if not isinstance(meta, dict) or "prompt" not in meta:
            raise ValueError
    except (KeyError, ValueError):
        raise InputError(f"--from-png {path}: it has no lens-jax generation metadata; pass a PNG that "
                         "`lens-jax generate` wrote.") from None
    return meta


def _apply_png(args, meta: dict) -> None:
    """Fill every flag the user did not give from a PNG's metadata (batch layout included, for bit-exactness)."""
    sampler = meta.get("sampler", {})
    filled = {
        "prompt": [meta["prompt"]], "negative_prompt": meta.get("negative_prompt", ""),
        "model": meta.get("model"), "variant": meta.get("variant"), "dtype": meta.get("dtype"),
        "height": meta.get("height"), "width": meta.get("width"),
        "steps": sampler.get("steps", meta.get("steps")), "guidance": sampler.get("guidance", meta.get("guidance")),
    }
    for k, v in filled.items():
        if getattr(args, k, None) in (None, "", "lens") and v is not None:
            setattr(args, k, v)
    if args.seed is None:
        # Same batch size and row as the original: XLA's summation order depends on the shapes.
        args.seed = int(meta.get("batch_seed", meta["seed"]))
        args.num_images = int(meta.get("batch_size", 1))
        args.only_index = int(meta.get("image_index", 0)) if "batch_seed" in meta else 0
        args.min_text_length = meta.get("text_tokens")


def check_args(args) -> tuple[int, int]:
    """Every flag of `generate`, before anything is loaded. Returns (height, width)."""
    from lens_jax.sampling.resolution import resolve_size

    bulk_only = [flag for attr, flag, unset in ONLY_IN_BULK if getattr(args, attr, unset) != unset]
    if bulk_only:
        raise InputError(f"{', '.join(bulk_only)} apply to bulk generation only (--prompts FILE); drop them, or "
                         "put the prompts in a file.")
    if args.from_png is not None:
        _apply_png(args, read_png_settings(args.from_png))
    if not args.prompt:
        raise InputError("give --prompt TEXT (or --from-png FILE to regenerate an image).")
    if args.model is None:
        raise InputError(NO_MODEL)
    if args.variant not in ("lens", "lens-base", "lens-turbo"):
        raise InputError(f"--variant {args.variant!r} is unknown; choose lens, lens-base or lens-turbo.")
    if args.dtype not in (None, "bf16", "f32"):
        raise InputError(f"--dtype {args.dtype!r} is unknown; choose bf16 or f32.")
    validation.check_prompts(args.prompt, "--prompt")
    validation.check_steps(args.steps, "--steps")
    validation.check_guidance(args.guidance, "--guidance")
    validation.check_num_images(args.num_images, "--num-images")
    validation.check_seed(args.seed, len(args.prompt) * args.num_images, "--seed")
    try:
        height, width = resolve_size(args.height, args.width, args.base_resolution, args.aspect_ratio)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(str(e)) from None
    count = len(args.prompt) * (1 if getattr(args, "only_index", None) is not None else args.num_images)
    validation.check_output_dir(args.out, validation.png_bytes_bound(height, width, count))
    return height, width


# flags of a single generation that `--prompts` (bulk) does not take: (attribute, flag, value when not given)
NOT_IN_BULK = (("prompt", "--prompt", None), ("from_png", "--from-png", None), ("image", "--image", None),
               ("mask", "--mask", None), ("strength", "--strength", None), ("reasoner", "--reasoner", False),
               ("lora", "--lora", []), ("num_images", "--num-images", 1))
# and the flags only bulk generation takes
ONLY_IN_BULK = (("batch_size", "--batch-size", None), ("data", "--data", None), ("fsdp", "--fsdp", None),
                ("tensor", "--tensor", 1))


def check_bulk_args(args) -> None:
    """The flags of `generate --prompts FILE`, before anything is loaded (the lines: `bulk.read_prompt_file`)."""
    unused = [flag for attr, flag, unset in NOT_IN_BULK if getattr(args, attr, unset) != unset]
    if unused:
        raise InputError(f"{', '.join(unused)} cannot be combined with --prompts (bulk generation: one image per "
                         "line of the file); drop them, or run without --prompts.")
    if args.model is None:
        raise InputError(NO_MODEL)
    validation.check_steps(args.steps, "--steps")
    validation.check_guidance(args.guidance, "--guidance")
    validation.check_seed(args.seed, 1, "--seed")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1; got {args.batch_size}.")
    validation.check_output_dir(args.out)


def run(args) -> int:
    from tqdm.auto import tqdm

    from lens_jax import __version__

    if args.prompts:
        check_bulk_args(args)  # before anything is loaded, like check_args
        return bulk.run_cli(args)
    quiet_third_party()
    height, width = check_args(args)  # every flag checked before anything is loaded
    only = getattr(args, "only_index", None)
    n_images = len(args.prompt) * args.num_images
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    loras = [parse_lora_arg(s) for s in getattr(args, "lora", [])]
    for path, _ in loras:
        if not Path(path).is_file():
            from lens_jax.errors import InputError

            raise InputError(f"--lora {path}: no such file; pass a LoRA .safetensors file, optionally FILE:MULT.")
    image_kwargs, reasoner_options = _check_extras(args)
    enable_compilation_cache()
    done = {"steps": 0}
    steps = None
    try:
        pipe, model = _load_pipeline(args)
        for path, mult in loras:
            pipe.load_lora(path, mult)
        if args.reasoner:
            pipe.configure_reasoner(**reasoner_options)
        steps = args.steps or pipe.defaults["num_inference_steps"]
        guidance = pipe.defaults["guidance_scale"] if args.guidance is None else args.guidance

        bar = tqdm(total=steps, desc="denoising", unit="step")

        def progress(step, t, latents):
            latents.block_until_ready()  # so the bar is honest and Ctrl-C lands at this step boundary
            done["steps"] = step + 1
            bar.update(1)

        t0 = time.perf_counter()
        out = pipe(
            args.prompt, negative_prompt=args.negative_prompt, height=height, width=width, num_inference_steps=steps,
            guidance_scale=guidance, num_images_per_prompt=args.num_images, seed=seed, callback=progress,
            min_text_length=getattr(args, "min_text_length", None), enable_reasoner=args.reasoner, **image_kwargs,
        )
        bar.close()
        elapsed = time.perf_counter() - t0
    except KeyboardInterrupt:
        where = f" after step {done['steps']}/{steps}" if steps else " while loading"
        print(f"lens-jax: interrupted{where}; no image was written.", file=sys.stderr)
        return 130
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    written = 0
    try:
        for i, image in enumerate(out.images):
            if only is not None and i != only:
                continue
            prompt = args.prompt[i // args.num_images]
            meta = {
                "prompt": prompt, "negative_prompt": args.negative_prompt, "seed": out.seeds[i], "image_index": i,
                "batch_seed": seed, "batch_size": n_images, "text_tokens": int(out.text_mask.shape[1]),
                "steps": steps, "guidance": guidance, "model": model, "variant": args.variant,
                "height": height, "width": width, "software": "lens-jax", "lens_jax_version": __version__,
                "dtype": "f32" if str(pipe.dtype) == "float32" else "bf16",
                "sampler": {"name": "flow-matching Euler", "steps": steps, "guidance": guidance,
                            "scheduler": dataclasses.asdict(pipe.scheduler_config)},
                "lora": [{"file": f, "multiplier": m} for f, m in loras] or None,
            }
            if args.reasoner:
                meta["reasoner_prompt"] = out.prompts[i // args.num_images]
            if args.image:
                meta.update(image=str(args.image), strength=image_kwargs["strength"])
                if args.mask:
                    meta["mask"] = str(args.mask)
            path = out_dir / f"lens-{stamp}-seed{out.seeds[i]}-{i}.png"
            _save_png(image, path, meta)
            written += 1
            print(path, flush=True)
    except KeyboardInterrupt:
        print(f"lens-jax: interrupted while writing; {written} of {len(out.images)} image(s) kept.", file=sys.stderr)
        return 130
    print(f"{written} image(s) in {elapsed:.1f} s", file=sys.stderr)
    return 0
