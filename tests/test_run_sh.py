"""Every recipe run.sh (tools/recipe_lib.sh): ``--help`` lists every option with its default and comment, taken from
the run.sh itself; a run logs its full command line and leaves a replayable ``<exp>/run_cmd.sh``."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("run.sh"))
OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*?)(?:\s+#\s?(.*))?$")


def _options(run_sh):
    """(name, default, comment) of the option lines: from the '# --- options' line to the recipe_lib.sh line
    (a line ending in a backslash continues on the next)."""
    out, on = [], False
    text = re.sub(r"\\\n", "", (ROOT / run_sh).read_text(encoding="utf-8"))
    for line in text.splitlines():
        if re.match(r"^# -+ *options", line):
            on = True
        elif "recipe_lib.sh" in line:
            on = False
        elif on and (m := OPTION.match(line)):
            out.append((m.group(1), m.group(2).strip().strip("\"'"), (m.group(3) or "").strip()))
    return out


def _bash(args, cwd=ROOT, **env):
    return subprocess.run(["bash", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("run_sh", RUN_SH)
def test_help_lists_every_option_with_its_default_and_comment(run_sh):
    options = _options(run_sh)
    assert len(options) >= 5, f"{run_sh}: no '# ---- options' block found"
    proc = _bash([run_sh, "--help"])
    assert proc.returncode == 0, proc.stderr
    help_text = proc.stdout
    assert help_text.startswith("Usage: run.sh [--option value ...]")
    for name, default, comment in options:
        block = help_text.split(f"  --{name} <{default}>\n", 1)
        assert len(block) == 2, f"{run_sh}: --help lacks '--{name} <{default}>'"
        if comment:
            assert block[1].startswith(f"        {comment}\n"), f"{run_sh}: --help lacks the comment of --{name}"


@pytest.mark.parametrize("run_sh", RUN_SH)
def test_every_option_has_a_comment_for_help(run_sh):
    assert [n for n, _, c in _options(run_sh) if not c] == [], f"{run_sh}: options without a '# comment'"


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> {log}
echo "alloc_conf=${{PYTORCH_CUDA_ALLOC_CONF:-unset}}" >> {log}.env
"""


