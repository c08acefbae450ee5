"""Finding a checkpoint: a local folder as is, otherwise a Hugging Face hub id resolved to its local snapshot."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointNotFoundError

COMPONENT_DIRS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")


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
            f"Download it on a connected machine (`hf download {repo_id}`) or pass a local folder."
        ) from None
    except HfHubHTTPError as e:
        raise CheckpointNotFoundError(
            f"could not fetch {repo_id} from the hub ({e.__class__.__name__}: {e}). The microsoft/Lens repos were "
            "withdrawn in 2026; pass a local copy or a mirror's id."
        ) from None


def check_layout(root: Path) -> None:
    """Refuse a folder that lacks a component folder of the Lens diffusers layout."""
    missing = [c for c in COMPONENT_DIRS if not (root / c).is_dir()]
    if missing:
        present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise CheckpointNotFoundError(
            f"{root} is missing component folder(s) {missing} of the Lens diffusers layout "
            f"({', '.join(COMPONENT_DIRS)} + model_index.json); found {present}."
        )
