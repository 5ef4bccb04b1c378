"""Two "machines" on one host: two ``accelerate launch`` processes with ``--num_machines 2``
and one CPU process each (gloo over 127.0.0.1), started by the real
``examples/slurm/train.sbatch`` with stand-ins for ``scontrol`` (records a requeue) and
``srun`` (starts each node's task in its own session, as on its own machine). They train as
one machine with two processes does; SIGTERM to one machine stops both with a checkpoint and
``stopped.json``, the script requeues and the next attempt resumes exactly; a rank killed
with ``kill -9`` ends the other machine without a hang and without a requeue. The script
requeues exactly when the run left ``stopped.json``, whatever the launchers' exit status
(docs/checkpoints.md, "Requeue on a preemptible cluster")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from checkpoint_runs import ITERS, assert_bitwise_equal, options, train_command, weights
from conftest import ENV, QUICKSTART, ROOT

from hooktrain.checkpoint.workdir import claim_work_dir
from hooktrain.errors import UserError

SCRIPT = ROOT / "examples" / "slurm" / "train.sbatch"
JOB_ID = "4242"
TIMEOUT_S = 40  # train.collective_timeout of the kill -9 run (its end comes long before)

SRUN = r"""#!/bin/bash
# Stand-in for srun: one task per node, each in its own session as on its own machine.
echo "srun $*" >> "$STUB_DIR/calls"
while [[ $1 == -* ]]; do shift; done  # srun's own options
if [ -n "$STUB_EXIT" ]; then  # run nothing: the step ends with STUB_EXIT, leaving STUB_WRITES
    [ -z "$STUB_WRITES" ] || echo '{"reason": "SIGTERM"}' > "$STUB_WRITES"
    exit "$STUB_EXIT"
fi
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    SLURM_NODEID=$node setsid "$@" > "$STUB_DIR/node$node.log" 2>&1 &
    pids[node]=$!
    echo $! > "$STUB_DIR/node$node.pid"
done
status=0
for node in "${!pids[@]}"; do
    wait "${pids[node]}"
    code=$?
    echo "$code" > "$STUB_DIR/node$node.exit"
    [ "$code" -gt "$status" ] && status=$code
done
exit "$status"
"""
SCONTROL = r"""#!/bin/bash
# Stand-in for scontrol: the allocation's hosts, and a record of every call (a requeue).
echo "scontrol $*" >> "$STUB_DIR/calls"
[ "$1 $2" != "show hostnames" ] || printf '%s\n' $STUB_HOSTS
"""


class Job:
    """One attempt of the batch script with the stand-ins, in its own directory."""

    def __init__(self, root: Path, work_dir: Path, port: int | None = None, **stub_env: str) -> None:
        self.dir = root
        root.mkdir(parents=True)
        for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (root / name).write_text(text)
            (root / name).chmod(0o755)
        self.env = {
            **os.environ, **ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PATH": os.pathsep.join([str(root), str(Path(sys.executable).parent), os.environ["PATH"]]),
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
            "STUB_DIR": str(root), "STUB_HOSTS": "127.0.0.1 127.0.0.1", "WORK_DIR": str(work_dir),
            **stub_env,
        }  # fmt: skip
        for name in ("RECIPE", "GPUS_PER_NODE", "MAIN_PROCESS_PORT"):  # the script's own defaults
            self.env.pop(name, None)
        if port is not None:  # a real run: two one-process machines
            self.env.update(RECIPE=str(QUICKSTART), GPUS_PER_NODE="1", MAIN_PROCESS_PORT=str(port))
        self.process: subprocess.Popen | None = None

    def start(self, *args: str) -> Job:
        """Start the script with ``args`` (hooktrain's own), as ``sbatch SCRIPT ARGS`` does."""
        self.started = time.time()
        with open(self.dir / "script.log", "w") as out:
            self.process = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, env=self.env,
                                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        return self

    def wait(self, timeout: float = 300) -> int:
        return self.process.wait(timeout=timeout)

    def run(self, *args: str) -> int:
        return self.start(*args).wait()

    def requeued(self) -> bool:
        return f"scontrol requeue {JOB_ID}" in self.calls()

    def calls(self) -> list[str]:
        return (self.dir / "calls").read_text().splitlines()

    def node_log(self, node: int) -> str:
        return (self.dir / f"node{node}.log").read_text()

    def node_exits(self) -> list[int]:
        return [int((self.dir / f"node{node}.exit").read_text()) for node in (0, 1)]

    def output(self) -> str:
        """Everything the script and both machines printed, for assertion messages."""
        logs = [self.dir / "script.log", *(self.dir / f"node{n}.log" for n in (0, 1))]
        return "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())

    def wait_for(self, node: int, text: str, timeout: float = 240) -> None:
        """Wait until machine ``node`` has printed ``text``."""
        log = self.dir / f"node{node}.log"
        deadline = time.monotonic() + timeout
        while not (log.exists() and text in log.read_text()):
            assert self.process.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def launcher(self, node: int) -> int:
        """The PID of machine ``node``'s ``accelerate launch``, leader of its session."""
        return int((self.dir / f"node{node}.pid").read_text())

    def kill(self) -> None:
        """End what a failed test left running: the script, the launchers and their ranks
        (in sessions of their own)."""
        if self.process is None:
            return
        pids = [self.process.pid, *(self.launcher(n) for n in (0, 1) if (self.dir / f"node{n}.pid").exists())]
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if process.create_time() < self.started - 1:
                    continue  # the PID of one that ended, given to another process since
                for each in [*process.children(recursive=True), process]:
                    each.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def jobs():
    """Collects the test's jobs and kills whatever of them is still running at its end."""
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


def val_metrics(work_dir: Path) -> dict[int, dict[str, float]]:
    """The validation metrics of every evaluation in the run's history, by iteration."""
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {row["iter"]: {k: v for k, v in row.items() if k.startswith("val/")}
            for row in rows if any(k.startswith("val/") for k in row)}  # fmt: skip


def stopped_iteration(work_dir: Path) -> int:
    return int((work_dir / "checkpoints" / "latest").read_text().strip().removeprefix("iter_"))


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory, data_root) -> Path:
    """The reference: one machine with two processes (eval every 3, checkpoints every 2), one
    thread each as on the two machines."""
    work_dir = tmp_path_factory.mktemp("one_machine") / "run"
    command = train_command(work_dir, "--cfg-options", *options(data_root), processes=2, port=29871)
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return work_dir


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory, data_root) -> tuple[Path, Job]:
    """The same run on two machines of one process each, submitted with the batch script."""
    root = tmp_path_factory.mktemp("two_machines")
    job = Job(root / "job", root / "run", port=29872)
    try:
        assert job.run("--cfg-options", *options(data_root)) == 0, job.output()
    finally:
        job.kill()
    return root / "run", job


