"""Finds a checkpoint named by a directory or by a Hugging Face hub id, without a network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def hub_cache_dir(download_dir: Optional[str] = None) -> Path:
    """Where the hub's snapshots are looked for: ``download_dir`` (vLLM's engine argument),
    else ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache/huggingface/hub (read now, not
    when huggingface_hub was imported)."""
    if download_dir:
        return Path(download_dir).expanduser()
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"),
                                              "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_checkpoint(
    name: str,
    *,
    what: str = "model",
    revision: Optional[str] = None,
    download_dir: Optional[str] = None,
) -> Path:
    """``name`` as a directory: itself when it exists, else the snapshot of the hub id ``name``
    (at ``revision``, default main) in the local Hugging Face cache. Nothing is downloaded; a
    name found in neither place is a ValueError naming ``what``, the id and where it looked."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir(download_dir)
    try:
        found = snapshot_download(
            str(name), revision=revision, cache_dir=cache, local_files_only=True
        )
    except HFValidationError:  # not shaped like a hub id: a directory that is not there
        raise ValueError(f"engine argument {what!r}: {name!r} is not a directory") from None
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(
            f"engine argument {what!r}: {name!r} is not a directory, and the hub id {name!r}"
            f"{at} is not in the local Hugging Face cache {str(cache)!r} (download_dir, "
            "HF_HUB_CACHE or HF_HOME); pagedserve does not download models"
        ) from None
    return Path(found)
