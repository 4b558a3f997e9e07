"""Flow checkpoints on the Hugging Face hub's conventions: a folder, or a hub id resolved to its cached snapshot.

A checkpoint folder (flow.safetensors, config.json, the mixture problem, README.md model card) is uploaded
as is (`ConditionalFlow.push_to_hub`); `local_folder` turns a hub id into the folder of its snapshot in
the hub cache, downloading it once (with HF_HUB_OFFLINE=1, from the cache only), so every loader
(aps.load, ConditionalFlow.from_pretrained) reads a plain folder.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import ApsError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def local_folder(name_or_path, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A checkpoint folder as given, or the snapshot folder of hub id `owner/name` (downloaded once)."""
    path = Path(name_or_path)
    if path.exists() or not HUB_ID.match(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ApsError(f"checkpoint folder not found: {name_or_path} (nor as a hub id: "
                       f"{str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def push_folder(folder, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload an aps flow", revision: str | None = None):
    """Upload a checkpoint folder to hub repo `repo_id` (created if missing); returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             revision=revision)
