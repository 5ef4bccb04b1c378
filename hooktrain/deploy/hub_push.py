"""``hooktrain push``: share a trained model on the Hugging Face Hub, in one commit.

    hooktrain push work_dirs/quickstart alice/shapes-fpn [--private] [--revision BRANCH]
                   [--commit-message MSG] [--checkpoint best|latest|iter_N]

What is uploaded, built in a temporary directory (the work dir is only read):

- ``model.safetensors``: the checkpoint exported as ``hooktrain export`` writes it (weights and
  the resolved recipe), what ``Segmenter.from_pretrained``, ``hooktrain predict hf://...``,
  ``load_from: hf://...`` and ``model.encoder.pretrained_path: hf://...`` read back;
- ``recipe.yaml``: the resolved recipe;
- ``metrics.jsonl`` (the run's history), ``metrics.json`` (the evaluation the card shows, with
  the per-class values) and ``best.json`` (the ``best/`` checkpoint's record), as far as the run
  has them;
- ``training_curves.png``: :func:`hooktrain.tools.plot.plot_runs` of the run;
- ``README.md``: the model card (:mod:`hooktrain.deploy.model_card`).

The upload goes through huggingface_hub's own client: ``create_repo(exist_ok=True)``, then
``create_branch`` for a ``--revision`` other than main, then ONE ``create_commit``, which the
Hub applies whole or not at all, so a failed push leaves the repository as it was. The client
picks the transfer (Xet when ``hf_xet`` is installed, else LFS). A missing or read-only token, a
token without write access to the repository, an invalid id and a source without a checkpoint
are one-line ``UserError`` s naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hooktrain.checkpoint.layout import BEST, BEST_RECORD, CHECKPOINTS, HISTORY_FILE, LATEST, RECIPE, WEIGHTS
from hooktrain.errors import UserError
from hooktrain.models.hub import HUB_PREFIX, LOGIN_FIX, MODEL_FILE

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
TOKEN_SETTINGS = "https://huggingface.co/settings/tokens"


def push(
    source: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    checkpoint: str | None = None,
    report: Callable[[str], None] | None = None,
) -> Any:
    """Upload the model of ``source`` (a work dir, or a checkpoint directory) to the Hub model
    repository ``repo_id`` (``OWNER/NAME``) in one commit on ``revision`` (a branch, default
    main). ``checkpoint`` picks a work dir's checkpoint: ``best``, ``latest`` or ``iter_N``
    (default: best when the run saved one, else latest). Returns huggingface_hub's ``CommitInfo``."""
    report = report or (lambda line: None)
    repo_id = check_repo_id(repo_id)
    directory, work_dir = find_checkpoint(Path(source), checkpoint)
    api, user = _authenticated_api()
    with tempfile.TemporaryDirectory(prefix="hooktrain-push-") as tmp:
        files = stage_files(directory, work_dir, Path(tmp), repo_id, revision=revision)
        message = commit_message or f"Upload hooktrain model ({directory.name} of {(work_dir or directory).name})"
        info = _upload(api, user, repo_id, Path(tmp), files, private=private, revision=revision, message=message)
    where = f"{repo_id}@{revision}" if revision else repo_id
    report(f"pushed {len(files)} files ({', '.join(files)}) to {HUB_PREFIX}{where}: {info.commit_url}")
    return info


def check_repo_id(repo_id: str) -> str:
    """``OWNER/NAME`` (an ``hf://`` prefix is dropped), or a one-line ``UserError``."""
    repo_id = repo_id.removeprefix(HUB_PREFIX)
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or len(repo_id) > 96:
        raise UserError(
            f"push: {repo_id!r} is not a valid Hub repository id; write OWNER/NAME (letters, digits, '-', '_', "
            "'.'), e.g. alice/shapes-fpn"
        )
    return repo_id


