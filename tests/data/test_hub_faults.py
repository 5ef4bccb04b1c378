"""The Hub failing mid-stream: a local stand-in that fails as a network does, and the real client.

:class:`hub_server.Faults` makes a share of the file-content requests fail (500, 503, or the
connection cut halfway through the body) and starts whole-server outages: refused connections,
or 503 to every request. ``recipes/ade20k.yaml`` trains through them, with 0 and 2 DataLoader
workers, and is compared with a run on a healthy server: bitwise the same weights. The moment
of each fault is drawn at random; the draw is in every assertion's message.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, launch_command
from hub_replicas import serve_ade20k
from hub_server import Faults, HubServer
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Iterations of a run with the main-process reader: one pass over the replica's 24 train rows,
# read as the run goes (a few rows ahead), up to the last iteration's look-ahead.
MAX_ITERS = 12
# With 2 DataLoader workers, which read several iterations ahead: two passes, so that an outage
# drawn below still meets the train shards' reads (those of the second pass).
MAX_ITERS_WITH_WORKERS = 24
BUDGET_S = 2
# The final evaluation skips the confusion files: rendering a 150-class heatmap takes seconds
# and says nothing about the data's server (the metrics compared below stay).
OPTIONS = [
    "schedule.warmup_iters=1", "model.encoder.pretrained=false",
    "data.train.batch_size=2", "data.train.shuffle_buffer=8", "data.train.pipeline.scale=[64,32]",
    "data.train.pipeline.crop_size=[32,32]", "data.val.pipeline.scale=[64,32]",
    "data.val.num_workers=0", "hooks[0].interval=1", "hooks[1].confusion=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = HubServer()
    serve_ade20k(server, tmp_path_factory.mktemp("hub"))
    with server:
        yield server


@pytest.fixture(autouse=True)
def healthy_again(hub):
    """Each test starts and ends with a server that answers."""
    hub.faults = None
    yield
    hub.faults = None
    if hub.down is not None:
        hub.come_back()


def command(hub: HubServer, work_dir: Path, workers: int, *extra: str, processes: int = 1, port: int = 0,
            budget_s: float = BUDGET_S):  # fmt: skip
    args = ["-m", "hooktrain", "recipes/ade20k.yaml", "--work-dir", str(work_dir), *extra, "--cfg-options",
            *OPTIONS, f"train.max_iters={iterations(workers)}", f"data.train.num_workers={workers}",
            f"data.retry_budget_s={budget_s}"]  # fmt: skip
    if processes > 1:
        return launch_command(*args, port=port, processes=processes)
    return [sys.executable, *args]


def iterations(workers: int) -> int:
    return MAX_ITERS if workers == 0 else MAX_ITERS_WITH_WORKERS


def environment(hub: HubServer, work_dir: Path, processes: int = 1) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(work_dir.parent / f"{work_dir.name}-hf"), "HF_TOKEN": ""}  # fmt: skip
    return env | ({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if processes > 1 else {})


def train(hub: HubServer, work_dir: Path, workers: int, *extra: str, processes: int = 1, port: int = 0,
          budget_s: float = BUDGET_S):  # fmt: skip
    argv = command(hub, work_dir, workers, *extra, processes=processes, port=port, budget_s=budget_s)
    return subprocess.run(argv, cwd=ROOT,
                          env=environment(hub, work_dir, processes), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def healthy(hub, tmp_path_factory):
    """``healthy(workers, processes)``: the work dir of an uninterrupted run on a healthy server,
    and the number of file-content requests it made (run once per setting). Each runs against a
    server of its own that serves the same files, in the background once ``healthy.start(...)``
    started it: the outage tests whose runs surely meet the outage start theirs first, so that it
    trains while their run waits out the outage of ``hub``. (Not the flaky-Hub test: its run must
    read during an outage of a few seconds, which a run slowed down by another may not.)"""
    references = HealthyRuns(hub, tmp_path_factory)
    yield references
    references.close()


class HealthyRuns:
    def __init__(self, hub: HubServer, tmp_path_factory) -> None:
        self.hub, self.tmp_path_factory = hub, tmp_path_factory
        self.runs: dict[tuple[int, int], tuple[HubServer, Path, subprocess.Popen]] = {}
        self.done: dict[tuple[int, int], tuple[Path, int]] = {}

    def start(self, workers: int, processes: int = 1) -> None:
        if (workers, processes) in self.runs:
            return
        server = HubServer()
        for (repo_type, repo_id), repo in self.hub.repos.items():
            for revision, folder in repo.revisions.items():
                server.add(repo_id, folder, revision=revision, repo_type=repo_type)
        server.start()
        work_dir = self.tmp_path_factory.mktemp("healthy") / f"w{workers}p{processes}"
        with open(work_dir.parent / "output.txt", "w") as output:  # a file: nobody reads a pipe meanwhile
            process = subprocess.Popen(command(server, work_dir, workers, processes=processes, port=29881),
                                       cwd=ROOT, env=environment(server, work_dir, processes), stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.runs[workers, processes] = server, work_dir, process

    def __call__(self, workers: int, processes: int = 1) -> tuple[Path, int]:
        self.start(workers, processes)
        if (workers, processes) not in self.done:
            server, work_dir, process = self.runs[workers, processes]
            returncode = process.wait(timeout=600)
            server.stop()
            assert returncode == 0, (work_dir.parent / "output.txt").read_text()[-3000:]
            self.done[workers, processes] = work_dir, content_requests(server)
        return self.done[workers, processes]

    def close(self) -> None:
        for setting, (server, _, process) in self.runs.items():
            if setting not in self.done:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its ranks
                process.wait()
                server.stop()


def content_requests(hub: HubServer) -> int:
    return sum(1 for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path)


def assert_same_run(work_dir: Path, reference: Path, draw: str, workers: int) -> None:
    """The final checkpoint's weights are bitwise those of the reference run, and the final
    evaluation found the same metrics."""
    final = f"checkpoints/iter_{iterations(workers)}/model.safetensors"
    ours, theirs = load_file(work_dir / final), load_file(reference / final)
    assert ours.keys() == theirs.keys(), draw
    different = [name for name in ours if not ours[name].equal(theirs[name])]
    assert not different, (draw, different[:5])
    assert history(work_dir) == history(reference), draw


def history(work_dir: Path) -> dict[int, dict]:
    """Each iteration's train losses and validation metrics, from ``metrics.jsonl``."""
    found: dict[int, dict] = {}
    for line in (work_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        found.setdefault(record["iter"], {}).update(
            {k: v for k, v in record.items() if k.startswith("val/") or "loss" in k}
        )
    return found


def outage_warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if "retrying for up to" in line]


