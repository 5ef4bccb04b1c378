"""Hub sources: a dataset repository read through ``datasets`` and ``huggingface_hub``.

Every way this can fail for a user ends in one :class:`~hooktrain.errors.UserError` that
names the cause and the fix: an id without a namespace, the Hub unreachable or offline mode
on, a gated or private repository without a token, a revision, configuration, ``data_dir`` or
split that does not exist (listing what does), and a repository whose main branch holds only
a loading script (pointing at its parquet conversion).

``HF_ENDPOINT`` redirects the client to another Hub-compatible server, ``HF_TOKEN`` gives
access to gated and private repositories.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from hooktrain.errors import UserError, did_you_mean, first_line
from hooktrain.recipe.data import HubSource

PARQUET_REVISION = "refs/convert/parquet"
# Canonical datasets that moved to their owners' namespaces; the client rejects the old ids.
MOVED_DATASETS = {"scene_parse_150": "zhoubolei/scene_parse_150"}
LOCAL_ALTERNATIVES = (
    "use a local copy instead: {type: folder} on the official folder layout, {type: parquet} on "
    "parquet shards, or `hooktrain data convert` (docs/datasets.md)"
)
_PREFLIGHT_TIMEOUT_S = 10


def load_hub(source: HubSource, where: str):
    """``source`` as a ``datasets`` dataset: an ``IterableDataset`` when streaming, else a
    ``Dataset`` downloaded into the cache. Raises a one-line ``UserError`` on any failure."""
    from datasets import load_dataset_builder

    local = is_local(source)
    if not local:
        check_repo(source, where)
    try:
        with _quiet_retries():
            builder = load_dataset_builder(
                source.path,
                source.name,
                revision=source.revision,
                data_dir=source.data_dir,
                data_files=source.data_files,
                token=_token(),
            )
            files = _split_files(builder, source, where)
            if not local:
                _check_one_schema(files, source, where)
            if source.streaming:
                return builder.as_streaming_dataset(split=source.split)
            builder.download_and_prepare()
            return builder.as_dataset(split=source.split)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the fix
        raise _diagnose(exc, source, where, local) from exc


def _split_files(builder, source: HubSource, where: str) -> list[str]:
    """The data files the builder resolved for the source's split (checked to exist)."""
    splits = {str(name): files for name, files in (builder.config.data_files or {}).items()}
    if source.split not in splits:
        available = list(splits)
        raise UserError(
            f"{where}.split: {_describe(source)} has no split '{source.split}'"
            f"{did_you_mean(source.split, available)}; its splits are {available}"
        )
    return [str(f) for f in splits[source.split]]


def _check_one_schema(files: list[str], source: HubSource, where: str) -> None:
    """Refuse a split whose files come from several top-level folders with different columns:
    without ``data_dir`` the Hub's parquet conversion puts every configuration's ``<split>/``
    files into the split, and iteration would fail on the first file of another schema."""
    groups: dict[str, str] = {}
    for url in files:
        inside = url.split("@", 1)[-1].split("/", 1)[-1]
        if "/" in inside:
            groups.setdefault(inside.split("/", 1)[0], url)
    if len(groups) < 2 or not all(url.endswith(".parquet") for url in groups.values()):
        return
    import pyarrow.parquet as pq
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem(token=_token())
    columns = {}
    for folder, url in groups.items():
        with fs.open(url.removeprefix("hf://"), "rb") as f:
            columns[folder] = tuple(pq.read_schema(f).names)
    if len(set(columns.values())) > 1:
        folders = sorted(groups)
        raise UserError(
            f"{where}: split '{source.split}' of {_describe(source)} mixes files with different "
            f"columns from the folders {folders} (several configurations); set {where}.data_dir "
            "to one of them"
        )


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _describe(source: HubSource) -> str:
    at = f"@{source.revision}" if source.revision else ""
    inside = f" (data_dir {source.data_dir})" if source.data_dir else ""
    return f"'{source.path}{at}'{inside}"


