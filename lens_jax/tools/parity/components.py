"""One runner per component: the same inputs through lens-jax and the PyTorch reference, compared.

Each runner returns a section (a JSON-ready dict): `records` (one `metrics.compare` record per
layer / step / output), `headline` (the record a user reads first), `tolerance`, and, where
there are layers, `first_jump` (the first layer whose error leaves the rounding noise). Ours runs
first and is freed before the reference is loaded, so only one network is resident at a time.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ...errors import LensError
from ...models import text_encoder as te_model
from ...models import transformer as dit
from ...models.nn import dense
from ...pipelines import prompt as prompt_lib
from . import metrics
from . import reference as ref_lib

COMPONENTS = ("text_encoder", "transformer", "vae", "pipeline")
DEFAULT_SIGMAS = (0.97, 0.5, 0.031)


@dataclass(frozen=True)
class Options:
    """What `lens-jax parity` runs: checkpoint root, dtype ('f32' | 'bf16'), inputs and the DiT reference."""

    model: Path
    dtype: str = "f32"
    size: tuple[int, int] = (512, 512)
    prompt: str = "A red cube on a wooden table next to a small green plant."
    seed: int = 0
    reference_dit: str | None = None
    steps: int = 4
    guidance: float = 4.0
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    dit_inputs: tuple | None = field(default=None, compare=False)  # (x, features, mask, sigmas, (h, w))
    latents: np.ndarray | None = field(default=None, compare=False)  # initial noise [1, h*w, C] of the e2e run
    images: dict = field(default_factory=dict, compare=False)  # name -> (ours, ref) images for the report
    arrays: dict = field(default_factory=dict, compare=False)  # name -> (ours, ref) compared outputs (small ones)

    @property
    def jnp_dtype(self):
        return jnp.float32 if self.dtype == "f32" else jnp.bfloat16

    @property
    def tokens_hw(self) -> tuple[int, int]:
        return self.size[0] // 16, self.size[1] // 16


def _tol(kind: str, opts: Options) -> metrics.Tolerance:
    return metrics.tolerance_for(kind, opts.dtype)


def jump_statistic(rec: dict, tol: metrics.Tolerance) -> tuple[float, float]:
    """(error, threshold) for first-jump detection, in the measure the tolerance bounds."""
    if tol.atol or tol.rel:
        return rec["max_abs"], tol.bound(rec["ref_scale"])
    return 1.0 - rec["cosine"], 1.0 - float(tol.min_cosine)


def locate_jump(layer_records: list[list[dict]], names: list[str], tol: metrics.Tolerance) -> dict | None:
    """The first layer (its name) where any of its records leaves the noise, by `metrics.first_jump`."""
    ratios = []
    for recs in layer_records:
        ratios.append(max(err / thr if thr > 0 else (0.0 if err == 0 else np.inf)
                          for err, thr in (jump_statistic(r, tol) for r in recs)))
    index = metrics.first_jump(ratios, tol=1.0)
    if index is None:
        return None
    return {"index": index, "layer": names[index], "error_over_bound": float(ratios[index])}


def _after(jump: dict | None, index: int) -> dict | None:
    """A jump found in what follows the layers (the output head, the decode), placed after them."""
    return None if jump is None else {**jump, "index": index}


def largest_growth(layer_records: list[list[dict]], names: list[str]) -> dict | None:
    """The layer whose max rel-to-scale error grows most over the layer before it (for trained weights,
    where every layer sits above the float32 noise in bf16)."""
    errs = [max(r["max_rel"] for r in recs) for recs in layer_records]
    index = metrics.largest_jump(errs)
    if index is None or len(errs) < 2:
        return None
    growth = errs[index] / max(errs[index - 1], 1e-30) if index else 1.0
    if growth <= 1.0:
        return None
    return {"index": index, "layer": names[index], "growth": float(growth)}


def _section(records, headline, tol, **extra) -> dict:
    return {"status": "ok", "records": records, "headline": headline, "tolerance": metrics.tolerance_dict(tol),
            "tolerance_text": tol.describe(), "passed": all(r.get("passed", True) for r in records), **extra}


# ----------------------------------------------------------------------------- text encoder


def _tokens(opts: Options):
    tokenizer = prompt_lib.load_tokenizer(opts.model / "tokenizer")
    return prompt_lib.tokenize_prompts(tokenizer, [opts.prompt])


def _selected_layers(opts: Options) -> tuple[int, ...]:
    cfg = json.loads((opts.model / "transformer" / "config.json").read_text())
    return tuple(cfg.get("selected_layer_index", dit.TransformerConfig().selected_layer_index))


def run_text_encoder(opts: Options) -> dict:
    """Every decoder layer's hidden states, then the four features the DiT reads (sliced at txt_offset)."""
    from ...weights import text_encoder as te_mod

    ref_lib.require("torch", "the GPT-OSS reference")
    ref_lib.require("transformers", "the GPT-OSS reference")
    folder = opts.model / "text_encoder"
    tokens = _tokens(opts)
    n_layers = te_model.TextEncoderConfig.from_json(folder / "config.json").num_hidden_layers
    te = te_mod.load(folder, selected_layers=tuple(range(n_layers)), dtype=opts.jnp_dtype)
    ours = [np.asarray(h.astype(jnp.float32)) for h in te(tokens.input_ids, tokens.attention_mask)]
    del te
    ref_lib.free()
    model = ref_lib.load_text_encoder(folder, opts.dtype)
    theirs = ref_lib.text_layers(model, tokens.input_ids, tokens.attention_mask)
    ref_lib.free(model)
    del model
    ref_lib.free()

    opts.arrays["text_encoder"] = (ours, theirs)
    tol = _tol("text_encoder", opts)
    layers = [metrics.compare(o, r, f"layer {i}", tolerance=tol) for i, (o, r) in enumerate(zip(ours, theirs))]
    offset = prompt_lib.read_txt_offset(opts.model)
    valid = tokens.attention_mask[0, offset:].astype(bool)
    features = [
        metrics.compare(ours[i][:, offset:][:, valid], theirs[i][:, offset:][:, valid], f"feature {k} (layer {i})",
                        tolerance=tol)
        for k, i in enumerate(_selected_layers(opts)) if i < len(ours)
    ]
    headline = min(features or layers, key=lambda r: r["cosine"])
    return _section(layers + features, headline, tol, layers=len(layers),
                    first_jump=locate_jump([[r] for r in layers], [r["name"] for r in layers], tol),
                    largest_growth=largest_growth([[r] for r in layers], [r["name"] for r in layers]),
                    tokens=int(tokens.input_ids.shape[1]))