# With 2 DataLoader workers only: the main-process reader (0 workers) meets outages in the tests below.
@pytest.mark.parametrize("workers", [2])
def test_a_flaky_hub_trains_exactly_as_a_healthy_one(hub, healthy, tmp_path, workers):
    """15% of the content requests fail (500, 503, cut mid-body; at least one), and after a random iteration
    the server answers 503 to everything for 11-14 s, longer than huggingface_hub's own
    retries of a request (~10 s against a 503 with Retry-After: 1): the run ends exactly as
    the healthy one, with one warning and no traceback."""
    reference, requests = healthy(workers)
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    at_iter, outage_s = rng.randint(2, iterations(workers) - 4), rng.uniform(11, 14)
    # A run makes few content requests (a dozen or so): one of them always fails, so no draw
    # leaves the run without a fault.
    hub.faults = Faults(share=0.15, seed=seed, sure_at=rng.randint(1, requests))
    work_dir = tmp_path / "run"
    _, process = stop_serving_after(hub, at_iter, "503", command(hub, work_dir, workers, budget_s=120),
                                    environment(hub, work_dir), iterations(workers), seconds=outage_s,
                                    timeout=300)  # fmt: skip
    stdout, stderr = process.stdout, process.stderr
    draw = f"seed {seed}: 503 for {outage_s:.1f} s after iteration {at_iter}; {hub.faults.injected}"
    assert process.returncode == 0, (draw, stderr[-3000:])
    assert hub.faults.injected, draw
    assert_same_run(work_dir, reference, draw, workers)
    assert "Traceback" not in stdout + stderr and not stderr.strip(), (draw, stderr[-3000:])
    assert len(outage_warnings(stdout)) == 1, (draw, outage_warnings(stdout))
    assert "answers again after" in stdout, draw


@pytest.mark.parametrize(("workers", "outage"), [(0, "refused"), (2, "503")])
def test_an_outage_longer_than_the_budget_saves_and_resume_is_exact(hub, healthy, tmp_path, workers, outage):
    """The server goes away for good after a random iteration: the run saves its last whole
    iteration and exits with 75 and one line naming the Hub and the request, within the
    budget plus one request's own retries. With the server back, --resume ends bitwise where
    the uninterrupted run ended."""
    healthy.start(workers)  # trains while this run waits out the outage
    # Early enough that the main-process reader has a train shard to read before the last
    # iteration's look-ahead (with 2 workers, the second pass's reads come later).
    at_iter = random.randint(3, 6) if workers == 0 else random.randint(3, 9)
    draw = f"outage ({outage}) after iteration {at_iter}"
    work_dir = tmp_path / "run"
    went_down, process = stop_serving_after(hub, at_iter, outage, command(hub, work_dir, workers),
                                            environment(hub, work_dir), iterations(workers))  # fmt: skip
    ended = time.monotonic()
    stdout, stderr = process.stdout, process.stderr
    assert process.returncode == 75, (draw, stderr[-3000:])
    assert ended - went_down < BUDGET_S + 45, (draw, ended - went_down)
    line = one_error_line(stderr, draw)
    assert f"data.train.source: the Hub at {hub.url} failed for" in line, (draw, line)
    assert f"data.retry_budget_s={BUDGET_S} (GET {hub.url}/datasets/zhoubolei/scene_parse_150/resolve/" in line
    saved = int(re.search(r"stopped after iteration (\d+)", line)[1])
    assert at_iter < saved < iterations(workers), (draw, line)
    assert (work_dir / "checkpoints" / f"iter_{saved}" / "model.safetensors").is_file(), draw
    assert len(outage_warnings(stdout)) == 1, (draw, outage_warnings(stdout))

    hub.come_back()
    resumed = train(hub, work_dir, workers, "--resume")
    assert resumed.returncode == 0, (draw, resumed.stderr[-3000:])
    assert f"resumed from {work_dir / 'checkpoints' / f'iter_{saved}'} at iteration {saved}\n" in resumed.stdout
    reference, _ = healthy(workers)
    assert_same_run(work_dir, reference, draw, workers)


