"""Weight files from the Hugging Face Hub through huggingface_hub, failing fast when it is out of reach.

hooktrain's own models on the Hub (``hooktrain push``) are named ``hf://OWNER/NAME[@REVISION]``
in ``load_from``, ``model.encoder.pretrained_path``, ``hooktrain predict`` and
``Segmenter.from_pretrained``;
:func:`resolve_weights` turns such an id into the downloaded ``model.safetensors``.
Weights are data: only safetensors files are read, no code from the Hub is run."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

from hooktrain.errors import UserError

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


# -- hooktrain models on the Hub: ``hf://OWNER/NAME[@REVISION]`` ------------------------------

HUB_PREFIX = "hf://"
MODEL_FILE = WEIGHT_FILES[0]  # what `hooktrain push` uploads: the exported model
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?$")
LOGIN_FIX = "set HF_TOKEN or run `hf auth login`"


def is_hub_id(value: object) -> bool:
    """Whether ``value`` names a Hub model: a string starting with ``hf://``."""
    return isinstance(value, str) and value.startswith(HUB_PREFIX)


def parse_hub_id(value: str, what: str = "model") -> tuple[str, str | None]:
    """``hf://OWNER/NAME[@REVISION]`` -> ``(OWNER/NAME, REVISION or None)``; a one-line
    ``UserError`` for anything else."""
    match = _HUB_ID.match(value.removeprefix(HUB_PREFIX))
    if match is None:
        raise UserError(
            f"{what}: {value} is not a Hub model id; write hf://OWNER/NAME or hf://OWNER/NAME@REVISION "
            "(a branch, tag or commit)"
        )
    return match["repo"], match["revision"]


def hub_model_file(repo: str, revision: str | None = None, what: str = "model") -> Path:
    """The ``model.safetensors`` of the Hub model ``repo`` at ``revision`` (default ``main``),
    downloaded into (or found in) huggingface_hub's cache. Errors are one-line ``UserError`` s
    naming the Hub id and the fix."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = HUB_PREFIX + repo + (f"@{revision}" if revision else "")
    offline, patch = offline_if_unreachable()
    try:
        with patch:
            return Path(hf_hub_download(repo, MODEL_FILE, revision=revision))
    except GatedRepoError:
        raise UserError(f"{what}: {name} is gated; accept its conditions on the Hub, then {LOGIN_FIX}") from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{what}: {name} not found on the Hub; check the id, or for a private model {LOGIN_FIX}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{what}: {name}: revision {revision} not found; give a branch, tag or commit of {repo}"
        ) from None
    except LocalEntryNotFoundError:
        why = "the Hugging Face Hub is offline or unreachable" if offline else "the download failed"
        raise UserError(
            f"{what}: {name}: {why} and {MODEL_FILE} is not in the local cache; connect (unset HF_HUB_OFFLINE) "
            "and try again"
        ) from None
    except EntryNotFoundError:
        raise UserError(
            f"{what}: {name} has no {MODEL_FILE}; is it a hooktrain model? Upload one with `hooktrain push`"
        ) from None
    except (HFValidationError, ValueError) as err:
        raise UserError(f"{what}: {name} is not a valid Hub id ({_first_line(err)})") from None
    except OSError as err:
        raise UserError(f"{what}: {name} could not be downloaded ({_first_line(err)})") from None


def resolve_weights(path: str | os.PathLike, what: str = "weights") -> Path:
    """A local weights path as a ``Path`` (unchanged), or for an ``hf://OWNER/NAME[@REV]`` id
    the Hub model's ``model.safetensors`` downloaded (or found in the cache)."""
    if not is_hub_id(path):
        return Path(path)
    repo, revision = parse_hub_id(str(path), what)
    return hub_model_file(repo, revision, what)


ENCODER_PREFIX = "encoder."


def resolve_encoder_weights(path: str | os.PathLike) -> Path:
    """``model.encoder.pretrained_path`` as a local file. An ``hf://`` id is downloaded; when it
    is a hooktrain model (an exported segmentor: ``encoder.*`` keys and its recipe in the
    metadata), its encoder's tensors are written once into ``$HF_HOME/hooktrain/encoders/`` as
    the encoder's own state dict, which is what ``pretrained_path`` takes. Any other file (a
    timm model's weights on the Hub, say) is used as it is."""
    if not is_hub_id(path):
        return Path(path)
    from huggingface_hub import constants
    from safetensors import safe_open

    file = resolve_weights(path, "model.encoder.pretrained_path")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        keys = [key for key in f.keys() if key.startswith(ENCODER_PREFIX)]
        if "hooktrain.recipe" not in metadata or not keys:
            return file
        out = Path(constants.HF_HOME) / "hooktrain" / "encoders" / f"{file.resolve().name}.safetensors"
        if not out.is_file():
            from safetensors.torch import save_file

            state = {key.removeprefix(ENCODER_PREFIX): f.get_tensor(key).contiguous() for key in keys}
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
            save_file(state, str(partial), metadata={"source": str(path)})
            partial.replace(out)
    return out


def with_local_encoder_weights(cfg):
    """A ``ModelConfig`` whose ``encoder.pretrained_path`` is a local file
    (:func:`resolve_encoder_weights`); ``cfg`` itself when it names none on the Hub."""
    path = cfg.encoder.pretrained_path
    if not is_hub_id(path):
        return cfg
    encoder = cfg.encoder.model_copy(update={"pretrained_path": str(resolve_encoder_weights(path))})
    return cfg.model_copy(update={"encoder": encoder})


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
