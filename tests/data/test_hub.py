"""Hub sources through huggingface_hub's real HTTP client, against a local Hub stand-in.

``HF_ENDPOINT`` points the client at :class:`hub_server.HubServer`, which serves replicas of
real repositories (``hub_replicas``). Everything runs in subprocesses: the client reads
``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` once, at import, and this test process is offline.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_cli
from hub_replicas import (
    ADE20K_ID,
    CITYSCAPES_ID,
    PARQUET_REVISION,
    VOC_ID,
    serve_ade20k,
    write_cityscapes_replica,
    write_voc_replica,
)
from hub_server import HubServer

TOKEN = "hf_local_test_token"
TINY_ADE = [
    "train.max_iters=2", "schedule.warmup_iters=1", "model.encoder.pretrained=false",
    "data.train.batch_size=2", "data.train.num_workers=2", "data.train.shuffle_buffer=8",
    "data.train.pipeline.scale=[64,32]", "data.train.pipeline.crop_size=[32,32]",
    "data.val.pipeline.scale=[64,32]", "data.val.num_workers=0", "hooks.1.confusion=false",
]  # fmt: skip


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The local Hub: the ADE20K replica, plus gated and private copies of its scene_parsing
    configuration that only ``TOKEN`` may read."""
    server = HubServer()
    root = tmp_path_factory.mktemp("hub")
    serve_ade20k(server, root)
    scene_parsing = root / "parquet" / "scene_parsing"
    server.add("acme/gated-ade", scene_parsing, gated=True, token=TOKEN)
    server.add("acme/private-ade", scene_parsing, private=True, token=TOKEN)
    server.add(CITYSCAPES_ID, write_cityscapes_replica(root / "cityscapes"))
    server.add(VOC_ID, write_voc_replica(root / "voc"))
    with server:
        yield server