def test_an_outage_during_the_evaluation_saves_the_whole_iteration(hub, tmp_path):
    """The last iteration's batches are in hand when the server goes away; the evaluation that
    follows cannot read the validation split: the iteration is saved, exit code 75."""
    # A 503 outage: huggingface_hub gives up on a request after ~10 s of its own retries, against
    # ~23 s on refused connections (which the train source meets in the test above).
    work_dir = tmp_path / "run"
    _, process = stop_serving_after(hub, MAX_ITERS - 1, "503", command(hub, work_dir, 0),
                                    environment(hub, work_dir), MAX_ITERS)  # fmt: skip
    stderr = process.stderr
    assert process.returncode == 75, stderr[-3000:]
    line = one_error_line(stderr, "evaluation")
    assert f"data.val.source: the Hub at {hub.url} failed for" in line, line
    assert f"stopped after iteration {MAX_ITERS}, which the checkpoint hook saves" in line, line
    assert (work_dir / "checkpoints" / f"iter_{MAX_ITERS}" / "model.safetensors").is_file()
    # A requeue script tells this stop from a failure by the mark (docs/checkpoints.md).
    stopped = json.loads((work_dir / "stopped.json").read_text())
    assert (stopped["reason"], stopped["exit_code"], stopped["iteration"]) == ("data outage", 75, MAX_ITERS)
    assert stopped["checkpoint"] == f"iter_{MAX_ITERS}"


def test_ranks_stop_together_when_one_loses_its_data(hub, healthy, tmp_path):
    """Two processes: whichever rank meets the outage first, every rank stops after the same
    iteration (they agree on it with the loss check), the checkpoint is whole, and --resume
    with the server back ends bitwise where the uninterrupted two-process run ended."""
    healthy.start(0, processes=2)  # trains while this run waits out the outage
    at_iter = random.randint(3, 6)
    draw = f"outage (503) after iteration {at_iter}"
    work_dir = tmp_path / "run"
    _, process = stop_serving_after(hub, at_iter, "503", command(hub, work_dir, 0, processes=2, port=29882),
                                    environment(hub, work_dir, processes=2), MAX_ITERS, timeout=180)  # fmt: skip
    stderr = process.stderr
    assert process.returncode != 0, draw
    errors = [line for line in stderr.splitlines() if line.startswith(("hooktrain: error:", "[rank"))]
    assert len(errors) == 1 and "the Hub at" in errors[0], (draw, errors, stderr[-3000:])
    saved = int(re.search(r"stopped after iteration (\d+)", errors[0])[1])
    # torchrun exits with 1 when a rank did not exit with 0, and lists each rank's exit code
    # (a rank still exiting when another has ended may be sent SIGTERM instead).
    assert "75" in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr), (draw, stderr[-2000:])
    assert (work_dir / "checkpoints" / f"iter_{saved}" / "model.safetensors").is_file(), draw

    hub.come_back()
    resumed = train(hub, work_dir, 0, "--resume", processes=2, port=29883)
    assert resumed.returncode == 0, (draw, resumed.stderr[-3000:])
    reference, _ = healthy(0, processes=2)
    assert_same_run(work_dir, reference, draw, 0)


def stop_serving_after(hub: HubServer, at_iter: int, outage: str, argv: list[str], env: dict, max_iters: int,
                       seconds: float = float("inf"), timeout: float = 120):  # fmt: skip
    """Run ``argv`` (``max_iters`` iterations); when its log reports iteration ``at_iter``, take the server down for
    ``seconds``. Returns when it went down and the finished process (its whole output)."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if f" iter {at_iter}/{max_iters} " in line:
            hub.go_down(outage, seconds)
            went_down = time.monotonic()
            break
    else:
        process.wait()
        raise AssertionError(f"the run ended before iteration {at_iter}: {process.stderr.read()[-3000:]}")
    out, err = process.communicate(timeout=timeout)
    return went_down, subprocess.CompletedProcess(argv, process.returncode, "".join(lines) + out, err)


def one_error_line(stderr: str, draw: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("hooktrain: error: "), (draw, stderr[-3000:])
    assert "Traceback" not in stderr, draw
    return lines[0]
