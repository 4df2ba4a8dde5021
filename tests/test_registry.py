"""Recipe registry (tests/recipes.csv, see tests/recipe_registry.py): every YAML under recipes/ is listed, loads
through the real loader and builds with tiny models; every recipe directory has a README; the listed tiny runs
that no other test file does are run here, and their outputs checked."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ruamel.yaml
import torch

from recipe_registry import ROOT, read_registry

ROWS = read_registry()
RUN_HERE = [r for r in ROWS if r["run"] == "registry"]


def _yaml_files(root):
    return sorted(p.relative_to(root).as_posix() for ext in ("*.yaml", "*.yml") for p in (root / "recipes").rglob(ext))


def _recipe_dirs(root):
    """Directories holding a train.py or a *_prepare.py."""
    found = {p.parent for p in (root / "recipes").rglob("train.py")}
    found |= {p.parent for p in (root / "recipes").rglob("*_prepare.py")}
    return sorted(d for d in found if "__pycache__" not in d.parts)


def registry_problems(root, rows):
    """Why the registry and the recipe tree disagree (empty list: they agree)."""
    problems = []
    listed = {r["hparams"] for r in rows}
    for y in _yaml_files(root):
        if y not in listed:
            problems.append(f"{y} is not listed in tests/recipes.csv: add a line (script, hparams, run, ...)")
    scripts = {r["script"] for r in rows}
    for s in sorted(p.relative_to(root).as_posix() for p in (root / "recipes").rglob("train.py")):
        if s not in scripts:
            problems.append(f"{s} has no line in tests/recipes.csv")
    seen = set()
    for r in rows:
        where = f"tests/recipes.csv:{r['line']}"
        for key in ("script", "hparams"):
            if not (root / r[key]).is_file():
                problems.append(f"{where}: {key} {r[key]} does not exist")
        if (r["script"], r["hparams"]) in seen:
            problems.append(f"{where}: {r['script']} x {r['hparams']} listed twice")
        seen.add((r["script"], r["hparams"]))
        if Path(r["hparams"]).parent.parent != Path(r["script"]).parent:  # <recipe>/hparams[/rows]/x.yaml
            if Path(r["hparams"]).parent.parent.parent != Path(r["script"]).parent:
                problems.append(f"{where}: {r['hparams']} is not under {Path(r['script']).parent}/hparams")
        if r["run"] == "no":
            if not r["note"]:
                problems.append(f"{where}: run=no needs a note saying which run covers its code path")
        elif r["run"] == "registry":
            if not r["outputs"]:
                problems.append(f"{where}: a registry run must list its expected outputs")
        elif r["run"].startswith("tests/") and (root / r["run"]).is_file():
            text = (root / r["run"]).read_text(encoding="utf-8")
            if "recipe_registry" not in text and Path(r["hparams"]).name not in text:
                problems.append(f"{where}: {r['run']} neither reads the registry nor names {Path(r['hparams']).name}")
        else:
            problems.append(f"{where}: run must be 'registry', 'no' or an existing tests/*.py file, got {r['run']!r}")
    return problems


# ------------------------------------------------------------------------------------------ (c) consistency
def test_registry_lists_every_yaml_and_train_py():
    assert registry_problems(ROOT, ROWS) == []
    assert len(ROWS) == len(_yaml_files(ROOT))  # one line per YAML: none missing, none extra


def test_registry_check_fails_for_an_unlisted_yaml_and_a_missing_file(tmp_path):
    yaml = tmp_path / "recipes/X/ser/hparams/rows/new_row.yaml"
    yaml.parent.mkdir(parents=True)
    yaml.write_text("base_hparams: ../train.yaml\n")
    (tmp_path / "recipes/X/ser/train.py").write_text("")
    rows = [{"script": "recipes/X/ser/train.py", "hparams": "recipes/X/ser/hparams/gone.yaml", "run": "no",
             "tiny_overrides": [], "outputs": [], "note": "n", "line": 2}]
    assert registry_problems(tmp_path, rows) == [
        "recipes/X/ser/hparams/rows/new_row.yaml is not listed in tests/recipes.csv: add a line (script, hparams, "
        "run, ...)",
        "tests/recipes.csv:2: hparams recipes/X/ser/hparams/gone.yaml does not exist"]


# ------------------------------------------------------------------------------------------ (b) READMEs
@pytest.mark.parametrize("folder", [d.relative_to(ROOT).as_posix() for d in _recipe_dirs(ROOT)])
def test_every_recipe_directory_has_a_readme_naming_its_scripts_and_rows(folder):
    readme = ROOT / folder / "README.md"
    assert readme.is_file(), f"{folder} has no README.md"
    text = readme.read_text(encoding="utf-8")
    scripts = [p.name for p in (ROOT / folder).iterdir() if p.name == "train.py" or p.name.endswith("_prepare.py")]
    for s in scripts:
        assert s in text, f"{readme}: does not show how to run {s}"
    rows = sorted(p.stem for p in (ROOT / folder / "hparams" / "rows").glob("*.yaml"))
    missing = [r for r in rows if r not in text]
    assert not missing, f"{readme}: does not say what rows {missing} are"


# ------------------------------------------------------------------------------------------ (a) every YAML loads
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny WavLM and causal LM, and synthetic task vectors of the WavLM (asr_in, asr_out, ser)."""
    from transformers import WavLMModel

    from lobes.adaltm.task_vector import compute_task_vector, save_task_vector
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    root = tmp_path_factory.mktemp("registry_models")
    wavlm = make_tiny_wavlm(root / "tiny_wavlm")
    base = WavLMModel.from_pretrained(wavlm).state_dict()
    vectors = root / "vectors"
    gen = torch.Generator().manual_seed(0)
    for name, file in (("ASR", "asr_in"), ("ASR", "asr_out"), ("SER", "ser")):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
              for k, v in base.items()}
        save_task_vector(compute_task_vector(base, ft, name), vectors / f"{file}.safetensors")
    return {"wavlm": str(wavlm), "lm": str(make_tiny_lm(root / "tiny_lm")), "vectors": str(vectors)}