def find_checkpoint(source: Path, which: str | None) -> tuple[Path, Path | None]:
    """``(checkpoint directory, work dir or None)`` of ``source``: a work dir (its ``best``,
    ``latest`` or ``iter_N`` checkpoint), a checkpoint directory (its work dir, when it sits in
    one's ``checkpoints/``) or a ``latest`` file."""
    if source.is_file() and source.name == LATEST:
        source = source.parent / source.read_text().strip()
    if not source.is_dir():
        raise UserError(f"push: {source} not found; give a run's work dir or a checkpoint directory")
    if (source / WEIGHTS).is_file():
        if which is not None:
            raise UserError(
                f"push: {source} is a checkpoint already; --checkpoint picks one of a work dir's: "
                f"give the work dir ({source.parent.parent}) or leave --checkpoint out"
            )
        work_dir = source.parent.parent if source.parent.name == CHECKPOINTS else None
        return source, work_dir if work_dir is not None and (work_dir / HISTORY_FILE).is_file() else None
    root = source / CHECKPOINTS
    from hooktrain.checkpoint.state import complete_checkpoints

    complete = complete_checkpoints(source)
    if not complete and not (root / BEST / WEIGHTS).is_file():
        raise UserError(
            f"push: {source} holds no checkpoint ({CHECKPOINTS}/iter_N or {CHECKPOINTS}/best with {WEIGHTS}); "
            "train it first (the checkpoint hook saves them), or give a checkpoint directory"
        )
    if which is None:
        which = BEST if (root / BEST / WEIGHTS).is_file() else LATEST
    if which == LATEST:
        named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else ""
        chosen = root / named if named and (root / named / WEIGHTS).is_file() else (complete[-1] if complete else None)
    elif which == BEST or re.fullmatch(r"iter_\d+", which):
        chosen = root / which
    else:
        raise UserError(f"push: --checkpoint {which!r} is not best, latest or iter_N (e.g. iter_960)")
    if chosen is None or not (chosen / WEIGHTS).is_file():
        found = [p.name for p in complete] + ([BEST] if (root / BEST / WEIGHTS).is_file() else [])
        hint = "save_best in the checkpoint hook keeps best/; " if which == BEST else ""
        raise UserError(
            f"push: {source} has no checkpoint {which}; {hint}choose one of {', '.join(found) or 'none'} "
            "with --checkpoint"
        )
    return chosen, source


def read_history(work_dir: Path | None) -> list[dict[str, Any]]:
    """The records of the run's ``metrics.jsonl`` (none without one; bad lines skipped)."""
    path = work_dir / HISTORY_FILE if work_dir is not None else None
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    return records


def stage_files(
    checkpoint: Path, work_dir: Path | None, out: Path, repo_id: str, *, revision: str | None = None
) -> list[str]:
    """Write what ``push`` uploads into ``out``; returns the file names, in upload order."""
    import yaml

    from hooktrain.deploy.export import _recipe_text, export_checkpoint
    from hooktrain.deploy.model_card import CURVES, build_card, class_names, pick_evaluation

    export_checkpoint(checkpoint, out / MODEL_FILE)
    recipe_text = _recipe_text(checkpoint)
    (out / RECIPE).write_text(recipe_text)
    files = [MODEL_FILE, RECIPE]
    best_file = checkpoint / BEST_RECORD  # only in best/: its score and iteration
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if best is not None:
        shutil.copyfile(best_file, out / BEST_RECORD)
        files.append(BEST_RECORD)
    history = read_history(work_dir)
    if history:
        shutil.copyfile(work_dir / HISTORY_FILE, out / HISTORY_FILE)
        files.append(HISTORY_FILE)
    recipe = yaml.safe_load(recipe_text) or {}
    from hooktrain.checkpoint.weights import recorded_iteration

    iteration = recorded_iteration(checkpoint)
    evaluation = pick_evaluation(history, iteration, best)
    if evaluation is not None:
        names = class_names(recipe.get("data") or {})
        (out / "metrics.json").write_text(json.dumps(evaluation.as_json(names), indent=1))
        files.append("metrics.json")
    curves = _plot(work_dir, out / CURVES) if history else False
    if curves:
        files.append(CURVES)
    card = build_card(repo_id, recipe, evaluation, revision=revision, iteration=iteration,
                      files=[*files, "README.md"], curves=curves)  # fmt: skip
    (out / "README.md").write_text(card)
    return [*files, "README.md"]


def _plot(work_dir: Path, out: Path) -> bool:
    """The run's curves as ``hooktrain plot`` draws them; False when it has nothing to draw."""
    from hooktrain.tools.plot import plot_runs

    try:
        plot_runs([work_dir], out)
    except UserError:
        return False
    return out.is_file()


