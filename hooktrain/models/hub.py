"""Weight files from the Hugging Face Hub through huggingface_hub, failing fast when it is out of reach."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' names, newest first


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint, so an unreachable Hub fails in seconds rather than
    after huggingface_hub's ~46 s of retries. Behind a proxy, trust the proxy and say yes."""
    from huggingface_hub import constants

    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_if_unreachable() -> tuple[bool, contextlib.AbstractContextManager]:
    """Whether the Hub is out of reach, and a context that makes huggingface_hub offline then
    (offline, it still serves files already in the local cache)."""
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE) or not hub_reachable()
    patch = mock.patch.object(constants, "HF_HUB_OFFLINE", True) if offline else contextlib.nullcontext()
    return offline, patch


class HubUnavailable(OSError):
    """The weights could not be downloaded; the message says why in a few words."""


def download_weights(repo: str) -> Path:
    """The weights file of the Hub model ``repo`` (``model.safetensors``, or the torch file older
    repositories hold), downloaded into (or found in) huggingface_hub's cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    offline, patch = offline_if_unreachable()
    try:
        with patch:
            try:
                return Path(hf_hub_download(repo, WEIGHT_FILES[0]))
            except EntryNotFoundError:
                return Path(hf_hub_download(repo, WEIGHT_FILES[1]))
    except (OSError, EntryNotFoundError, ValueError) as err:
        why = "the Hugging Face Hub is offline or unreachable" if offline else str(err).strip().splitlines()[0]
        raise HubUnavailable(why) from err
