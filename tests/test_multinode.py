"""Several machines (tools/recipe_lib.sh, tools/node_sync.py), simulated by two "nodes" on localhost (gloo).

- two run.sh processes with ``--nnodes 2 --node_rank 0/1 --master_addr 127.0.0.1`` and a free port: node 0 alone
  runs the step that writes shared files while node 1 waits for it, then ``launch`` starts the SER recipe's
  train.py under torchrun's static rendezvous on both; they write the metrics.json of one process;
- the real IEMOCAP run.sh on two nodes: preparation and task-vector extraction run on node 0 only, every node
  starts the same launches (its own --node_rank, the same alternating ports);
- a failure inside node 0's step stops the waiting node at once, naming the step; a node 0 that never comes makes
  the others fail after --node_timeout with a message naming it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SER = ROOT / "recipes/MSP-Podcast/ser"
SUBSET = {"train": 8, "valid": 6, "test": 7}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "PYTHON": sys.executable}
NODE_OPTIONS = ("ngpu=1  # GPUs per node\ndevice=cpu  # device\nnnodes=1  # nodes\nnode_rank=0  # this node\n"
                "master_addr=  # node 0\nmaster_port=29500  # port\nnode_timeout=120  # seconds\n")


def _free_port_pair():
    """A port P with P + 1 also free (recipe_lib alternates between them)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _run_sh(tmp_path, body, options=""):
    script = tmp_path / "run.sh"
    script.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\nroot={ROOT}\n# ---- options\n{NODE_OPTIONS}{options}"
                      f". {ROOT}/tools/recipe_lib.sh\n{body}")
    return script


def _nodes(cmds, envs=None, timeout=300):
    """Run one process per node at the same time (the last node first: it must wait for node 0); node 0's result
    first."""
    envs = envs or [ENV] * len(cmds)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # a process group per node: a hang is killed whole
             for cmd, env in reversed(list(zip(cmds, envs)))]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out[::-1]  # node 0 first


def test_two_nodes_write_the_metrics_of_one_process(msp_manifests, tmp_path):
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm = make_tiny_wavlm(tmp_path / "tiny_wavlm")
    src = tmp_path / "manifests"
    src.mkdir()
    for split, n in SUBSET.items():
        man = json.loads((msp_manifests / f"{split}.json").read_text())
        (src / f"{split}.json").write_text(json.dumps({k: man[k] for k in sorted(man)[:n]}))
    # learning rates 0 (as tests/test_distributed.py): DDP and accumulation run, the weights stay, so both runs
    # evaluate the same model and a difference can only come from how the work is split over the nodes
    args = [f"--data_folder={tmp_path}/unused", "--skip_prep=True", f"--wavlm_source={wavlm}",
            "--number_of_epochs=1", "--batch_size=4", "--micro_batch_size=2", "--lr=0", "--lr_wavlm=0",
            "--head_hidden=8", "--num_bootstraps=20", "--device=cpu", "--noprogressbar"]
    script = _run_sh(tmp_path, f"""
if node0_begin "stage 0 (test preparation)"; then
    sleep 3   # the other node must wait for these files, not find a half-written folder
    mkdir -p "${{prep}}" && cp "${{src}}"/*.json "${{prep}}/" && echo "node ${{node_rank}}" >> "${{prep}}/prepared_by"
fi
node0_end
[ -f "${{prep}}/test.json" ] || {{ echo "node ${{node_rank}} went on before node 0 prepared" >&2; exit 9; }}
launch {SER}/train.py {SER}/hparams/train_ser.yaml --prep_folder="${{prep}}" --output_folder="${{out}}" "$@"
""", options="src=  # manifests\nprep=  # prepared\nout=  # output\n")
    port = _free_port_pair()
    nodes = [["bash", str(script), "--nnodes", "2", "--node_rank", str(r), "--master_addr", "127.0.0.1",
              "--master_port", str(port), "--src", str(src), "--prep", str(tmp_path / "prep"),
              "--out", str(tmp_path / "two"), "--", *args] for r in (0, 1)]
    results = _nodes(nodes)
    for r, proc in enumerate(results):
        assert proc.returncode == 0, f"node {r}:\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "prep" / "prepared_by").read_text() == "node 0\n"  # node 1 ran no preparation
    assert "node 1: node 0 runs stage 0 (test preparation); waiting for it" in results[1].stdout
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(SER / "train.py"), str(SER / "hparams/train_ser.yaml"),
                           f"--prep_folder={src}", f"--output_folder={one}", *args],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert "global batch 4 = micro 2 x accum 2 x 1 GPU" in (one / "log.txt").read_text()
    assert "global batch 4 = micro 2 x accum 1 x 2 GPUs" in (tmp_path / "two" / "log.txt").read_text()
    assert m1["test"]["n"] == m2["test"]["n"] == SUBSET["test"]
    assert m2["test_loss"] == pytest.approx(m1["test_loss"], rel=1e-5)
    assert m2["test"]["confusion"] == m1["test"]["confusion"]
    for k in ("uar", "macro_f1", "accuracy", "uar_ci", "macro_f1_ci"):
        assert m2["test"][k] == pytest.approx(m1["test"][k], abs=1e-12), k
    ids = lambda e: [line.split(",")[0] for line in (e / "predictions.csv").read_text().splitlines()[1:]]
    assert ids(tmp_path / "two") == ids(one) and len(ids(one)) == SUBSET["test"]