def hub_env(hub: HubServer, tmp_path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "", **extra}  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_ade20k_recipe_trains_and_validates_through_the_hub_client(hub, tmp_path):
    """recipes/ade20k.yaml unchanged except the endpoint: it streams the parquet conversion's
    scene_parsing rows over HTTP (Range requests), with DataLoader workers."""
    hub.requests.clear()
    result = run_cli("recipes/ade20k.yaml", "--work-dir", str(tmp_path / "run"), "--cfg-options",
                     *TINY_ADE, env=hub_env(hub, tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "validation at iter 2 on 8 images" in output  # scene_parsing/validation's 8 rows
    assert (tmp_path / "run" / "checkpoints" / "iter_2" / "model.safetensors").is_file()
    reads = [(path, byte_range) for method, path, byte_range in hub.requests
             if method == "GET" and "/resolve/" in path]  # fmt: skip
    files = {path.split("/", 6)[-1] for path, _ in reads}
    assert {"scene_parsing/train/0000.parquet", "scene_parsing/train/0001.parquet",
            "scene_parsing/validation/0000.parquet"} <= files  # fmt: skip
    assert not [f for f in files if "instance_segmentation" in f]
    assert all(byte_range for _, byte_range in reads), "parquet files are read by byte ranges"


PROBE = """
import json, sys
from hooktrain.recipe.data import HubSource
from hooktrain.data.sources import load_source
from hooktrain.errors import UserError
found = {}
for case, options in json.loads(sys.argv[1]).items():
    try:
        ds = load_source(HubSource(**options), where="data.train.source")
        found[case] = sum(1 for _ in ds)
    except UserError as exc:
        found[case] = str(exc)
print(json.dumps(found))
"""


def probe(cases: dict, env: dict) -> dict:
    """Load each case's Hub source in one fresh process: the row count, or the error line."""
    import os

    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


_parquet = {"path": ADE20K_ID, "revision": PARQUET_REVISION}
# The Hub sources the next test loads: each case's row count, or its one-line error.
FAILURE_CASES = {
    "ok": {**_parquet, "data_dir": "scene_parsing", "split": "validation"},
    "downloaded": {
        **_parquet,
        "data_dir": "scene_parsing",
        "split": "validation",
        "streaming": False,
    },  # fmt: skip
    "data_files": {
        **_parquet,
        "data_files": {"validation": "scene_parsing/validation/*.parquet"},
        "split": "validation",
    },  # fmt: skip
    "bare_id": {"path": "scene_parse_150"},
    "config_by_name": {**_parquet, "name": "scene_parsing"},
    "no_data_dir": {**_parquet, "split": "validation"},
    "wrong_data_dir": {**_parquet, "data_dir": "scene_parse"},
    "script_only": {"path": ADE20K_ID},
    "split": {**_parquet, "data_dir": "scene_parsing", "split": "valid"},
    "revision": {"path": ADE20K_ID, "revision": "refs/convert/parquett"},
    "no_such_repo": {"path": "acme/nothing-here"},
    "gated": {"path": "acme/gated-ade", "split": "validation"},
    "private": {"path": "acme/private-ade", "split": "validation"},
}


def recipe_cases() -> dict[str, dict]:
    """The Hub sources of the Cityscapes and VOC recipes' train and val splits."""
    from hooktrain.recipe.schema import load_recipe

    cases = {}
    for recipe in ("cityscapes", "voc12aug"):
        data = load_recipe(ROOT / "recipes" / f"{recipe}.yaml").data
        for split in ("train", "val"):
            source = getattr(data, split).source
            cases[f"{recipe} {split}"] = source.model_dump(exclude={"type"})
    return cases


@pytest.fixture(scope="module")
def probed(hub, tmp_path_factory) -> dict:
    """Every case of FAILURE_CASES and of :func:`recipe_cases`, loaded without a token in one
    fresh process (a process start less than a probe per test)."""
    return probe({**FAILURE_CASES, **recipe_cases()}, hub_env(hub, tmp_path_factory.mktemp("probe")))


def test_hub_source_failures_each_end_in_one_line_naming_the_fix(hub, tmp_path, probed):
    cases = FAILURE_CASES
    found = {case: probed[case] for case in cases}
    assert found["ok"] == found["downloaded"] == found["data_files"] == 8
    for case, message in found.items():
        assert isinstance(message, int) or "\n" not in message, case
    assert (
        "'namespace/name'" in found["bare_id"] and "'zhoubolei/scene_parse_150'" in found["bare_id"]
    )
    for case in ("config_by_name", "no_data_dir", "wrong_data_dir"):
        assert "data_dir" in found[case], found[case]
        assert "['instance_segmentation', 'scene_parsing']" in found[case], found[case]
    assert "loading script" in found["script_only"]
    assert f"revision: {PARQUET_REVISION}" in found["script_only"]
    assert "data_dir: one of ['instance_segmentation', 'scene_parsing']" in found["script_only"]
    assert "did you mean 'validation'" in found["split"]
    assert "['train', 'validation', 'test']" in found["split"]
    assert "data.train.source.revision: 'refs/convert/parquett' does not exist" in found["revision"]
    assert "set HF_TOKEN" in found["no_such_repo"]
    assert "gated" in found["gated"] and "set HF_TOKEN" in found["gated"]
    assert "set HF_TOKEN" in found["private"]

    with_token = probe({k: cases[k] for k in ("gated", "private")},
                       hub_env(hub, tmp_path, HF_TOKEN=TOKEN))  # fmt: skip
    assert with_token == {"gated": 8, "private": 8}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "env", "options", "expected"),
    [
        ("bare id", {}, ["data.train.source.path=scene_parse_150"], "'zhoubolei/scene_parse_150'"),
        ("unreachable", {"HF_ENDPOINT": "http://127.0.0.1:{port}"}, [], "cannot reach the Hub"),
        ("offline", {"HF_HUB_OFFLINE": "1"}, [], "HF_HUB_OFFLINE is set"),
    ],
)
def test_cli_hub_errors_are_one_line_and_exit_2(hub, tmp_path, case, env, options, expected):
    env = {key: value.format(port=closed_port()) for key, value in env.items()}
    started = time.monotonic()
    result = run_cli("recipes/ade20k.yaml", "--work-dir", str(tmp_path / "run"), "--cfg-options",
                     *TINY_ADE, *options, env=hub_env(hub, tmp_path, **env))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and expected in lines[0], lines
    assert lines[0].startswith("hooktrain: error: data.train.source")
    if case != "bare id":
        assert "{type: folder}" in lines[0] and "hooktrain data convert" in lines[0]
    assert time.monotonic() - started < 60, "no half-minute of retries before the error"


