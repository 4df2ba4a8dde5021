"""The recipe registry ``tests/recipes.csv`` (SpeechBrain's ``tests/recipes/*.csv`` idea): one line per train.py x
hparams / row YAML, so that no recipe configuration escapes the tests.

Columns:
    script          train.py, relative to the repository root
    hparams         the YAML (base or row file) it is run with
    run             who runs a tiny configuration of it: ``registry`` (tests/test_registry.py, with
                    ``tiny_overrides``), a test file (``tests/test_recipes.py`` ...: that file runs it, reading
                    this registry or naming the YAML), or ``no`` (``note`` says which run covers its code path)
    tiny_overrides  ``--key=value`` overrides of the registry's tiny run (space-separated)
    outputs         files the run must leave in its output folder (space-separated, relative)
    note            what the configuration is / why it is not run
"""
import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "tests" / "recipes.csv"
COLUMNS = ["script", "hparams", "run", "tiny_overrides", "outputs", "note"]


def read_registry(path=REGISTRY):
    """Rows of the registry as dicts; ``tiny_overrides`` / ``outputs`` split into lists."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{path}: columns {reader.fieldnames}, expected {COLUMNS}")
        rows = []
        for line_no, r in enumerate(reader, start=2):
            if None in r or any(v is None for v in r.values()):
                raise ValueError(f"{path}:{line_no}: expected {len(COLUMNS)} columns")
            rows.append({**r, "line": line_no, "tiny_overrides": r["tiny_overrides"].split(),
                         "outputs": r["outputs"].split()})
    return rows


def rows_run_by(test_file, script=None):
    """Registry rows whose ``run`` column names ``test_file`` (e.g. ``tests/test_recipes.py``), optionally only
    those of one ``script``."""
    return [r for r in read_registry() if r["run"] == test_file and (script is None or r["script"] == script)]


def row_name(row):
    """The YAML's stem: ``setup4_dual`` for ``.../hparams/rows/setup4_dual.yaml``."""
    return Path(row["hparams"]).stem