@pytest.mark.slow  # real runs of 4 processes: 50 to 100 s on 2 shared cores
def test_two_machines_train_as_one_machine_with_two_processes(one_machine, two_machines):
    work_dir, job = two_machines
    assert job.node_exits() == [0, 0] and not job.requeued(), job.output()
    assert not (work_dir / "stopped.json").exists()  # a finished run leaves no mark
    assert "--num_machines 2 --num_processes 2" in job.calls()[1]
    assert_bitwise_equal(weights(work_dir / "checkpoints" / f"iter_{ITERS}"),
                         weights(one_machine / "checkpoints" / f"iter_{ITERS}"))  # fmt: skip
    metrics = val_metrics(work_dir)
    assert sorted(metrics) == [3, 6] and "val/mIoU" in metrics[6]
    assert metrics == val_metrics(one_machine)
    best = [json.loads((w / "checkpoints" / "best" / "best.json").read_text()) for w in (work_dir, one_machine)]
    assert best[0] == best[1]


@pytest.mark.slow  # real runs of 4 processes: 50 to 100 s on 2 shared cores
def test_sigterm_to_one_machine_stops_both_and_the_requeued_job_resumes_exactly(
    tmp_path, data_root, two_machines, jobs
):
    """As Slurm's --signal=TERM does to one node's step (here machine 1's process group
    only): both machines save the same iteration, the main process on machine 0 writes
    stopped.json, the script requeues, and the next attempt ends as the uninterrupted run."""
    work_dir = tmp_path / "run"
    slow = "{type: 'probe_hooks:ProbeHook', prefix: '" + str(tmp_path / "p") + "', sleep: 0.5}"
    job = Job(tmp_path / "attempt1", work_dir, port=29873)
    jobs.append(job.start("--cfg-options", *options(data_root, hooks=slow)))
    job.wait_for(0, f"iter 2/{ITERS}")
    os.killpg(job.launcher(1), signal.SIGTERM)
    assert job.wait() == 0 and job.requeued(), job.output()
    # Machine 1's launcher was signalled itself (128 + SIGTERM); machine 0's saw its rank
    # exit with 143 and reports a failure, as torch elastic does for any nonzero exit.
    assert job.node_exits() == [1, 143], job.output()
    assert "exitcode  : 143" in job.node_log(0), job.output()
    stopped = stopped_iteration(work_dir)
    assert 2 <= stopped < ITERS, job.output()
    assert f"SIGTERM received: stopping after iteration {stopped}, then exit code 143" in job.node_log(0)
    mark = json.loads((work_dir / "stopped.json").read_text())
    assert {k: mark[k] for k in ("reason", "exit_code", "iteration", "checkpoint")} == {
        "reason": "SIGTERM", "exit_code": 143, "iteration": stopped, "checkpoint": f"iter_{stopped}"
    }  # fmt: skip
    saved = {p.name for p in (work_dir / "checkpoints" / f"iter_{stopped}").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "data_state_rank0.pt", "data_state_rank1.pt"} <= saved

    requeued = Job(tmp_path / "attempt2", work_dir, port=29874)
    jobs.append(requeued)
    assert requeued.run("--cfg-options", *options(data_root)) == 0, requeued.output()
    assert requeued.node_exits() == [0, 0] and not requeued.requeued(), requeued.output()
    assert not (work_dir / "stopped.json").exists()
    assert f"resumed from {work_dir / 'checkpoints' / f'iter_{stopped}'} at iteration {stopped}" in requeued.node_log(0)
    reference = two_machines[0]
    assert_bitwise_equal(weights(work_dir / "checkpoints" / f"iter_{ITERS}"),
                         weights(reference / "checkpoints" / f"iter_{ITERS}"))  # fmt: skip
    assert val_metrics(work_dir)[ITERS] == val_metrics(reference)[ITERS]


