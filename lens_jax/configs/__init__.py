"""Model presets and configurations, as JSON data.

- `presets.json`: sampling defaults of the published variants (lens, lens-base, lens-turbo).
- `lens/`: the real component configs (transformer, text_encoder, vae, scheduler, model_index).
- `tiny/`: tiny configs and a small tokenizer for offline smoke tests (`--model tiny-random`).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    """Filesystem path of a file or folder in this package, e.g. path('tiny/tokenizer')."""
    return Path(str(resources.files(__name__).joinpath(name)))


def load_json(name: str) -> dict:
    return json.loads(path(name).read_text())