def _fake_python(tmp_path):
    """An executable that records each call of a run.sh (and the allocator setting it sees) instead of running it."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(log=tmp_path / "calls"))
    fake.chmod(0o755)
    return fake


def _calls(tmp_path):
    return (tmp_path / "calls").read_text().splitlines()


def test_options_and_overrides_after_double_dash_reach_train_py(tmp_path):
    proc = _bash(["recipes/IEMOCAP/run.sh", "--stage", "2", "--stop_stage", "2", "--folds", "1 3", "--seeds", "7",
                  "--data_folder", "/corpora/IEMOCAP", "--exp", str(tmp_path / "e"), "--ser_args",
                  "--lr=0.2 --head_hidden=16", "--", "--lr=0.5", "--number_of_epochs=2"],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    calls = _calls(tmp_path)
    assert len(calls) == 2  # stage 2 only: one SER run per selected fold, as one process (ngpu 1, one node)
    for fold, call in zip((1, 3), calls):
        args = call.split()
        assert args[:2] == [f"{ROOT}/recipes/IEMOCAP/ser/train.py", f"{ROOT}/recipes/IEMOCAP/ser/hparams/train_ser.yaml"]
        assert {"--seed=7", "--data_folder=/corpora/IEMOCAP", f"--fold={fold}", "--head_hidden=16",
                f"--output_folder={tmp_path}/e/ser/fold{fold}"} <= set(args)
        assert [a for a in args if a.startswith("--lr=")] == ["--lr=0.5"]  # after --: overrides --ser_args
        assert args[-2:] == ["--lr=0.5", "--number_of_epochs=2"]


@pytest.mark.parametrize("options, prefix", [
    ([], []),
    (["--ngpu", "2"], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    (["--ngpu", "4", "--nnodes", "3", "--node_rank", "2", "--master_addr", "node-a", "--master_port", "4000",
      "--node_timeout", "60"],
     ["-m", "torch.distributed.run", "--nnodes=3", "--node_rank=2", "--master_addr=node-a", "--master_port={port}",
      "--rdzv_conf=timeout=60", "--nproc_per_node=4"]),
])
def test_launch_runs_one_process_torchrun_on_one_node_or_the_rendezvous_of_several(tmp_path, options, prefix):
    proc = _bash(["recipes/IEMOCAP/run.sh", "--stage", "2", "--stop_stage", "2", "--folds", "1 2",
                  "--data_folder", "d", "--device", "cpu", "--exp", str(tmp_path / "e"), *options],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    backend = ["--distributed_backend=gloo"] if prefix else []
    for port, call in zip((4000, 4001), _calls(tmp_path)):  # successive jobs alternate between two ports
        args = call.split()
        assert args[:len(prefix)] == [a.format(port=port) for a in prefix]
        assert args[len(prefix)].endswith("recipes/IEMOCAP/ser/train.py") and args[len(args) - len(backend):] == backend
    # only node 0 writes the replayable command on the shared filesystem
    assert (tmp_path / "e" / "run_cmd.sh").exists() == ("--node_rank" not in options)


@pytest.mark.parametrize("options, message", [
    (["--nnodes", "2"], "--master_addr (node 0's host name or address, the same on every node) is needed with "
                        "--nnodes 2"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "a"], "--node_rank 2 is not in 0..1 (--nnodes 2)"),
    (["--nnodes", "two"], "--nnodes must be a non-negative integer, not 'two'"),
    (["--master_port", "-1"], "--master_port must be a non-negative integer, not '-1'"),
    (["--nnodes", "0"], "--nnodes must be at least 1"),
    (["--master_port", "65535"], "--master_port must be in 1..65534 (the next port is used too), not 65535"),
])
def test_bad_node_options_are_refused_naming_them(tmp_path, options, message):
    proc = _bash(["recipes/IEMOCAP/run.sh", "--exp", str(tmp_path / "e"), *options])
    assert proc.returncode == 1 and message in proc.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("env, seen", [({}, "expandable_segments:True"),
                                       ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, "max_split_size_mb:128"),
                                       ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}, "unset")])
def test_cuda_allocator_grows_segments_unless_the_user_chose(tmp_path, env, seen):
    base = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    proc = subprocess.run(["bash", "recipes/IEMOCAP/run.sh", "--stage", "2", "--stop_stage", "2", "--folds", "1",
                           "--data_folder", "d", "--exp", str(tmp_path / "e")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**base, **env, "PYTHON": str(_fake_python(tmp_path))})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls.env").read_text() == f"alloc_conf={seen}\n"


def test_unknown_option_is_refused_and_help_writes_nothing(tmp_path):
    proc = _bash(["recipes/IEMOCAP/run.sh", "--exp", str(tmp_path / "e"), "--nope", "1"])
    assert proc.returncode == 1 and "unknown option --nope" in proc.stderr
    assert not (tmp_path / "e").exists()


def test_run_logs_its_command_line_and_writes_a_replayable_copy(tmp_path):
    exp = tmp_path / "exp with space"
    for k in (1, 2):
        path = exp / "ser" / f"fold{k}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"experiment": "ser_finetune", "fold": k,
                                    "test": {"uar": 0.5 + 0.1 * k, "accuracy": 0.6, "confusion": [[k, 1], [1, 2]]}}))
    args = ["recipes/IEMOCAP/run.sh", "--stage", "4", "--data_folder", "unused", "--exp", str(exp), "--",
            "--lr=0.1"]
    proc = _bash(args)
    assert proc.returncode == 0, proc.stderr
    assert f"command line (from {ROOT}): bash {ROOT}/recipes/IEMOCAP/run.sh --stage 4 --data_folder unused --exp " \
           f"{str(exp).replace(' ', chr(92) + ' ')} -- --lr=0.1" in proc.stdout
    table = (exp / "results" / "folds.md").read_text()
    # UA 0.6, 0.7: mean 0.65, s = 0.0707, half-width t(0.975, 1) * s / sqrt(2) = 12.706 * 0.05 = 0.6353
    assert "| ser_finetune | 65.00 ± 63.53 | 60.00 ± 0.00 | - | - |" in table
    replay = (exp / "run_cmd.sh").read_text()
    assert replay.startswith("#!/usr/bin/env bash\n") and os.access(exp / "run_cmd.sh", os.X_OK)
    (exp / "results" / "folds.md").unlink()
    again = _bash([str(exp / "run_cmd.sh")], cwd=tmp_path)  # from anywhere: it cds to where the run started
    assert again.returncode == 0, again.stderr
    assert (exp / "results" / "folds.md").read_text() == table
    history = (exp / "run_cmd.history").read_text().splitlines()
    assert len(history) == 2 and history[0].split(" ", 1)[1] == history[1].split(" ", 1)[1]


def test_launch_keeps_the_last_of_repeated_overrides(tmp_path):
    """A --mini default, a *_args option and an argument after -- may set the same key; hyperpyyaml refuses a key
    given twice, so launch passes each --key=value once, at its last value and position."""
    script = tmp_path / "run.sh"
    script.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\nroot={ROOT}\n# ---- options\nngpu=1  # GPUs\n"
                      f"device=  # device\nnnodes=1  # nodes\nnode_rank=0  # node\nmaster_addr=  # node 0\n"
                      f"master_port=29500  # port\nnode_timeout=60  # s\n. {ROOT}/tools/recipe_lib.sh\n"
                      'launch train.py h.yaml --lr=0.1 --seed=1 "a b" --lr=0.2 --x --lr_wavlm=3 "$@"\n')
    proc = subprocess.run(["bash", str(script), "--", "--seed=7", "--lr=0.3"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "echo"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "train.py h.yaml a b --x --lr_wavlm=3 --seed=7 --lr=0.3"


def test_a_run_sh_without_the_node_options_is_refused_naming_them(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\nroot={ROOT}\n# ---- options\nngpu=1  # GPUs\n"
                      f"device=  # device\nnnodes=1  # nodes\n. {ROOT}/tools/recipe_lib.sh\necho ran\n")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "ran" not in proc.stdout
    assert f"{script}: declares no option node_rank (every run.sh has nnodes, node_rank, master_addr," in proc.stderr


def _train_calls(tmp_path):
    """(train.py path relative to recipes/, its --seed values) of every recorded train.py call."""
    out = []
    for call in _calls(tmp_path):
        args = call.split()
        if args[0].endswith("train.py"):
            out.append((args[0].split("/recipes/")[1], [a for a in args if a.startswith("--seed=")]))
    return out


def test_seeds_train_every_row_once_per_seed_and_the_source_models_once(tmp_path):
    proc = _bash(["recipes/MSP-Podcast/adaltm/run.sh", "--stage", "1", "--stop_stage", "3", "--seeds", "1986 7",
                  "--rows", "setup4_dual", "--mtl_rows", "static_init", "--data_folder", "d", "--libri_folder", "l",
                  "--exp", str(tmp_path / "e")], PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert _train_calls(tmp_path) == [
        ("MSP-Podcast/asr_ctc/train.py", ["--seed=1986"]), ("LibriSpeech/asr_ctc/train.py", ["--seed=1986"]),
        ("MSP-Podcast/ser/train.py", ["--seed=1986"]),
        ("MSP-Podcast/adaltm/train.py", ["--seed=1986"]), ("MSP-Podcast/mtl/train.py", ["--seed=1986"]),
        ("MSP-Podcast/adaltm/train.py", ["--seed=7"]), ("MSP-Podcast/mtl/train.py", ["--seed=7"])]
    assert sum("extract_task_vector" in c for c in _calls(tmp_path)) == 3  # one set of task vectors
    (tmp_path / "calls").unlink()
    proc = _bash(["recipes/IEMOCAP/run.sh", "--stage", "2", "--stop_stage", "3", "--seeds", "5 6", "--folds", "1",
                  "--rows", "setup4_dual", "--data_folder", "d", "--exp", str(tmp_path / "i")],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert _train_calls(tmp_path) == [("IEMOCAP/ser/train.py", ["--seed=5"]),
                                      ("IEMOCAP/adaltm/train.py", ["--seed=5"]), ("IEMOCAP/adaltm/train.py", ["--seed=6"])]
    (tmp_path / "calls").unlink()
    proc = _bash(["recipes/MSP-Podcast/harmonifuse/run.sh", "--stage", "1", "--stop_stage", "1", "--seeds", "1 2",
                  "--rows", "full", "--msp_folder", "m", "--libri_folder", "l", "--exp", str(tmp_path / "h")],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert _train_calls(tmp_path) == [("MSP-Podcast/harmonifuse/train.py", ["--seed=1"]),
                                      ("MSP-Podcast/harmonifuse/train.py", ["--seed=2"])]
    proc = _bash(["recipes/MSP-Podcast/harmonifuse/run.sh", "--seeds", "1 x", "--msp_folder", "m",
                  "--libri_folder", "l"], PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 1 and "--seeds: 'x' is not a non-negative integer" in proc.stderr


@pytest.mark.parametrize("seeds", ["1986", "1986 7"])
def test_stage4_summarises_the_selected_seeds(tmp_path, seeds):
    exp = tmp_path / "e"
    for row in ("setup1_frozen", "setup4_dual", "out_of_domain_dual"):
        for seed in ("1986", "7"):
            (exp / "rows" / row / seed).mkdir(parents=True)
            (exp / "rows" / row / seed / "metrics.json").write_text("{}")
            (exp / "rows" / row / seed / "predictions.csv").write_text("")  # the marks need them
    (exp / "results").mkdir()
    for name in ("table.md", "table_seeds.md"):
        (exp / "results" / name).write_text("")
    proc = _bash(["recipes/MSP-Podcast/adaltm/run.sh", "--stage", "4", "--seeds", seeds, "--data_folder", "d",
                  "--exp", str(exp)], PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    calls = _calls(tmp_path)
    (collect,) = [c for c in calls if c.startswith("-m tools.collect_results")]
    (plot,) = [c for c in calls if c.startswith("-m tools.plot_coefficients")]
    rows = exp / "rows"
    runs = [f"{rows}/{row}/{s}" for row in ("out_of_domain_dual", "setup1_frozen", "setup4_dual") for s in seeds.split()]
    marks = ("--mark †=Setup 1: Baseline (Frozen Backbone) --mark ‡=Setup 4: Proposed Dual-Vector "
             f"--significance {exp}/results/table_significance")
    assert collect.startswith("-m tools.collect_results " + " ".join(runs) + " --source ")
    if seeds == "1986":  # one seed: the table of that seed's runs, marked; figures of its runs
        assert collect.endswith(f"--out {exp}/results/table {marks}")
        assert plot.endswith(f"--out {exp}/results/plots --figure2 {rows}/setup4_dual/1986 {rows}/setup2_asr_only/1986 "
                             f"{rows}/setup3_ser_only/1986 --figure3 {rows}/setup4_dual/1986 "
                             f"{rows}/out_of_domain_dual/1986")
    else:  # several: the seeds table too; figures of row folders, the mean over the seeds
        assert collect.endswith(f"--out {exp}/results/table {marks} --seeds_table {exp}/results/table_seeds")
        assert plot.endswith(f"--out {exp}/results/plots --seeds 1986 7 --figure2 {rows}/setup4_dual "
                             f"{rows}/setup2_asr_only {rows}/setup3_ser_only --figure3 {rows}/setup4_dual "
                             f"{rows}/out_of_domain_dual")


@pytest.mark.parametrize("options, reported", [([], "1 2"), (["--mini", "true"], "2"),
                                              (["--mini", "true", "--tuning_folds", ""], "1 2")])
def test_iemocap_results_leave_out_the_fold_the_mini_settings_were_chosen_on(tmp_path, options, reported):
    exp = tmp_path / "e"
    for run in ("ser/fold1", "ser/fold2", "rows/setup4_dual/1986/fold1", "rows/setup4_dual/1986/fold2"):
        (exp / run).mkdir(parents=True)
    proc = _bash(["recipes/IEMOCAP/run.sh", "--stage", "4", "--data_folder", "d", "--exp", str(exp), *options],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    calls = [c.split() for c in _calls(tmp_path) if "average_folds.py" in c]
    runs = lambda folds: [f"{exp}/{r}/fold{k}" for r in ("ser", "rows/setup4_dual/1986") for k in folds.split()]
    assert calls[-1][1:] == runs(reported) + ["--out", f"{exp}/results/folds", "--n_folds", "5"]
    if reported == "2":  # the tuning fold is kept apart, in a table of its own name
        assert calls[0][1:] == runs("1 2") + ["--out", f"{exp}/results/folds_with_tuning_folds", "--n_folds", "5"]
        assert "fold(s) 1 left out of" in proc.stdout + proc.stderr
    else:
        assert len(calls) == 1


TIMED_PYTHON = """#!/usr/bin/env bash
echo "$(date +%s.%N) start $1 CVD=${{CUDA_VISIBLE_DEVICES:-unset}}" >> {log}
case "$*" in *LibriSpeech/asr_ctc/train.py*) [ -n "${{FAIL_LIBRI:-}}" ] && {{ echo "no LibriSpeech here"; exit 3; }};; esac
echo "output of $1"
sleep 0.5
echo "$(date +%s.%N) end $1" >> {log}
"""


def _timed_run(tmp_path, options, **env):
    """The AdaLTM run.sh, stages 1-3, with a python that records when each job starts and ends (0.5 s each):
    -> (process, [(time, "start" | "end", first argument (train.py path or -m), [CVD=...])])."""
    tmp_path.mkdir(exist_ok=True)
    fake = tmp_path / "python"
    fake.write_text(TIMED_PYTHON.format(log=tmp_path / "calls"))
    fake.chmod(0o755)
    proc = _bash(["recipes/MSP-Podcast/adaltm/run.sh", "--stage", "1", "--stop_stage", "3", "--rows",
                  "setup4_dual setup1_frozen", "--mtl_rows", "static_init", "--data_folder", "d", "--libri_folder", "l",
                  "--exp", str(tmp_path / "e"), *options], PYTHON=str(fake), **env)
    events = [line.split() for line in _calls(tmp_path)] if (tmp_path / "calls").exists() else []
    return proc, [(float(t), what, job, rest) for t, what, job, *rest in events]


def _running_at_once(events):
    """The most jobs running at the same time."""
    most = now = 0
    for _, what, _, _ in sorted(events):
        now += 1 if what == "start" else -1
        most = max(most, now)
    return most


def test_nj_runs_a_stages_jobs_side_by_side_with_the_same_arguments(tmp_path):
    one, events1 = _timed_run(tmp_path / "a", ["--nj", "1"])
    two, events2 = _timed_run(tmp_path / "b", ["--nj", "2"])
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert _running_at_once(events1) == 1 and _running_at_once(events2) == 2
    # the same 9 jobs (3 source models, 3 task vectors, 2 rows, 1 MTL row), each with the same command line
    calls = [sorted(c.split(" start ", 1)[1].replace(str(tmp_path / p), "") for c in _calls(tmp_path / p)
                    if " start " in c) for p in ("a", "b")]
    assert calls[0] == calls[1] and len(calls[0]) == 9
    # the stage boundaries hold: the task vectors (-m) after every source model ended, the rows after the vectors
    sources = [e for e in events2 if "/adaltm/" not in e[2] and "/mtl/" not in e[2] and e[2] != "-m"]
    vectors = [e for e in events2 if e[2] == "-m"]
    rows = [e for e in events2 if "/adaltm/" in e[2] or "/mtl/" in e[2]]
    assert max(t for t, *_ in sources) < min(t for t, *_ in vectors)
    assert max(t for t, *_ in vectors) < min(t for t, *_ in rows)
    logs = tmp_path / "b" / "e" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        f"{n}.log" for n in ("asr_ctc_msp", "asr_ctc_libri", "ser", "setup4_dual_1986", "setup1_frozen_1986",
                             "mtl_static_init_1986"))
    assert (logs / "ser.log").read_text() == f"output of {ROOT}/recipes/MSP-Podcast/ser/train.py\n"
    assert not (tmp_path / "a" / "e" / "logs").exists()  # nj 1: the output stays on the terminal, as before


def test_mini_runs_one_job_per_core_and_2_gib(tmp_path):
    """--mini true without --nj: as many one-thread jobs at once as there are cores and 2 GiB blocks available (the
    default once wrote an awk 'print n > 1 ...' that redirected to a file named 1 and ran everything serially)."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) // 2097152
    expected = max(1, min(len(os.sched_getaffinity(0)), avail))
    proc, events = _timed_run(tmp_path, ["--mini", "true", "--stop_stage", "2"])
    assert proc.returncode == 0, proc.stderr
    assert _running_at_once(events) == min(expected, 3)  # 3 source models in stages 1-2
    assert not (ROOT / "1").exists()


