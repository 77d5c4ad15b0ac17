"""Several nodes on one host: one ``accelerate launch`` per machine rank (``--num_machines 2
--machine_rank 0|1 --main_process_ip 127.0.0.1``), 1 process per node and then 2, ZeRO-2 and
ZeRO-3: the result equals 1 process, only the main process writes, ``--resume latest`` goes on
from the checkpoint, and an output folder that is not the same on every node is refused."""

from __future__ import annotations

import json
import subprocess

import pytest
from launching import ACCELERATE, ROOT, TRAIN_MANY, TWO_CPU, _free_port, env, max_diff, outputs
from test_distributed import STRATEGY_ARGS, assert_equal_to_one, baseline, common  # noqa: F401
from train_many import FINISHED

NODES = 2


def launch_nodes(runs_of_node, per_node: int, timeout: int = 900, extra_env=None) -> list:
    """Every node's ``tests/train_many.py`` launch, started together; ``runs_of_node(r)``: the
    argument lists node r trains (the same on every node, but for a test of mismatched
    nodes). [(exit code, stdout, stderr)] by machine rank."""
    port = _free_port()
    e = env()
    e.update(extra_env or {})
    procs = []
    for r in range(NODES):
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            TWO_CPU,
            "--num_machines",
            str(NODES),
            "--machine_rank",
            str(r),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--num_processes",
            str(NODES * per_node),
            str(TRAIN_MANY),
            json.dumps(runs_of_node(r)),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return done


def finished(done: list, n_runs: int) -> None:
    report = "\n".join(
        f"node {r}: exit {code}\n{out[-2000:]}\n{err[-4000:]}"
        for r, (code, out, err) in enumerate(done)
    )  # every node's, to tell which failed first
    assert all(code == 0 for code, _, _ in done), report
    assert all(FINISHED.format(k, n_runs) in done[0][1] for k in range(1, n_runs + 1))


@pytest.fixture(scope="module")
def one_each(kt_dir, tiny_encoder, tmp_path_factory):
    """2 nodes x 1 process: ZeRO-2 Single-step; then (no DeepSpeed) 2 steps with a checkpoint
    after each, and the same run resumed to 3 steps. ``(runs by name, launch output)``."""
    out = {k: tmp_path_factory.mktemp(f"nodes-{k}") for k in ("zero2", "resumed")}
    runs = {
        "zero2": [*common(kt_dir, tiny_encoder, "zero2"), *STRATEGY_ARGS["single"]],
        "cut": [
            *common(kt_dir, tiny_encoder, "none"),
            *STRATEGY_ARGS["single"],
            "--max-steps",
            "2",
            "--save-every",
            "1",
        ],
        "resumed": [
            *common(kt_dir, tiny_encoder, "none"),
            *STRATEGY_ARGS["single"],
            "--resume",
            "latest",
        ],
    }
    out["cut"] = out["resumed"]
    lists = [[*a, "--output-dir", str(out[k])] for k, a in runs.items()]
    done = launch_nodes(lambda r: lists, per_node=1)
    finished(done, len(lists))
    return {k: (runs[k], out[k]) for k in runs}, done


def test_two_nodes_equal_one_process(one_each, baseline):  # noqa: F811
    args, out = one_each[0]["zero2"]
    assert_equal_to_one(args, out, NODES, "zero2", baseline)


def test_two_nodes_write_once_and_resume(one_each, baseline):  # noqa: F811
    """Only the main process (node 0) prints and writes; the resumed run goes on from step 2's
    checkpoint and ends equal to an uninterrupted 3-step run (float64, same layout: 1e-10 of
    the 1-process run, whose layout differs only in summation order)."""
    runs, done = one_each
    (node0, node1) = [out for _, out, _ in done]
    assert node1.strip() == ""  # the second node's process prints nothing
    args, out = runs["resumed"]
    assert node0.count(f"wrote {out}/metrics.json") == 2  # the cut run, then the resumed one
    assert "resumed from" in node0 and "step-00000002" in node0
    uninterrupted = [a for a in args if a not in ("--resume", "latest")]
    assert max_diff(outputs(baseline(uninterrupted)), outputs(out)) < 1e-9