CLIENT = """
import json, sys
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
repo, rev, name = sys.argv[1], sys.argv[2], sys.argv[3]
fs = HfFileSystem()
base = f"datasets/{repo}@{rev.replace('/', '%2F')}"
with fs.open(f"{base}/{name}", "rb") as f:
    f.seek(100)
    middle = f.read(50).hex()
print(json.dumps({
    "info": fs.info(f"{base}/{name}")["size"],
    "paths_info": [p.path for p in HfApi().get_paths_info(repo, [name, "nope"], revision=rev,
                                                           repo_type="dataset")],
    "glob": sorted(fs.glob(f"{base}/*/validation/*.parquet")),
    "middle": middle,
    "download": open(hf_hub_download(repo, name, revision=rev, repo_type="dataset"), "rb")
    .read().hex(),
}))
"""


def test_the_stand_in_answers_huggingface_hub_as_the_hub_does(hub, tmp_path):
    """HfFileSystem info/glob/seek+read, paths-info and hf_hub_download against the files."""
    import os

    name = "scene_parsing/validation/0000.parquet"
    result = subprocess.run([sys.executable, "-c", CLIENT, ADE20K_ID, PARQUET_REVISION, name],
                            env={**os.environ, **hub_env(hub, tmp_path)}, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    data = (hub.repos[("dataset", ADE20K_ID)].revisions[PARQUET_REVISION] / name).read_bytes()
    assert found["info"] == len(data) and found["paths_info"] == [name]
    assert found["middle"] == data[100:150].hex() and found["download"] == data.hex()
    assert [g.rsplit("/", 3)[-3] for g in found["glob"]] == [
        "instance_segmentation",
        "scene_parsing",
    ]


def test_data_check_streams_the_ade20k_recipe_through_the_hub_client(hub, tmp_path):
    """`hooktrain data check recipes/ade20k.yaml`, unchanged but for the endpoint: the Hub
    columns (scene_category included), the labels 0..150 that reduce_zero_label expects."""
    env = hub_env(hub, tmp_path)
    result = run_cli("data", "check", "recipes/ade20k.yaml", "--limit", "6", env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "scene_category" in result.stdout and "ClassLabel" in result.stdout
    assert "6 examples read, 6 decoded, 0 corrupt" in result.stdout
    wrong = run_cli("data", "check", "recipes/ade20k.yaml", "--split", "val", "--limit", "4",
                    "--cfg-options", "data.reduce_zero_label=false", env=env)  # fmt: skip
    assert wrong.returncode == 2 and "reduce_zero_label is probably wanted" in wrong.stdout
    assert error_lines(wrong)[-1].startswith("hooktrain: error: data check of data.val.source")


def test_cityscapes_and_voc_recipes_read_their_hub_sources(hub, tmp_path, probed):
    """The recipes' Hub sources (ids, split names, columns) open through the client on
    replicas of the repositories, and Cityscapes' labelIds pass data check with its label_map."""
    cases = recipe_cases()
    assert {case: probed[case] for case in cases} == {case: 4 for case in cases}
    checked = run_cli("data", "check", "recipes/cityscapes.yaml", "--split", "val", "--limit", "4",
                      env=hub_env(hub, tmp_path))  # fmt: skip
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    assert "semantic_segmentation" in checked.stdout