def test_a_failure_in_node0s_step_stops_the_other_nodes(tmp_path):
    script = _run_sh(tmp_path, """
if node0_begin "stage 0 (broken preparation)"; then
    sleep 2
    false   # the preparation fails (set -e)
fi
node0_end
echo "node ${node_rank} went on"
""")
    port = _free_port_pair()
    t0 = time.monotonic()
    results = _nodes([["bash", str(script), "--nnodes", "2", "--node_rank", str(r), "--master_addr", "127.0.0.1",
                       "--master_port", str(port)] for r in (0, 1)], timeout=120)
    elapsed = time.monotonic() - t0
    assert [p.returncode for p in results] == [1, 1]
    assert "went on" not in results[0].stdout + results[1].stdout
    assert "node 0 failed in stage 0 (broken preparation) (exit status 1): telling the other nodes" in results[0].stdout
    assert "node 1: node 0 failed during stage 0 (broken preparation) (exit status 1; see its log): stopping too" \
        in results[1].stderr
    assert elapsed < 100  # told at once, not after --node_timeout (120 s)


def test_a_node_without_node0_fails_after_the_timeout_naming_it(tmp_path):
    script = _run_sh(tmp_path, 'node0_begin "stage 3a (task vectors)" || true\nnode0_end\necho went on\n')
    port = _free_port_pair()
    proc = subprocess.run(["bash", str(script), "--nnodes", "3", "--node_rank", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(port), "--node_timeout", "3"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "went on" not in proc.stdout
    assert (f"node 2: no word from node 0 at 127.0.0.1:{port} (or +1) after stage 3a (task vectors) within 3 s "
            "(--node_timeout)") in proc.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# records every call of a run.sh; the node barrier (tools.node_sync under torchrun) really runs
case " $* " in
    *" tools.node_sync "*) exec {python} "$@" ;;
esac
echo "$*" >> {log}.$NODE
"""


def test_run_sh_runs_the_shared_steps_on_node0_only(tmp_path):
    """The real IEMOCAP run.sh on two nodes (its train.py, prepare and extraction calls recorded, not run)."""
    port = _free_port_pair()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, log=tmp_path / "calls"))
    fake.chmod(0o755)
    exp = tmp_path / "exp"
    (tmp_path / "data" / "Session1").mkdir(parents=True)  # a corpus "exists": no generation
    cmd = ["bash", "recipes/IEMOCAP/run.sh", "--stop_stage", "3", "--folds", "1", "--rows", "setup1_frozen",
           "--data_folder", str(tmp_path / "data"), "--exp", str(exp), "--device", "cpu", "--nnodes", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port)]
    results = _nodes([[*cmd, "--node_rank", str(r), "--", "--lr=0.5"] for r in (0, 1)],
                     envs=[{**ENV, "PYTHON": str(fake), "NODE": str(r)} for r in (0, 1)], timeout=240)
    for r, proc in enumerate(results):
        assert proc.returncode == 0, f"node {r}:\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
    calls = [(tmp_path / f"calls.{r}").read_text().splitlines() for r in (0, 1)]
    shared = [c for c in calls[0] if "torch.distributed.run" not in c]
    assert [c.split()[0].rsplit("/", 1)[-1] for c in shared] == ["iemocap_prepare.py"] + ["-m"] * 2
    assert [c.split()[1] for c in shared[1:]] == ["tools.extract_task_vector"] * 2
    launches = [c for c in calls[0] if "torch.distributed.run" in c]
    assert calls[1] == [c.replace("--node_rank=0", "--node_rank=1") for c in launches]  # nothing else on node 1
    # ASR-CTC, SER, then the row; the node barriers (after preparation, after the task vectors) took the ports
    # between: barrier P, ASR P+1, SER P, barrier P+1, row P
    scripts = [c.split(" --nproc_per_node=1 ")[1].split()[0].split("recipes/IEMOCAP/")[1] for c in launches]
    assert scripts == ["asr_ctc/train.py", "ser/train.py", "adaltm/train.py"]
    ports = [int(c.split("--master_port=")[1].split()[0]) for c in launches]
    assert ports == [port + 1, port, port]
    for c in launches:
        assert c.startswith("-m torch.distributed.run --nnodes=2 --node_rank=0 --master_addr=127.0.0.1 "
                            "--master_port=") and "--rdzv_conf=timeout=3600 --nproc_per_node=1 " in c
        assert c.endswith(" --lr=0.5 --distributed_backend=gloo") and " --fold=1 " in c
    assert "node 1: node 0 runs stage 3a of fold 1 (task vectors); waiting for it" in results[1].stdout
    # the replayable command is node 0's alone (one line of history on the shared filesystem)
    assert len((exp / "run_cmd.history").read_text().splitlines()) == 1