def _top_level(hparams_file):
    from lobes.hparams_io import resolve_row

    return ruamel.yaml.YAML().load(resolve_row(ROOT / hparams_file))


def _overrides(keys, tiny, folder):
    """Every *_folder key -> a temporary folder (nothing is written into the repository); models -> tiny ones."""
    out = {k: str(folder / k) for k in keys if k.endswith("_folder")}
    for key, value in (("wavlm_source", tiny["wavlm"]), ("lm_source", tiny["lm"]), ("vectors_folder", tiny["vectors"])):
        if key in keys:
            out[key] = value
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r["hparams"].removeprefix("recipes/") for r in ROWS])
def test_every_yaml_loads_and_builds_with_tiny_models(row, tiny, tmp_path, monkeypatch):
    from lobes.hparams_io import load_hparams

    preview = _top_level(row["hparams"])
    placeholders = [k for k, v in preview.items() if getattr(getattr(v, "tag", None), "value", None) == "!PLACEHOLDER"]
    assert all(k.endswith("_folder") for k in placeholders), placeholders  # only corpus paths are left to the user
    monkeypatch.chdir(tmp_path)  # relative paths of the YAML land here, not in the repository
    hparams, _, _ = load_hparams(ROOT / row["hparams"], _overrides(preview, tiny, tmp_path))
    modules = hparams["modules"]
    assert modules and all(isinstance(m, torch.nn.Module) for m in modules.values())
    assert hparams["epoch_counter"].limit == hparams["number_of_epochs"]
    recoverables = hparams["checkpointer"].recoverables
    assert "counter" in recoverables and len(recoverables) >= 2  # the epoch and what trains
    for name in hparams["backbone_modules"]:
        assert name.partition(".")[0] in modules, name
    if "ser_head" in modules:
        classes = hparams["emotion_classes"]
        assert len(set(classes)) == len(classes) == hparams["n_classes"]
        head = modules["ser_head"]
        x = torch.zeros(1, 3, head.frame_proj[0].in_features)
        logits = head.eval()(x, torch.ones(1, 3, dtype=torch.bool))
        assert logits.shape == (1, len(classes))  # one output per class of the recipe's own label set
    if "task_vectors" in hparams and hasattr(hparams.get("wavlm"), "num_vectors"):
        assert hparams["wavlm"].num_vectors == len(hparams["task_vectors"])


# ------------------------------------------------------------------------------------------ (d) tiny runs
def _corpus_overrides(script, mini_iemocap, iemocap_manifests):
    corpus = Path(script).parts[1]
    if corpus == "IEMOCAP":
        return [f"--data_folder={mini_iemocap.root}", f"--prep_folder={iemocap_manifests}", "--skip_prep=True"]
    raise NotImplementedError(f"registry runs of {corpus} recipes: add its mini corpus here")


@pytest.mark.parametrize("row", RUN_HERE, ids=[r["hparams"].removeprefix("recipes/") for r in RUN_HERE])
def test_registry_tiny_run_writes_its_outputs(row, tiny, mini_iemocap, iemocap_manifests, tmp_path):
    keys = _top_level(row["hparams"])
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / row["script"]), str(ROOT / row["hparams"]),
           *_corpus_overrides(row["script"], mini_iemocap, iemocap_manifests),
           f"--wavlm_source={tiny['wavlm']}", f"--output_folder={out}", "--device=cpu", "--noprogressbar",
           *([f"--vectors_folder={tiny['vectors']}"] if "vectors_folder" in keys else []), *row["tiny_overrides"]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-5000:]
    for name in row["outputs"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{row['hparams']}: no {name}"
    m = json.loads((out / "metrics.json").read_text())
    fold = int(next(o.split("=")[1] for o in row["tiny_overrides"] if o.startswith("--fold=")))
    assert m["fold"] == fold and m["experiment"] == keys["experiment"]
    if "emotion_classes" in keys:
        test = json.loads((iemocap_manifests / f"fold{fold}" / "test.json").read_text())
        assert m["test"]["classes"] == list(keys["emotion_classes"]) and m["test"]["n"] == len(test)
        preds = list(csv.reader(open(out / "predictions.csv")))
        assert preds[0][3:] == list(keys["emotion_classes"]) and len(preds) == 1 + len(test)
    else:
        assert math.isfinite(m["wer"]) and m["wer"] >= 0
    if "lambdas.png" in row["outputs"]:  # trained λ moved away from its initial value
        lam = json.loads((out / "coefficients.json").read_text())["lambda"]
        assert set(lam) == set(keys["task_vectors"]) and any(abs(v - 0.5) > 1e-5 for v in lam["SER"])