def is_local(source: HubSource) -> bool:
    """Whether ``source.path`` is a local directory rather than a Hub id."""
    return Path(os.path.expanduser(source.path)).is_dir()


def check_repo(source: HubSource, where: str) -> None:
    """Fail fast, before ``datasets`` retries for half a minute, on what one request to the
    repository's info endpoint can tell: the id, offline mode, the network, access, revision."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfUriError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path = source.path
    if path.count("/") != 1 or not all(path.split("/")):
        moved = MOVED_DATASETS.get(path.strip("/"))
        hint = f"; this dataset is '{moved}'" if moved else ""
        raise UserError(
            f"{where}.path: Hub dataset ids need 'namespace/name', got '{path}'{hint} (and no "
            f"local directory '{path}' exists in {os.getcwd()}); set {where}.path to the full id"
        )
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{where}: cannot read Hub dataset {_describe(source)}: HF_HUB_OFFLINE is set; unset "
            f"it to stream from the Hub, or {LOCAL_ALTERNATIVES}"
        )
    api = HfApi(token=_token())
    try:
        with _quiet_retries():
            api.dataset_info(path, revision=source.revision, timeout=_PREFLIGHT_TIMEOUT_S)
    except GatedRepoError:
        raise _gated(source, where) from None
    except RepositoryNotFoundError:
        token_hint = "check HF_TOKEN" if _token() else "set HF_TOKEN"
        raise UserError(
            f"{where}.path: the Hub has no dataset '{path}' that this client may read (and no "
            f"local directory '{path}' exists in {os.getcwd()}); check the id, or {token_hint} "
            "if the repository is private"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"{where}.revision: '{source.revision}' does not exist in '{path}'; use a branch, "
            f"tag or commit of the repository (the Hub's parquet conversion is "
            f"'{PARQUET_REVISION}')"
        ) from None
    except (HFValidationError, HfUriError) as exc:
        raise UserError(
            f"{where}.path: '{path}' is not a valid Hub id: {first_line(exc)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - network failures come in many types
        if _is_network_error(exc):
            raise _unreachable(source, where, exc) from None
        raise


def _diagnose(exc: Exception, source: HubSource, where: str, local: bool) -> UserError:
    """The one-line error for a failed ``load_dataset`` of ``source``."""
    from huggingface_hub.errors import GatedRepoError

    if isinstance(exc, UserError):
        return exc
    text = first_line(exc)
    chain = _causes(exc)
    if any(isinstance(e, GatedRepoError) for e in chain) or "gated" in text.lower():
        return _gated(source, where)
    if match := re.search(r"Bad split: (.+?)\. Available splits: (\[.*\])", text):
        available = _names(match[2])
        return UserError(
            f"{where}.split: {_describe(source)} has no split '{source.split}'"
            f"{did_you_mean(source.split, available)}; its splits are {available}"
        )
    cached_instead = "Couldn't find cache for" in text
    if "Dataset scripts are no longer supported" in text or (
        cached_instead and not local and _holds_only_a_script(source)
    ):
        configs = _folders(source.path, PARQUET_REVISION)
        where_to = f"data_dir: one of {configs}" if configs else "data_dir: <config>"
        return UserError(
            f"{where}: {_describe(source)} holds only a loading script, which datasets >= 4 "
            f"does not run; read the Hub's parquet conversion instead: set {where}.revision: "
            f"{PARQUET_REVISION} and {where}.{where_to}"
        )
    if match := re.search(r"BuilderConfig '(.+?)' not found\. Available: (\[.*\])", text):
        available = [n for n in _names(match[2]) if n != "default"]
        if available:
            return UserError(
                f"{where}.name: {_describe(source)} has no configuration '{source.name}'"
                f"{did_you_mean(source.name or '', available)}; its configurations are {available}"
            )
        folders = _folders(source.path, source.revision) if not local else _local_folders(source)
        return UserError(
            f"{where}.name: {_describe(source)} declares no configurations (the Hub's parquet "
            f"conversion has no README), so name '{source.name}' cannot select one; remove "
            f"{where}.name and set {where}.data_dir to one of its folders {folders}"
        )
    # When the repo was downloaded before, datasets falls back to its cache on any failure and
    # says only "Couldn't find cache for <repo> for config '<name>-data_dir=...'".
    if cached_instead or "doesn't contain any data files" in text or "Unable to find" in text:
        folders = _folders(source.path, source.revision) if not local else _local_folders(source)
        return UserError(
            f"{where}: {_describe(source)} has no data files there; set {where}.data_dir to one "
            f"of its folders {folders}, or {where}.data_files to the files"
        )
    if _is_cast_error(chain) and not (source.data_dir or source.data_files):
        folders = _folders(source.path, source.revision) if not local else _local_folders(source)
        return UserError(
            f"{where}: {_describe(source)} mixes files with different columns in one split "
            f"(several configurations?); set {where}.data_dir to one of its folders {folders}"
        )
    if any(_is_network_error(e) for e in chain):
        return _unreachable(source, where, exc)
    return UserError(
        f"{where}: cannot load {_describe(source)} (split {source.split}): {text}; check "
        f"{where}.path/revision/data_dir/split"
    )


def _gated(source: HubSource, where: str) -> UserError:
    action = (
        "check that HF_TOKEN belongs to an account that"
        if _token()
        else "set HF_TOKEN to a token of an account that"
    )
    return UserError(
        f"{where}: '{source.path}' is a gated dataset; accept its conditions on its Hub page, "
        f"then {action} has access"
    )


def _unreachable(source: HubSource, where: str, exc: BaseException) -> UserError:
    from huggingface_hub import constants

    return UserError(
        f"{where}: cannot reach the Hub at {constants.ENDPOINT} to read {_describe(source)} "
        f"({first_line(exc)}); check the network (and HF_ENDPOINT), or {LOCAL_ALTERNATIVES}"
    )


def _folders(repo_id: str, revision: str | None) -> list[str]:
    """The top-level folders of a Hub repository's revision (its configurations, on the
    parquet conversion); empty when they cannot be listed."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFolder

    try:
        entries = HfApi(token=_token()).list_repo_tree(
            repo_id, revision=revision, repo_type="dataset"
        )
        return sorted(e.path for e in entries if isinstance(e, RepoFolder))
    except Exception:  # noqa: BLE001 - only a hint for the message
        return []


