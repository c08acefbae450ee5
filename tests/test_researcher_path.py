"""The JAX researcher's path through the public API: each test is a defect found walking it.

Tiny configs, module-scoped fixtures; every check here failed before its fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lens_jax.lora as lora
import lens_jax.transformer as T
from lens_jax.errors import CheckpointError, CheckpointNotFoundError
from lens_jax.training import load_trained
from lens_jax.training.data import CachedBatches
from lens_jax.training.trainer import Trainer

from . import test_training, train_check
from .conftest import FIXTURES

TINY = FIXTURES / "tiny_lens"


@pytest.fixture(scope="module")
def tiny():
    return train_check.tiny()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return test_training.write_cache(tmp_path_factory.mktemp("cache"), 4)


def _run(tiny, cache, out, **sections):
    """A run folder as a Trainer leaves it, with checkpoints at steps 1 and 2 holding perturbed
    (recognisable) trained trees; no train step is compiled (that is test_training's business)."""
    config, params = tiny
    cfg = train_check.make_cfg(str(out), **sections)
    trainer = Trainer(cfg, config, params, CachedBatches(cache, 2, 0, 4))
    trainer.fit(stop_at=0)  # writes the run's files, trains nothing
    states = {}
    for step in (1, 2):
        state = dict(trainer.state, step=jnp.asarray(step, jnp.int32),
                     params=jax.tree.map(lambda x: x + 0.25 * step, trainer.state["params"]))
        if "ema" in state:
            state["ema"] = jax.tree.map(lambda x: x - 0.5 * step, state["params"])
        trainer.save(state, {"next_index": step}, wait=True)
        states[step] = state
    trainer.close()
    return cfg, states[2]


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- a run's weights, read back


@pytest.fixture(scope="module")
def lora_run(tiny, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    cfg, state = _run(tiny, cache, out, lora={"enabled": True, "rank": 4, "alpha": 2.0})
    return out, cfg, state


def test_load_trained_lora_is_the_trained_adapter(tiny, lora_run, tmp_path):
    """Before: nothing read a run's weights back (the docs promised PEFT/kohya/comfy adapters and a
    PyTorch export of a run, but only orbax train states were written)."""
    config, params = tiny
    out, cfg, state = lora_run
    run = load_trained(out, config=cfg)
    assert run.step == 2 and run.params is None and run.dit_config == config
    assert sorted(run.adapter) == sorted(state["params"])
    for path, w in run.adapter.items():
        want = state["params"][path]
        assert w.alpha == want.alpha == (2.0,) * config.num_layers, path
        np.testing.assert_array_equal(w.lora_A, np.asarray(want.lora_A))
        np.testing.assert_array_equal(w.lora_B, np.asarray(want.lora_B))
    assert load_trained(out, step=1, config=cfg).step == 1
    # The adapter goes to a file and back bit for bit, and merges like the live one.
    back = lora.load(lora.save(run.adapter, tmp_path / "a.safetensors", format="kohya"), config)
    for a, b in zip(_host(run.adapter), _host(back)):
        np.testing.assert_array_equal(a, b)
    merged = run.merged_params(params)
    want = lora.merge(params, state["params"], cfg.lora.multiplier)
    for a, b in zip(_host(merged), _host(want)):
        np.testing.assert_array_equal(a, b)


def test_cli_writes_the_final_adapter(tiny, lora_run, tmp_path):
    """`lens-jax train` with lora.enabled writes lora.safetensors (PEFT) beside the checkpoints."""
    from lens_jax.tools import train as train_tool

    config, _ = tiny
    _, cfg, state = lora_run
    cfg = train_check.make_cfg(str(tmp_path), lora={"enabled": True, "rank": 4, "alpha": 2.0})
    path = train_tool.write_adapter(cfg, state)
    assert path == tmp_path / "lora.safetensors"
    back = lora.load(path, config)
    assert lora.detect_format(list(lora.state_dict(back, "peft"))) == "peft"
    for a, b in zip(_host(back), _host(state["params"])):
        np.testing.assert_array_equal(a, b)


def test_load_trained_full_exports_to_pytorch_layout(tiny, cache, tmp_path):
    from safetensors.numpy import load_file

    config, _ = tiny
    cfg, state = _run(tiny, cache, tmp_path / "run", optim={"ema_decay": 0.5})
    run = load_trained(tmp_path / "run", config=cfg)
    assert run.adapter is None and run.ema and run.step == 2
    for a, b in zip(_host(run.params), _host(state["ema"])):
        np.testing.assert_array_equal(a, b)
    raw = load_trained(tmp_path / "run", ema=False, config=cfg)
    for a, b in zip(_host(raw.params), _host(state["params"])):
        np.testing.assert_array_equal(a, b)
    folder = T.export_diffusers(run.params, run.dit_config, tmp_path / "transformer")
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    want = T.to_torch_state_dict(run.params, config)
    assert sorted(sd) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def test_load_trained_names_what_is_missing(lora_run, tmp_path):
    out, cfg, _ = lora_run
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_trained(out)  # a Trainer run from Python writes no config.json: pass config=
    with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint for step 7 .* steps \[1, 2\]"):
        load_trained(out, step=7, config=cfg)
    with pytest.raises(CheckpointError, match="no EMA"):
        load_trained(out, ema=True, config=cfg)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_trained(tmp_path / "nothing", config=cfg)


# ----------------------------------------------------------------------------- the pipeline from Python


@pytest.fixture(scope="module")
def pipe():
    from lens_jax import LensPipeline

    return LensPipeline.from_pretrained(TINY)


def test_swapped_dit_params_of_another_shape_is_one_line(pipe):
    """Before: a deep pjit pytree-prefix error or a broadcasting error from inside the sampler."""
    from lens_jax.errors import InputError

    good = pipe.dit_params
    missing = {k: v for k, v in good.items() if k != "img_in"}
    with pytest.raises(InputError, match=r"dit_params lacks img_in\.bias \(32,\)"):
        pipe("a fox", dit_params=missing, num_inference_steps=1, height=32, width=32)
    narrow = dict(good, img_in={"kernel": good["img_in"]["kernel"][:, :16], "bias": good["img_in"]["bias"]})
    with pytest.raises(InputError, match=r"img_in\.kernel has shape \(32, 16\); .* needs \(32, 32\)"):
        pipe("a fox", dit_params=narrow, num_inference_steps=1, height=32, width=32)
    extra = dict(good, extra_head={"kernel": np.zeros((2, 2))})
    with pytest.raises(InputError, match=r"has extra_head\.kernel, which this pipeline's DiT does not have"):
        pipe("a fox", dit_params=extra, num_inference_steps=1, height=32, width=32)


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("folder", ["vae", "text_encoder"])
def test_transformer_load_of_another_component_names_it(folder):
    """Before: T.load('Lens/vae') died in TransformerConfig with "can't multiply sequence by non-int"."""
    with pytest.raises(CheckpointError, match="is not a Lens DiT config .* pass the pipeline's transformer/ folder"):
        T.load(TINY / folder)


def test_pure_apply_checks_the_token_grid():
    """Before: T.apply(..., img_shape) with a grid of another size died in RoPE with a broadcasting TypeError."""
    tr = T.load(TINY / "transformer")
    x, feats = jnp.zeros((1, 24, 32)), [jnp.zeros((1, 3, 64))] * 4
    with pytest.raises(ValueError, match=r"img_shape \(5, 5\) gives 25 tokens but hidden_states has 24"):
        T.apply(tr.params, tr.config, x, feats, jnp.ones((1, 3), bool), jnp.ones((1,)), (5, 5))


# ----------------------------------------------------------------------------- the public API documents itself

def _public_callables():
    import importlib
    import inspect

    import lens_jax

    facades = ["lens_jax.transformer", "lens_jax.text_encoder", "lens_jax.vae", "lens_jax.lora", "lens_jax.sharding",
               "lens_jax.training"]
    seen = {}
    for modname in facades:
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or hasattr(obj, "__wrapped__") and inspect.isfunction(obj.__wrapped__):
                seen[f"{modname}.{name}"] = inspect.unwrap(obj)
            elif inspect.isclass(obj) and obj.__module__.startswith("lens_jax"):
                seen[name] = obj
                for attr, v in vars(obj).items():
                    if attr.startswith("_") and attr != "__call__":
                        continue
                    f = v.__func__ if isinstance(v, (classmethod, staticmethod)) else getattr(v, "fget", v)
                    if inspect.isfunction(f) and f.__qualname__.startswith(obj.__name__ + "."):
                        seen[f"{name}.{attr}"] = f
    pipe_cls = lens_jax.LensPipeline
    for attr, v in vars(pipe_cls).items():
        f = v.__func__ if isinstance(v, (classmethod, staticmethod)) else getattr(v, "fget", v)
        if inspect.isfunction(f) and (not attr.startswith("_") or attr == "__call__"):
            seen[f"LensPipeline.{attr}"] = f
    return seen


def test_public_functions_have_docstrings_and_type_hints():
    """Before: LensTransformer.__call__ had neither, 20 methods and helpers had no docstring, and
    dtype / params / multiplier / array arguments across the facades had no types (55 items)."""
    import inspect

    problems = []
    for name, f in sorted(_public_callables().items()):
        if inspect.isclass(f):
            if not (f.__doc__ or "").strip():
                problems.append(f"{name}: no docstring")
            continue
        if not (f.__doc__ or "").strip():
            problems.append(f"{name}: no docstring")
        sig = inspect.signature(f)
        bare = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty
                and p not in ("self", "cls") and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        if bare:
            problems.append(f"{name}: untyped {bare}")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- docs/research.md runs


_RUN_PAGE = """
import re, sys
from pathlib import Path
text = Path("docs/research.md").read_text()
blocks = re.findall(r"^```python\\n(.*?)^```", text, re.S | re.M)
code = "\\n".join(blocks)
out_line = 'OUT = Path("research-demo")'
assert len(blocks) >= 6 and out_line in code, "the page lost its python blocks or its OUT line"
scope = {}
exec(compile(code.replace(out_line, f"OUT = Path({sys.argv[1]!r})"), "docs/research.md", "exec"), scope)
print("page ran", float(scope["loss"]))
"""


def test_research_page_runs(tmp_path):
    """Every `python` block of docs/research.md, in order, on the tiny checkpoints; the page's own asserts
    check what it claims (exact export, bit-identical resume, the PyTorch forward within tolerance).

    Its own process, compiled with JAX_DISABLE_MOST_OPTIMIZATIONS (about half the compile time): that
    flag is not part of JAX's jit cache key, so set in this process it would leak into later tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               LENS_JAX_COMPILATION_CACHE="off")
    proc = subprocess.run([sys.executable, "-c", _RUN_PAGE, str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "page ran" in proc.stdout and (tmp_path / "transformer" / "config.json").exists()


def test_swapped_dit_params_reuse_the_compiled_sampler(pipe):
    """Before: a tree from a training loop or load_trained (host numpy, or uncommitted arrays) was not
    laid out like pipe.dit_params, so every call with it compiled the whole sampler again."""
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    kw = dict(num_inference_steps=1, height=32, width=32, seed=3, output_type="latent")
    want = pipe("a fox", **kw).images
    host = jax.tree.map(np.asarray, pipe.dit_params)  # what load_trained(...).params looks like
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        got = pipe("a fox", dit_params=host, **kw).images
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not compiles, f"{len(compiles)} programs compiled for dit_params of the same shapes"


def test_trainer_names_the_batches_protocol_before_training(tiny, cache, tmp_path):
    """Before: a plain generator trained for checkpoint_every steps, then died in save() with
    AttributeError: 'generator' object has no attribute 'get_state'."""
    from lens_jax.errors import InputError

    config, params = tiny
    cfg = train_check.make_cfg(str(tmp_path), train={"steps": 2, "checkpoint_every": 1})
    listed = Trainer(cfg, config, params, [CachedBatches(cache, 2, 0, 4).batch(0)])
    with pytest.raises(InputError, match="batches must have iterator"):
        listed.fit()
    listed.close()

    class Plain:
        def iterator(self, state=None):
            return iter([CachedBatches(cache, 2, 0, 4).batch(0)] * 2)

    trainer = Trainer(cfg, config, params, Plain())
    with pytest.raises(InputError, match="without get_state"):
        trainer.fit()
    trainer.close()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize("multiplier", [float("nan"), float("inf"), "0.5", True])
def test_with_lora_checks_the_multiplier(multiplier):
    """Before: NaN / inf gave a DiT of NaNs silently, "0.5" a TypeError from inside jit."""
    from lens_jax.errors import InputError

    tr = T.load(TINY / "transformer")
    adapter = lora.load(FIXTURES / "loras" / "lora_peft.safetensors", tr.config)
    with pytest.raises(InputError, match="LoRA multiplier must be a finite number"):
        tr.with_lora(adapter, multiplier)


def test_to_torch_state_dict_of_an_adapter_points_to_lora_state_dict():
    """Before: T.to_torch_state_dict(adapter) was KeyError: 'transformer_blocks'."""
    tr = T.load(TINY / "transformer")
    adapter = lora.init_adapter(tr.params, tr.config, jax.random.key(0), rank=2)
    with pytest.raises(CheckpointError, match=r"LoRA adapter: lens_jax\.lora\.state_dict"):
        T.to_torch_state_dict(adapter, tr.config)


def test_export_diffusers_again_replaces_an_earlier_export(tmp_path):
    """Before: exporting into a folder holding an earlier sharded export left its shards and index,
    and T.load (like diffusers) then read the old weights."""
    tr = T.load(TINY / "transformer")
    T.export_diffusers(tr.params, tr.config, tmp_path, max_shard_bytes=20_000)
    newer = jax.tree.map(lambda a: a + 1, tr.params)
    T.export_diffusers(newer, tr.config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    for a, b in zip(_host(T.load(tmp_path).params), _host(newer)):
        np.testing.assert_array_equal(a, b)
    T.export_diffusers(tr.params, tr.config, tmp_path, max_shard_bytes=20_000)  # and back to shards
    assert "diffusion_pytorch_model.safetensors" not in {p.name for p in tmp_path.iterdir()}
    for a, b in zip(_host(T.load(tmp_path).params), _host(tr.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ids, message", [(np.array([[1.5, 2.0]]), "integer token ids"),
                                         (np.array([[0, 10**6]]), "the vocabulary"),
                                         (np.array([[-1, 3]]), "the vocabulary")])
def test_text_encoder_rejects_non_token_ids(ids, message):
    """Before: float ids were truncated and out-of-range ids clamped by the gather, silently."""
    from lens_jax import text_encoder as TE

    cfg = TE.TextEncoderConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=2,
                               num_experts_per_tok=1, sliding_window=8, layer_types=("sliding_attention",))
    te = TE.TextEncoder(cfg, TE.init_params(cfg, jax.random.key(0)), selected_layers=(0,))
    with pytest.raises(ValueError, match=message):
        te(ids)


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), OSError("disk full")])
def test_export_interrupted_leaves_the_earlier_export_and_no_partial_files(tmp_path, monkeypatch, interrupt):
    """Before: the earlier export's weights were deleted first and the new shards written in place, so
    Ctrl-C (or a full disk) mid-export left a folder with some new shards and no index."""
    import safetensors.numpy

    tr = T.load(TINY / "transformer")
    T.export_diffusers(tr.params, tr.config, tmp_path / "transformer")
    T.export_comfy(tr.params, tmp_path / "comfy.safetensors", tr.config)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_save, calls = safetensors.numpy.save_file, []

    def save_then_fail(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise interrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", save_then_fail)
    newer = jax.tree.map(lambda a: a + 1, tr.params)
    with pytest.raises(type(interrupt)):
        T.export_diffusers(newer, tr.config, tmp_path / "transformer", max_shard_bytes=20_000)
    calls.clear()
    calls.append("first")  # the next save fails: the comfy file's only one
    with pytest.raises(type(interrupt)):
        T.export_comfy(newer, tmp_path / "comfy.safetensors", tr.config)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["comfy.safetensors", "transformer"]