def test_two_nodes_of_two_processes_equal_one(kt_dir, tiny_encoder, baseline, tmp_path):  # noqa: F811
    """2 nodes x 2 processes, ZeRO-3 (parameters sharded over both nodes)."""
    args = [*common(kt_dir, tiny_encoder, "zero3"), *STRATEGY_ARGS["single"]]
    done = launch_nodes(lambda r: [[*args, "--output-dir", str(tmp_path)]], per_node=2)
    finished(done, 1)
    assert_equal_to_one(args, tmp_path, 2 * NODES, "zero3", baseline)


def test_output_dir_not_shared_by_the_nodes_is_refused(kt_dir, tiny_encoder, tmp_path):
    """Node 1's --output-dir is another folder (as a node-local disk would be): refused at
    start, on every node, in one line naming the folder and the rank that cannot see it;
    nothing is written."""
    args = [*common(kt_dir, tiny_encoder, "none"), *STRATEGY_ARGS["single"]]
    folders = [tmp_path / "node0" / "run", tmp_path / "node1" / "run"]
    for f in folders:
        f.parent.mkdir()
    done = launch_nodes(
        lambda r: [[*args, "--output-dir", str(folders[r])]],
        per_node=1,
        extra_env={"GRAM_SHARED_DIR_WAIT": "1"},
        timeout=300,
    )
    assert all(code != 0 for code, _, _ in done)
    errors = [line for _, _, err in done for line in err.splitlines() if line.startswith("error:")]
    assert errors and all("is not the same folder on every node" in e for e in errors), errors
    assert any("rank(s) 1 cannot see" in e for e in errors)
    assert not any(f.exists() for f in folders)
    assert [p.name for f in folders for p in f.parent.iterdir()] == []


def test_slurm_script_renders_one_launch_per_node(tmp_path):
    """launch/slurm.sh on 2 nodes of 4 GPUs, outside Slurm (dry run, the host list given): one
    srun of the script per node, and each node's accelerate launch with its machine rank, the
    first host as main, 8 processes in all, the DeepSpeed config and the flags passed on."""
    import os
    import shlex

    e = dict(
        os.environ,
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="h100:4",
        GRAM_HOSTS="gpu-a gpu-b",
        GRAM_SLURM_DRY_RUN="1",
        SLURM_SUBMIT_DIR=str(ROOT),
        ACCELERATE="accelerate",
    )
    flags = ["--strategy", "multi", "--output-dir", str(tmp_path / "a run")]
    script = str(ROOT / "launch" / "slurm.sh")
    r = subprocess.run(
        ["bash", script, "ds_configs/zero3.json", *flags],
        env=e,
        text=True,
        capture_output=True,
        check=True,
    )
    srun, *launches = [shlex.split(line) for line in r.stdout.splitlines()]
    assert srun == [
        "srun",
        "--nodes",
        "2",
        "--ntasks-per-node",
        "1",
        "--kill-on-bad-exit=1",
        "bash",
        script,
        "--node",
        "ds_configs/zero3.json",
        *flags,
    ]
    for rank, cmd in enumerate(launches):
        assert cmd == [
            "accelerate",
            "launch",
            "--config_file",
            "accelerate_configs/multi_node.yaml",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "gpu-a",
            "--main_process_port",
            "29500",
            "--num_processes",
            "8",
            "launch/train.py",
            "--config",
            "ds_configs/zero3.json",
            *flags,
        ]
    assert len(launches) == 2
    # what srun runs on node 1: its own launch, the machine rank from SLURM_NODEID
    node = subprocess.run(
        ["bash", script, "--node", "ds_configs/zero3.json", *flags],
        text=True,
        env=dict(e, SLURM_NODEID="1"),
        capture_output=True,
        check=True,
    )
    assert shlex.split(node.stdout) == launches[1]
    # outside a Slurm job: one line, non-zero exit
    bare = {k: v for k, v in e.items() if k != "SLURM_NNODES"}
    r = subprocess.run(
        ["bash", script, "ds_configs/zero3.json"], env=bare, text=True, capture_output=True
    )
    assert r.returncode != 0 and "not inside a Slurm job" in r.stderr
