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


def test_iemocap_run_sh_options():
    names = [n for n, _, _ in _options("recipes/IEMOCAP/run.sh")]
    assert names[:3] == ["stage", "stop_stage", "ngpu"] and "folds" in names and "rows" in names


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
                      f"device=  # device\n. {ROOT}/tools/recipe_lib.sh\n"
                      'launch train.py h.yaml --lr=0.1 --seed=1 "a b" --lr=0.2 --x --lr_wavlm=3 "$@"\n')
    proc = subprocess.run(["bash", str(script), "--", "--seed=7", "--lr=0.3"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "echo"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "train.py h.yaml a b --x --lr_wavlm=3 --seed=7 --lr=0.3"
