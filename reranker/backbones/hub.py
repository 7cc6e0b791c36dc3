"""The Hugging Face hub, seen from here: reachable or not (in seconds), and what its cache already holds."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

#: How long a connection attempt to the hub may take before it counts as unreachable.
HUB_TIMEOUT_S = 3.0


def hub_offline_requested() -> bool:
    """True when the user asked for no hub access (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within ``timeout_s`` seconds.

    One connection attempt instead of a download's retries: an unreachable hub is known
    in seconds, not after a minute of back-off.
    """
    if hub_offline_requested():
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def cached_hub_weights(model_name: str) -> Path | None:
    """The model's pretrained weights file if the local hub cache already holds it, else None."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model_name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return None
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    for filename in names + ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None