# ----------------------------------------------------------------------------- DiT


def _dit_inputs(config: dit.TransformerConfig, opts: Options):
    """Seeded inputs: one latent, text features of realistic spread, a mask with padding, several sigmas."""
    rng = np.random.default_rng(opts.seed)
    h, w = opts.tokens_hw
    n = len(opts.sigmas)
    text_len = 32
    latent = rng.standard_normal((1, h * w, config.in_channels)).astype(np.float32)
    feats = [np.repeat(rng.standard_normal((1, text_len, config.enc_hidden_dim)).astype(np.float32) * s, n, 0)
             for s in (1.0, 3.0, 10.0, 30.0)[: config.num_text_layers]]
    feats += [feats[-1]] * (config.num_text_layers - len(feats))
    mask = np.repeat((np.arange(text_len) < 3 * text_len // 4)[None], n, 0)
    return np.repeat(latent, n, 0), feats, mask, np.asarray(opts.sigmas, np.float32), (h, w)


def our_dit_streams(tr, x, feats, mask, sigma, img_shape):
    """Our (img, txt) streams after every block, by running `block` one at a time over the stacked params."""
    p, c = tr.params, tr.config
    dtype = p["img_in"]["kernel"].dtype
    h, w = img_shape
    rope = jax.tree.map(jnp.asarray, dit.rope_tables(c, h, w, feats[0].shape[1]))
    img = dense(jnp.asarray(x).astype(dtype), p["img_in"])
    txt = dit.embed_text(p, [jnp.asarray(f) for f in feats], dtype)
    temb_act = jax.nn.silu(dit.timestep_embedding(p, jnp.asarray(sigma), dtype))
    text_mask = jnp.asarray(mask, bool)
    key_mask = jnp.concatenate([jnp.ones((img.shape[0], img.shape[1]), bool), text_mask], axis=1)
    key_lengths = img.shape[1] + jnp.sum(text_mask, axis=1, dtype=jnp.int32)
    impl = tr.attention_impl if tr.attention_impl is not None else dit.default_attention_impl(dtype)
    step = jax.jit(dit.block, static_argnums=(1, 8))
    streams = []
    for i in range(c.num_layers):
        bp = jax.tree.map(lambda a: a[i], p["transformer_blocks"])
        img, txt = step(bp, c, img, txt, temb_act, rope, key_mask, key_lengths, impl)
        streams.append((np.asarray(img.astype(jnp.float32)), np.asarray(txt.astype(jnp.float32))))
    return streams


def run_transformer(opts: Options) -> dict:
    """Image and text streams after every block and the output, per timestep (one batch row per sigma).

    `opts.dit_inputs` = (hidden_states, features, mask, sigmas, (h, w)) replaces the seeded inputs.
    """
    from ...weights import dit as tr_mod

    cls = ref_lib.find_dit_class(opts.reference_dit)
    folder = opts.model / "transformer"
    tr = tr_mod.load(folder, dtype=opts.jnp_dtype)
    x, feats, mask, sigma, hw = opts.dit_inputs if opts.dit_inputs is not None else _dit_inputs(tr.config, opts)
    # lens-jax embeds the timestep from float32 sigma; upstream first casts it to the compute dtype
    # (`timestep.to(hidden_states.dtype)`: in bf16 sigma 0.97 becomes 0.96875). In bf16 ours also runs
    # with the rounded sigmas, and the comparison uses the convention the reference turns out to follow.
    variants = {"float32": np.asarray(sigma, np.float32)}
    rounded = np.asarray(jnp.asarray(sigma, jnp.float32).astype(opts.jnp_dtype).astype(jnp.float32))
    if opts.dtype != "f32" and not np.array_equal(rounded, variants["float32"]):
        variants[opts.dtype] = rounded
    ours_runs = {k: (np.asarray(tr(x, feats, mask, s, [(1, *hw)]).astype(jnp.float32)),
                     our_dit_streams(tr, x, feats, mask, s, hw)) for k, s in variants.items()}
    n_layers = tr.config.num_layers
    del tr
    ref_lib.free()
    model = ref_lib.load_dit(cls, folder, opts.dtype)
    out, theirs_streams = ref_lib.dit_forward(model, x, feats, mask, sigma, hw, capture=True)
    their_out = ref_lib.to_numpy(out)
    del model, out
    ref_lib.free()
    if len(theirs_streams) != n_layers:
        raise ref_lib.Unavailable(f"the reference ran {len(theirs_streams)} blocks, ours {n_layers}; "
                                  "is --reference-dit the Lens DiT?")
    convention = min(ours_runs, key=lambda k: metrics.max_abs(ours_runs[k][0], their_out))
    ours_out, ours_streams = ours_runs[convention]

    opts.arrays["transformer"] = (ours_out, their_out)
    tol_block, tol_out = _tol("transformer_block", opts), _tol("transformer", opts)
    records, per_layer = [], []
    for i, ((oi, ot), (ri, rt)) in enumerate(zip(ours_streams, theirs_streams)):
        layer = []
        for k, s in enumerate(sigma):
            for stream, o, r in (("img", oi, ri), ("txt", ot, rt)):
                rec = metrics.compare(o[k], r[k], f"block {i} {stream} @ sigma {s:g}", tolerance=tol_block)
                rec.update(block=i, stream=stream, sigma=float(s))
                layer.append(rec)
        records += layer
        per_layer.append(layer)
    outputs = []
    for k, s in enumerate(sigma):
        rec = metrics.compare(ours_out[k], their_out[k], f"output @ sigma {s:g}", tolerance=tol_out)
        rec.update(sigma=float(s))
        outputs.append(rec)
    headline = max(outputs, key=lambda r: r["max_abs"])
    info, note = [], None
    if convention != "float32":  # what lens-jax's own float32 timestep changes (no bound: a known difference)
        for k, s in enumerate(sigma):
            rec = metrics.compare(ours_runs["float32"][0][k], their_out[k], f"output @ sigma {s:g}, lens-jax's float32 timestep")
            rec.update(sigma=float(s), info=True)
            info.append(rec)
        note = (f"the reference rounds the timestep to {convention} before embedding it (upstream's "
                "`timestep.to(hidden_states.dtype)`); lens-jax keeps it in float32. Compared here at the reference's "
                "rounding; the rows marked 'info' show what that difference alone does.")
    names = [f"block {i}" for i in range(n_layers)]
    # every block within bound but the output not: the difference enters after the last block
    jump = locate_jump(per_layer, names, tol_block) or _after(
        locate_jump([outputs], ["output head (norm_out, proj_out)"], tol_out), n_layers)
    section = _section(records + outputs + info, headline, tol_out, layers=n_layers, sigmas=[float(s) for s in sigma],
                       first_jump=jump, largest_growth=largest_growth(per_layer, names), timestep=convention,
                       **({"note": note} if note else {}))
    section["tolerance_text"] = f"blocks {tol_block.describe()}; output {tol_out.describe()}"
    return section


# ----------------------------------------------------------------------------- VAE


def _test_image(height: int, width: int) -> np.ndarray:
    """A smooth colour pattern in [-1, 1] ([1, 3, H, W])."""
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    img = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx * yy) + 1)])
    return (0.9 * img)[None].astype(np.float32)