@pytest.mark.parametrize("poll", ["", "1"])  # "1": the path of bash < 5.1 (no wait -n -p)
def test_nj_a_failed_job_stops_the_recipe_after_its_stage_naming_it(tmp_path, poll):
    proc, events = _timed_run(tmp_path, ["--nj", "2"], FAIL_LIBRI="1", RECIPE_LIB_POLL=poll)
    assert proc.returncode == 1
    assert "no LibriSpeech here" in proc.stderr and "failed: asr_ctc_libri (logs in" in proc.stderr
    # the other source models of the stage ran to their end; nothing of stage 3 started
    assert sorted(job.split("/recipes/")[1] for _, what, job, _ in events if what == "end") == [
        "MSP-Podcast/asr_ctc/train.py", "MSP-Podcast/ser/train.py"]
    assert all(job != "-m" for _, _, job, _ in events)


def test_nj_gives_each_job_slot_its_own_gpus_or_says_how_many_are_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")  # --query-gpu=index: four GPUs
    smi.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc, events = _timed_run(tmp_path, ["--nj", "2", "--ngpu", "2", "--stop_stage", "2"], PATH=path)
    assert proc.returncode == 0, proc.stderr
    starts = [rest[0] for _, what, _, rest in sorted(events) if what == "start"]
    # the two ASR runs start together on slots 0 and 1 (GPUs 0,1 and 2,3); SER takes the slot freed first
    assert sorted(starts[:2]) == ["CVD=0,1", "CVD=2,3"] and starts[2] in ("CVD=0,1", "CVD=2,3")
    proc = subprocess.run(["bash", "recipes/MSP-Podcast/adaltm/run.sh", "--stage", "1", "--stop_stage", "2", "--nj",
                           "3", "--ngpu", "2", "--data_folder", "d", "--libri_folder", "l", "--exp",
                           str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**env, "PATH": path, "PYTHON": sys.executable})
    assert proc.returncode == 1 and "--nj 3 x --ngpu 2 needs 6 GPUs; 4 visible (0 1 2 3): lower --nj" in proc.stderr


@pytest.mark.parametrize("options, message", [
    (["--nj", "0"], "--nj must be a positive integer, not '0'"),
    (["--nj", "1", "--stage", "3", "--stop_stage", "3", "--rows", "setup4_dual setup4_dual"],
     "job setup4_dual_1986 given twice (a row, fold or seed listed twice?)"),
    (["--seeds", "1986 7 1986"], "--seeds: 1986 is given twice"),
    (["--nj", "2", "--nnodes", "2", "--master_addr", "a"], "--nj 2 needs one node (--nnodes 2)"),
])
def test_nj_refuses_what_it_cannot_do(tmp_path, options, message):
    proc = _bash(["recipes/MSP-Podcast/adaltm/run.sh", "--data_folder", "d", "--exp", str(tmp_path / "e"), *options],
                 PYTHON=str(_fake_python(tmp_path)))
    assert proc.returncode == 1 and message in proc.stderr
    rows = [c for c in _calls(tmp_path) if c.split()[0].endswith("adaltm/train.py")] if (
        tmp_path / "calls").exists() else []
    assert len(rows) <= 1  # a repeated row: refused when it comes again, before it trains a second time