def _holds_only_a_script(source: HubSource) -> bool:
    """Whether the revision's top level holds a loading script (``<name>.py``) and neither
    data files nor folders."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFolder

    try:
        entries = list(HfApi(token=_token()).list_repo_tree(
            source.path, revision=source.revision, repo_type="dataset"
        ))  # fmt: skip
    except Exception:  # noqa: BLE001 - only a hint for the message
        return False
    files = [e.path for e in entries if not isinstance(e, RepoFolder)]
    data = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".zip", ".tar")
    return (
        any(f.endswith(".py") for f in files)
        and not any(f.endswith(data) for f in files)
        and not any(isinstance(e, RepoFolder) for e in entries)
    )


def _local_folders(source: HubSource) -> list[str]:
    root = Path(os.path.expanduser(source.path))
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _names(listing: str) -> list[str]:
    return re.findall(r"'([^']*)'", listing)


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _is_cast_error(chain: list[BaseException]) -> bool:
    return any(type(e).__name__ in ("CastError", "DatasetGenerationCastError") for e in chain)


def _is_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(
        exc, (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError)
    ):
        return True
    return type(exc).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2", "httpcore2") and (
        "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__
    )


@contextmanager
def _quiet_retries():
    """huggingface_hub logs a warning per retry of a failing request; the run reports the
    failure once, as its own one-line error."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)