def _authenticated_api() -> tuple[Any, str]:
    """``(HfApi, user name)`` for the token huggingface_hub finds (``HF_TOKEN``, or the one
    ``hf auth login`` saved), refusing a missing, invalid or read-only token in one line."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise UserError("push: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and push again")
    token = get_token()
    if not token:
        raise UserError(f"push: no Hugging Face token found; {LOGIN_FIX} with a token that has write access")
    api = HfApi(token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise UserError(
                f"push: the Hugging Face token is invalid or expired; {LOGIN_FIX} with a valid write token "
                f"({TOKEN_SETTINGS})"
            ) from None
        raise UserError(f"push: the Hub ({constants.ENDPOINT}) refused to identify the token: {_why(err)}") from None
    except Exception as err:  # httpx connection errors are no OSError
        raise UserError(
            f"push: could not reach the Hub at {constants.ENDPOINT} ({_why(err)}); check the network"
        ) from None
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UserError(
            f"push: the Hugging Face token of {who.get('name')} is read-only; create a token with write access "
            f"({TOKEN_SETTINGS}), then {LOGIN_FIX}"
        )
    return api, str(who.get("name") or "?")


def _upload(api, user: str, repo_id: str, folder: Path, files: list[str], *, private: bool,
            revision: str | None, message: str):  # fmt: skip
    """create_repo, create_branch (a revision other than main), then one create_commit."""
    from huggingface_hub import CommitOperationAdd, constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    namespace = repo_id.split("/")[0]
    no_access = (
        f"push: the token of {user} may not write to {repo_id}; push to your namespace ({user}/"
        f"{repo_id.split('/')[1]}) or an organisation you may write to, or {LOGIN_FIX} with a token that has "
        f"write access to {namespace}"
    )
    step = "create the repository"
    try:
        api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        if revision not in (None, constants.DEFAULT_REVISION):
            step = f"create the branch {revision} in"
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        step = "upload the files to"
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    except (HFValidationError, RepositoryNotFoundError) as err:
        if isinstance(err, HFValidationError):
            raise UserError(f"push: {repo_id!r} is not a valid Hub repository id ({_why(err)})") from None
        raise UserError(no_access) from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        url = _request_url(err)
        to_hub = "/api/" in url or ".git/info/lfs" in url  # not the storage an upload URL points at
        if status == 401 and to_hub:
            raise UserError(
                f"push: the Hub did not accept the token of {user}; {LOGIN_FIX} with a valid write token"
            ) from None
        if status == 403 and to_hub:
            raise UserError(no_access) from None
        if status == 400 and "name" in _why(err).lower() and step == "create the repository":
            raise UserError(f"push: the Hub refused the repository id {repo_id!r}: {_why(err)}") from None
        raise UserError(f"push: could not {step} {repo_id} ({_why(err)}); {_UNCHANGED}") from None
    except ValueError as err:  # the client's own checks (README metadata, LFS batch errors)
        raise UserError(f"push: could not {step} {repo_id} ({_why(err)}); {_UNCHANGED}") from None
    except Exception as err:  # network failures: httpx errors are no OSError
        raise UserError(f"push: could not {step} {repo_id} ({_why(err)}); {_UNCHANGED}") from None


_UNCHANGED = "the repository is unchanged (a commit is all or nothing): push again"


def _why(err: BaseException) -> str:
    """Why ``err`` happened, on one line: the Hub's ``X-Error-Message`` with the status, from the
    error or the one it wraps (the client wraps a failed LFS upload in a RuntimeError), else the
    first lines of the error and of its innermost cause."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < 8:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in reversed(chain):
        response = getattr(error, "response", None)
        message = response.headers.get("X-Error-Message") if response is not None else None
        if message:
            return f"{getattr(response, 'status_code', '')} {message}".strip()
    texts = [_first(error) for error in (err, chain[-1])]
    return texts[0] if texts[0] == texts[1] else f"{texts[0]}: {texts[1]}"


def _first(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def _request_url(err: BaseException) -> str:
    try:
        return str(err.response.request.url)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for a response without its request
        return ""
