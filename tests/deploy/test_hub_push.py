"""``hooktrain push`` and loading back from ``hf://`` ids, through huggingface_hub's real client
against the local Hub stand-in (tests/hub_server.py) over HTTP.

One tiny quickstart run (4 iterations, evaluated at 2 and 4, ``best/`` kept) is trained once and
pushed once for the module; the tests read what the stand-in holds and load it back.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import QUICKSTART, assert_refused, cli, run_cli, tiny

WRITE, READ_ONLY, BOB = "hf_write_alice", "hf_read_alice", "hf_write_bob"
REPO = "alice/shapes-fpn"
HOOKS = ("hooks=[{type: logger, interval: 1}, {type: eval, interval: 2, num_samples: 0}, "
         "{type: checkpoint, interval: 2, save_best: mIoU}]")  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root) -> Path:
    """A 4-iteration quickstart run: checkpoints iter_2, iter_4 and best/, metrics.jsonl."""
    work_dir = tmp_path_factory.mktemp("push_run") / "run"
    result = run_cli(str(QUICKSTART), "--work-dir", str(work_dir), "--cfg-options", *tiny(data_root, 4), HOOKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work_dir / "checkpoints" / "best" / "best.json").is_file()
    return work_dir


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The stand-in with alice's write and read-only tokens and bob's write token, and
    huggingface_hub pointed at it (no Xet: the stand-in offers none; no progress bars)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    from hub_server import HubServer

    root = tmp_path_factory.mktemp("push_hub")
    server = HubServer(root / "server")
    server.add_token(WRITE, "alice")
    server.add_token(READ_ONLY, "alice", write=False)
    server.add_token(BOB, "bob")
    patch = pytest.MonkeyPatch()
    patch.setattr(constants, "ENDPOINT", server.url)
    patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    patch.setattr(constants, "HF_HUB_OFFLINE", False)
    patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    patch.setattr(constants, "HF_HOME", str(root / "hf_home"))
    patch.setattr(constants, "HF_HUB_CACHE", str(root / "hf_home" / "hub"))
    patch.setattr(constants, "HF_TOKEN_PATH", str(root / "hf_home" / "token"))  # no saved login leaks in
    patch.setenv("HF_TOKEN", WRITE)
    disable_progress_bars()
    with server:
        yield server
    enable_progress_bars()
    patch.undo()


def env(hub, root: Path, token: str = WRITE) -> dict[str, str]:
    """The environment of a subprocess talking to the stand-in."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
            "HF_HOME": str(root / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip


def main(*argv) -> tuple[int, str, str]:
    """``hooktrain ARGV`` in this process (for module fixtures, which have no capsys)."""
    from hooktrain.cli import main as hooktrain_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        hooktrain_main([str(a) for a in argv])
    return exit_info.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pushed(run, hub):
    """``hooktrain push RUN alice/shapes-fpn --private --commit-message ...`` (the best checkpoint)."""
    code, out, err = main("push", run, REPO, "--private", "--commit-message", "first shapes model")
    assert code == 0, (out, err)
    return hub.repo(REPO)


@pytest.fixture(scope="module")
def local_export(run, tmp_path_factory) -> Path:
    from hooktrain.deploy.export import export_checkpoint

    return export_checkpoint(run / "checkpoints" / "best", tmp_path_factory.mktemp("export") / "model.safetensors")


def same_export(data: bytes, file: Path) -> bool:
    """Whether ``data`` holds the tensors and metadata of the exported ``file`` (safetensors
    writes its metadata in a per-process order, so the bytes may differ)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load, load_file

    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    ours, theirs = load(data), load_file(file)
    same_tensors = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    return same_tensors and header["__metadata__"] == metadata


def test_push_uploads_the_model_recipe_metrics_curves_and_card(pushed, run, local_export, hub):
    files = pushed.files()
    assert set(files) == {".gitattributes", "model.safetensors", "recipe.yaml", "metrics.jsonl", "metrics.json",
                          "best.json", "training_curves.png", "README.md"}  # fmt: skip
    assert same_export(files["model.safetensors"], local_export)  # what `hooktrain export` writes
    assert files["recipe.yaml"] == (run / "checkpoints" / "best" / "recipe.yaml").read_bytes()
    assert files["metrics.jsonl"] == (run / "metrics.jsonl").read_bytes()
    assert files["training_curves.png"].startswith(b"\x89PNG\r\n\x1a\n")
    best = json.loads(files["best.json"])
    shown = json.loads(files["metrics.json"])
    assert shown["iter"] == best["iter"] and shown["metrics"]["mIoU"] == pytest.approx(best["value"])
    # --private and --commit-message reached the server; the large files went over LFS (PUT to the upload URLs)
    commit = next(c for c in pushed.commits if c["summary"] == "first shapes model")
    assert pushed.private and commit["revision"] == "main" and commit["sha"] in pushed.history
    assert sorted(commit["files"]) == sorted(set(files) - {".gitattributes"})  # one commit
    puts = [path for method, path, _ in hub.requests if method == "PUT"]
    assert puts and all(path.startswith("/_lfs-upload/") for path in puts)

    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "hooktrain" and front["pipeline_tag"] == "image-segmentation"
    assert front["tags"] == ["image-segmentation", "hooktrain"]
    result = front["model-index"][0]["results"][0]
    values = {metric["type"]: metric["value"] for metric in result["metrics"]}
    assert values["mIoU"] == round(100 * best["value"], 2) and {"mDice", "mFscore", "aAcc"} <= set(values)
    assert f"| mIoU | {100 * best['value']:.2f} |" in card
    assert "| class | IoU | Dice | Fscore | Acc | Precision | Recall |" in card
    for name in ("background", "circle", "square", "triangle", "cross"):
        assert f"\n| {name} | " in card
    assert "![Training curves](training_curves.png)" in card
    assert f'Segmenter.from_pretrained("{REPO}")' in card
    assert f"hooktrain predict hf://{REPO} images/" in card and f"load_from: hf://{REPO}" in card
    assert f"pretrained_path: hf://{REPO}" in card


def test_from_pretrained_and_predict_hf_give_the_local_exports_labels(pushed, local_export, tmp_path, capsys):
    import cv2

    from hooktrain import Segmenter

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    expected = Segmenter.load(local_export, device="cpu")(image)
    assert np.array_equal(Segmenter.from_pretrained(REPO, device="cpu")(image), expected)
    assert np.array_equal(Segmenter.from_pretrained(f"hf://{REPO}@main", device="cpu")(image), expected)

    cv2.imwrite(str(tmp_path / "photo.png"), image[..., ::-1])
    result = cli(capsys, "predict", f"hf://{REPO}", tmp_path / "photo.png", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(cv2.imread(str(tmp_path / "out" / "photo_label.png"), cv2.IMREAD_UNCHANGED), expected)
    assert_refused(cli(capsys, "predict", "hf://alice/absent", tmp_path / "photo.png", "--out", tmp_path / "o"),
                   "hf://alice/absent not found")  # fmt: skip


def test_hub_ids_that_do_not_resolve_end_in_one_line(pushed, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hooktrain import Segmenter
    from hooktrain.errors import UserError

    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "README.md").write_text("no weights here")
    hub.add("alice/no-weights", tmp_path / "card", repo_type="model")
    for repo_id, revision, said in ((REPO, "nope", "revision nope not found"),
                                    ("hf://no-namespace", None, "not a Hub model id"),
                                    ("alice/no-weights", None, "has no model.safetensors")):  # fmt: skip
        with pytest.raises(UserError, match=said):
            Segmenter.from_pretrained(repo_id, revision=revision)
    Segmenter.from_pretrained(REPO)  # in the cache now
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert Segmenter.from_pretrained(REPO, device="cpu").recipe.data.num_classes == 5  # offline: the cached file
    with pytest.raises(UserError, match="offline or unreachable and model.safetensors is not in the local cache"):
        Segmenter.from_pretrained(REPO, revision="iter-0")


def test_pretrained_path_hf_loads_the_pushed_encoder(pushed, local_export, data_root):
    import torch
    from safetensors.torch import load_file

    from hooktrain.models import build_recipe_segmentor
    from hooktrain.recipe.schema import load_recipe

    recipe = load_recipe(QUICKSTART, [*tiny(data_root), f"model.encoder.pretrained_path=hf://{REPO}"])
    from hooktrain.engine.preflight import check_files

    check_files(recipe)  # the id resolves before anything is built
    encoder = build_recipe_segmentor(recipe).encoder.state_dict()
    exported = {k.removeprefix("encoder."): v for k, v in load_file(local_export).items() if k.startswith("encoder.")}
    assert exported.keys() == encoder.keys()
    assert all(torch.equal(exported[key], encoder[key]) for key in exported)


def test_load_from_hf_starts_a_run_from_the_pushed_weights(pushed, hub, data_root, tmp_path):
    result = run_cli(str(QUICKSTART), "--work-dir", str(tmp_path / "run"), "--cfg-options", *tiny(data_root, 1),
                     "hooks=[{type: logger, interval: 1}]", f"load_from=hf://{REPO}",
                     env=env(hub, tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = [line for line in result.stdout.splitlines() if "loaded weights from" in line]  # the run's log
    assert loaded and "models--alice--shapes-fpn" in loaded[0], result.stdout[-3000:]


def test_revision_goes_to_its_own_branch_and_main_stays(pushed, run, hub, capsys, tmp_path):
    main_sha, main_files = pushed.sha("main"), pushed.files("main")
    result = cli(capsys, "push", run, REPO, "--revision", "iter-2", "--checkpoint", "iter_2")
    assert result.returncode == 0, result.stderr
    assert pushed.sha("main") == main_sha and pushed.files("main") == main_files
    branch = pushed.files("iter-2")
    assert json.loads(branch["metrics.json"])["iter"] == 2 and branch["best.json"] == main_files["best.json"]
    assert pushed.commits[-1]["revision"] == "iter-2"
    assert pushed.commits[-1]["summary"] == "Upload hooktrain model (iter_2 of run)"
    assert "hf://alice/shapes-fpn@iter-2" in branch["README.md"].decode()

    from hooktrain import Segmenter
    from hooktrain.deploy.export import export_checkpoint

    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    local = export_checkpoint(run / "checkpoints" / "iter_2", tmp_path / "iter_2.safetensors")
    expected = Segmenter.load(local, device="cpu")(image)
    assert np.array_equal(Segmenter.from_pretrained(REPO, revision="iter-2", device="cpu")(image), expected)


def test_a_failed_upload_leaves_the_repository_as_it_was(pushed, run, hub, capsys):
    import urllib.error
    import urllib.request

    best_iter = json.loads((run / "checkpoints" / "best" / "best.json").read_text())["iter"]
    other = "iter_2" if best_iter != 2 else "iter_4"  # other weights: model.safetensors must be uploaded again
    before, sha, commits = pushed.files(), pushed.sha("main"), len(pushed.commits)
    for fault, said in (("lfs-put", "403 AccessDenied"), ("commit", "500 Internal Error")):
        hub.write_faults = {fault}
        try:
            line = assert_refused(cli(capsys, "push", run, REPO, "--checkpoint", other), said, "unchanged")
        finally:
            hub.write_faults = set()
        assert pushed.files() == before and pushed.sha("main") == sha and len(pushed.commits) == commits, line

    # A commit naming an LFS object never uploaded is refused whole: the regular file in it is not applied.
    lines = [{"key": "header", "value": {"summary": "half a commit"}},
             {"key": "file", "value": {"path": "notes.txt", "content": "aGk=", "encoding": "base64"}},
             {"key": "lfsFile", "value": {"path": "x.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 2048}}]
    request = urllib.request.Request(
        f"{hub.url}/api/models/{REPO}/commit/main", method="POST", headers={"Authorization": f"Bearer {WRITE}"},
        data=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 422 and "never uploaded" in refused.value.headers["X-Error-Message"]
    assert pushed.files() == before and pushed.sha("main") == sha and len(pushed.commits) == commits


def test_tokens_ids_and_sources_are_refused_in_one_line(run, hub, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert_refused(cli(capsys, "push", empty, REPO), "holds no checkpoint", "train it first")
    assert_refused(cli(capsys, "push", run, "shapes-fpn"), "not a valid Hub repository id", "OWNER/NAME")
    assert_refused(cli(capsys, "push", run, REPO, "--checkpoint", "iter_7"), "no checkpoint iter_7", "iter_2")
    monkeypatch.setenv("HF_TOKEN", READ_ONLY)
    assert_refused(cli(capsys, "push", run, REPO), "read-only", "HF_TOKEN", "hf auth login")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    assert_refused(cli(capsys, "push", run, REPO), "invalid or expired", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", BOB)  # a write token, but alice's namespace is not bob's
    assert_refused(cli(capsys, "push", run, "alice/bobs-model"), "bob may not write to alice/bobs-model",
                   "bob/bobs-model")  # fmt: skip
    assert hub.repo("alice/bobs-model") is None
    monkeypatch.delenv("HF_TOKEN")
    assert_refused(cli(capsys, "push", run, REPO), "no Hugging Face token", "HF_TOKEN", "hf auth login")