@pytest.mark.slow  # real runs of 4 processes: 50 to 100 s on 2 shared cores
def test_a_killed_rank_ends_the_other_machine_naming_it_without_a_requeue(tmp_path, data_root, jobs):
    work_dir = tmp_path / "run"
    slow = "{type: 'probe_hooks:ProbeHook', prefix: '" + str(tmp_path / "p") + "', sleep: 0.5}"
    args = options(data_root, f"train.collective_timeout={TIMEOUT_S}", hooks=slow)
    job = Job(tmp_path / "job", work_dir, port=29875)
    jobs.append(job.start("--cfg-options", *args))
    job.wait_for(0, f"iter 2/{ITERS}")
    (rank,) = [p for p in psutil.Process(job.launcher(1)).children() if "hooktrain" in p.cmdline()]
    rank.kill()  # kill -9 of machine 1's only rank
    killed = time.monotonic()
    code = job.wait(timeout=TIMEOUT_S + 60)
    elapsed = time.monotonic() - killed
    assert code == 1 and job.node_exits() == [1, 1] and not job.requeued(), job.output()
    assert elapsed < TIMEOUT_S, (elapsed, job.output())
    errors = [line for line in job.node_log(0).splitlines() if line.startswith("hooktrain: error: ")]
    lost = "a connection to another rank closed (a rank died, or its machine is gone); rank(s) 1 did not answer"
    assert len(errors) == 1, job.output()
    assert re.fullmatch(rf"hooktrain: error: rank 0 stopped in .+ at iteration \d: {re.escape(lost)}", errors[0])
    assert not (work_dir / "stopped.json").exists()


@pytest.mark.parametrize("launcher_exit", [1, 143])
@pytest.mark.parametrize("mark", ["written", "none", "left by an earlier attempt"])
def test_the_script_requeues_exactly_when_the_run_left_its_mark(tmp_path, launcher_exit, mark):
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    if mark == "left by an earlier attempt":
        (work_dir / "stopped.json").write_text('{"reason": "SIGTERM"}\n')
    writes = str(work_dir / "stopped.json") if mark == "written" else ""
    job = Job(tmp_path / "job", work_dir, STUB_EXIT=str(launcher_exit), STUB_WRITES=writes, STUB_HOSTS="node1 node2")
    code = job.run("--cfg-options", "train.max_iters=80000")
    assert job.requeued() == (mark == "written"), job.calls()
    assert code == (0 if mark == "written" else launcher_exit)
    (srun,) = [call for call in job.calls() if call.startswith("srun ")]
    assert srun == (
        'srun --kill-on-bad-exit=0 bash -c exec accelerate launch --multi_gpu --machine_rank "$SLURM_NODEID" "$@" '
        "launch "
        "--num_machines 2 --num_processes 16 --main_process_ip node1 --main_process_port 29500 "
        f"-m hooktrain recipes/ade20k.yaml --work-dir {work_dir} --resume --cfg-options train.max_iters=80000"
    )


def test_a_run_removes_the_mark_as_it_claims_the_work_dir(tmp_path):
    """Before any check, so that a refused start does not requeue; only the main process."""
    mark = tmp_path / "stopped.json"
    mark.write_text("{}")
    with claim_work_dir(tmp_path, force=False, resume=True, main_process=False):
        assert mark.exists()
    (tmp_path / "checkpoints" / "iter_2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("iter_2\n")
    with pytest.raises(UserError, match="already holds checkpoints"):
        with claim_work_dir(tmp_path, force=False, resume=False):
            pass
    assert not mark.exists()


def test_the_docs_show_the_script_as_it_is():
    assert f"```sh\n{SCRIPT.read_text()}```" in (ROOT / "docs" / "checkpoints.md").read_text()