def run_vae(opts: Options) -> dict:
    """encode (latent mode) of a test image and decode of a random latent; PSNR on the [-1, 1] range."""
    from ...weights import vae as vae_mod

    torch = ref_lib.require("torch", "the FLUX.2 VAE reference")
    ref_lib.require("diffusers", "the FLUX.2 VAE reference")
    folder = opts.model / "vae"
    H, W = opts.size
    image = _test_image(H, W)
    vae = vae_mod.load(folder, dtype=opts.jnp_dtype)
    c = vae.config.latent_channels
    z = np.random.default_rng(opts.seed + 1).standard_normal((1, c, H // 8, W // 8)).astype(np.float32)
    ours_enc = np.asarray(jnp.asarray(vae.encode(image)).astype(jnp.float32))
    ours_dec = np.asarray(jnp.asarray(vae.decode(z)).astype(jnp.float32))
    del vae
    ref_lib.free()
    model = ref_lib.load_vae(folder, opts.dtype)
    p = next(model.parameters())
    with torch.no_grad():
        their_enc = ref_lib.to_numpy(model.encode(torch.from_numpy(image).to(p.device, p.dtype)).latent_dist.mode())
        their_dec = ref_lib.to_numpy(model.decode(torch.from_numpy(z).to(p.device, p.dtype)).sample)
    del model, p
    ref_lib.free()
    opts.arrays["vae"] = ((ours_enc, ours_dec), (their_enc, their_dec))
    tol = _tol("vae", opts)
    enc = metrics.compare(ours_enc, their_enc, "encode (latent mode)", tolerance=tol)
    dec = metrics.compare(ours_dec, their_dec, "decode", data_range=2.0, tolerance=tol)
    opts.images["vae_decode"] = (_to_unit(ours_dec[0]), _to_unit(their_dec[0]))
    return _section([enc, dec], dec, tol)


def _to_unit(chw: np.ndarray) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] in [0, 1]."""
    return np.clip((np.transpose(chw, (1, 2, 0)) + 1) / 2, 0, 1)


# ----------------------------------------------------------------------------- end to end


def run_pipeline(opts: Options) -> dict:
    """The same initial latents through LensPipeline and a PyTorch Euler loop; every step's latents, the image.

    `opts.latents` ([1, h*w, in_channels]) replaces the seeded initial noise.
    """
    from ...pipelines.text_to_image import LensPipeline

    ref_lib.require("torch", "the PyTorch sampler")
    ref_lib.require("transformers", "the GPT-OSS reference")
    ref_lib.require("diffusers", "the scheduler and VAE references")
    cls = ref_lib.find_dit_class(opts.reference_dit)
    H, W = opts.size
    h, w = opts.tokens_hw
    pipe = LensPipeline.from_pretrained(opts.model, dtype=opts.dtype)
    channels = pipe.dit_config.in_channels
    latents = opts.latents
    if latents is None:
        latents = np.random.default_rng(opts.seed + 2).standard_normal((1, h * w, channels)).astype(np.float32)
    out = pipe(opts.prompt, height=H, width=W, num_inference_steps=opts.steps, guidance_scale=opts.guidance,
               latents=latents, output_type="np", return_trajectory=True)
    ours_traj, ours_img = np.asarray(out.trajectory, np.float32), np.asarray(out.images, np.float32)
    del pipe, out
    ref_lib.free()

    # Reference text features: transformers on the same tokens, sliced at txt_offset.
    folder = opts.model / "text_encoder"
    tokens = _tokens(opts)
    model = ref_lib.load_text_encoder(folder, opts.dtype)
    layers = ref_lib.text_layers(model, tokens.input_ids, tokens.attention_mask)
    del model
    ref_lib.free()
    offset = prompt_lib.read_txt_offset(opts.model)
    feats = [layers[i][:, offset:] for i in _selected_layers(opts)]
    mask = tokens.attention_mask[:, offset:].astype(bool)
    if opts.guidance != 1.0:  # empty negative prompt: zero features, no visible text token
        feats = [np.concatenate([f, np.zeros_like(f)]) for f in feats]
        mask = np.concatenate([mask, np.zeros_like(mask)])
    dit_model = ref_lib.load_dit(cls, opts.model / "transformer", opts.dtype)
    vae = ref_lib.load_vae(opts.model / "vae", opts.dtype)
    their_traj, their_img = ref_lib.sample(dit_model, vae, opts.model / "scheduler", latents, feats, mask, (h, w),
                                           opts.steps, opts.guidance, ref_lib.empirical_mu(h * w, opts.steps))
    del dit_model, vae
    ref_lib.free()

    opts.arrays["pipeline"] = ((ours_traj, ours_img), (their_traj, their_img))
    tol_lat, tol_img = _tol("pipeline_latents", opts), _tol("pipeline_image", opts)
    steps = [metrics.compare(o, r, f"step {i} latents", tolerance=tol_lat)
             for i, (o, r) in enumerate(zip(ours_traj, their_traj))]
    image = metrics.compare(ours_img, their_img, "image", data_range=1.0, tolerance=tol_img)
    opts.images["pipeline"] = (ours_img[0], their_img[0])
    # every step's latents within bound but the image not: the difference enters in the decode
    jump = (locate_jump([[r] for r in steps], [r["name"] for r in steps], tol_lat)
            or _after(locate_jump([[image]], ["image (latent unpacking, VAE decode)"], tol_img), len(steps)))
    section = _section(steps + [image], image, tol_img, layers=len(steps), first_jump=jump)
    section["tolerance_text"] = f"latents {tol_lat.describe()}; image {tol_img.describe()}"
    return section


RUNNERS = {
    "text_encoder": run_text_encoder,
    "transformer": run_transformer,
    "vae": run_vae,
    "pipeline": run_pipeline,
}


def run_component(name: str, opts: Options) -> dict[str, Any]:
    """Run one component; a missing library or reference gives a 'skipped' section with one line."""
    try:
        return RUNNERS[name](opts)
    except ref_lib.Unavailable as e:
        return {"status": "skipped", "message": str(e)}
    except (MemoryError, KeyboardInterrupt):
        raise
    except (LensError, NotImplementedError) as e:  # a truncated file, a config variant lens-jax refuses: one line
        return {"status": "failed", "message": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    except Exception as e:  # one component's crash (e.g. out of memory on the device) must not lose the others
        traceback.print_exc()
        return {"status": "failed", "message": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        ref_lib.free()
