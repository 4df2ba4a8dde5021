"""Row files: a Table-1 row = its base recipe YAML + only the keys that differ."""
import pytest

from lobes.hparams_io import load_hparams, resolve_row

ROWS = "recipes/MSP-Podcast/adaltm/hparams/rows"
OVR = {"data_folder": "x", "wavlm_source": "unused", "vectors_folder": "V"}


def _row(name, overrides=""):
    import ruamel.yaml
    return ruamel.yaml.YAML().load(resolve_row(f"{ROWS}/{name}.yaml"))  # round trip: tags kept as-is


def test_row_overrides_only_its_keys_and_keeps_long_strings():
    base = _row("setup1_frozen")
    dual = _row("setup4_dual")
    assert base["lr"] == dual["lr"] == 0.0001 and base["number_of_epochs"] == 100
    assert dual["lambda_mode"] == "layerwise" and dual["experiment"] == "setup4_dual"
    assert [r["row"] for r in dual["table_rows"]] == [
        "Setup 4: Proposed Dual-Vector", "In-Domain Dual-Vectors (Ours)", "Adaptive Layer-wise Merging (Ours)"]
    assert _row("static_global")["lambda_mode"] == "fixed"
    assert _row("adaptive_global")["lambda_mode"] == "global"


def test_unknown_row_key_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.1\nname: a\n")
    (tmp_path / "row.yaml").write_text("base_hparams: base.yaml\nlearning_rate: 0.2\n")
    with pytest.raises(KeyError, match="learning_rate"):
        resolve_row(tmp_path / "row.yaml")


def test_command_line_overrides_win_over_row(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.1\nepochs: 3\nvecs: {}\n")
    (tmp_path / "row.yaml").write_text("base_hparams: base.yaml\nepochs: 5\nvecs:\n    ASR: a.safetensors\n")
    h, path, _ = load_hparams(tmp_path / "row.yaml", "epochs: 7")
    assert h == {"lr": 0.1, "epochs": 7, "vecs": {"ASR": "a.safetensors"}}
    assert "epochs: 5" in open(path).read()  # the saved effective file holds the row's values


def test_unknown_nested_row_key_names_the_file_and_the_key_path(tmp_path):
    (tmp_path / "base.yaml").write_text("ratio: {asr: 1, ser: 1}\nvecs: {}\nopt: {lr: 0.1, wd: 0.0}\n",
                                        encoding="utf-8")
    row = tmp_path / "rows" / "row.yaml"
    row.parent.mkdir()
    row.write_text("base_hparams: ../base.yaml\nratio: {asr: 1, sre: 2}\nvecs: {ASR: a.safetensors}\n",
                   encoding="utf-8")
    with pytest.raises(KeyError, match=r"row\.yaml: keys \['ratio\.sre'\] do not exist in its base .*base\.yaml"):
        resolve_row(row)
    # known nested keys (a subset) and an empty base mapping filled by the row are accepted; the row's mapping
    # replaces the base's as a whole
    row.write_text("base_hparams: ../base.yaml\nratio: {asr: 2}\nvecs: {ASR: a.safetensors}\n# λ é\n",
                   encoding="utf-8")
    h, _, _ = load_hparams(row)
    assert h == {"ratio": {"asr": 2}, "vecs": {"ASR": "a.safetensors"}, "opt": {"lr": 0.1, "wd": 0.0}}


def test_every_recipe_base_yaml_declares_the_loader_and_metric_settings():
    import glob

    import ruamel.yaml

    needed = {"seed", "num_workers", "num_buckets", "ckpts_to_keep", "backbone_modules", "backbone_opt_class",
              "dynamic_batching"}
    for path in glob.glob("recipes/*/*/hparams/*.yaml"):
        keys = set(ruamel.yaml.YAML().load(open(path, encoding="utf-8")))
        assert needed <= keys, (path, needed - keys)
        if "ser_head" in keys or "speech_lm" in keys:
            assert {"emotion_classes", "num_bootstraps", "speaker_bootstrap"} <= keys, path


def test_row_chained_on_a_row_loads_was_a_scanner_error(tmp_path):
    """A row on setup4_dual.yaml (itself a row) setting ``table_rows: []`` raised ruamel's ScannerError "mapping
    values are not allowed here" (``exp_folder: exp/adaltm output_folder: ...``): each level was dumped and re-read,
    and the comment after ``data_folder: !PLACEHOLDER`` lost its line break on the second dump."""
    import ruamel.yaml

    from pathlib import Path

    dual = (Path(ROWS) / "setup4_dual.yaml").resolve()
    (tmp_path / "chained.yaml").write_text(f"base_hparams: {dual}\nexperiment: chained\ntable_rows: []\n",
                                           encoding="utf-8")
    text = resolve_row(tmp_path / "chained.yaml")
    merged = ruamel.yaml.YAML().load(text)
    assert merged["table_rows"] == [] and merged["experiment"] == "chained"
    assert merged["exp_folder"] == "exp/adaltm" and merged["output_folder"].value == "<exp_folder>/<experiment>/<seed>"
    assert sorted(merged["task_vectors"]) == ["ASR", "SER"] and merged["lambda_mode"] == "layerwise"
    assert sorted(merged) == sorted(ruamel.yaml.YAML().load(resolve_row(f"{ROWS}/setup4_dual.yaml")))
    # the same through the loader, on a plain three-level chain with a comment after a tag
    (tmp_path / "base.yaml").write_text("a: !PLACEHOLDER  # note\nb: x\nc: y\n", encoding="utf-8")
    (tmp_path / "r1.yaml").write_text("base_hparams: base.yaml\nc: [1, 2]\n", encoding="utf-8")
    (tmp_path / "r2.yaml").write_text("base_hparams: r1.yaml\nc: []\n", encoding="utf-8")
    h, _, _ = load_hparams(tmp_path / "r2.yaml", "a: 1")
    assert h == {"a": 1, "b": "x", "c": []}


def test_row_with_command_line_table_rows_override_loads_was_a_scanner_error():
    """``run.sh ... --adaltm_args "--table_rows=[] ..."`` on setup3_ser_only.yaml: hyperpyyaml re-dumps the resolved
    row to apply the overrides, and the comment ruamel had moved after ``data_folder: !PLACEHOLDER`` lost its line
    break (ScannerError "mapping values are not allowed here"). Resolved rows now carry no comments."""
    overrides = ("seed: 1986\nwavlm_source: tools/fixtures/tiny_wavlm_pretrained\n"
                 "data_folder: exp/adaltm_recipe/data/MSP-Podcast\nprep_folder: exp/adaltm_recipe/prep/msp\n"
                 "skip_prep: True\ntest_splits: [Test1]\nexp_folder: exp/adaltm_recipe/rows\n"
                 "vectors_folder: exp/adaltm_recipe/task_vectors\nnumber_of_epochs: 15\nlr: 0.01\nbatch_size: 16\n"
                 "head_hidden: 64\nnum_bootstraps: 200\ndelta_rank: 2\nmerge_impl: lowrank\n"
                 "experiment: setup3_ser_only_lowrank_r2\ntable_rows: []")
    import ruamel.yaml
    from hyperpyyaml.core import resolve_references

    text = resolve_row(f"{ROWS}/setup3_ser_only.yaml")
    resolved = ruamel.yaml.YAML().load(resolve_references(text, overrides))
    assert "#" not in text.replace('"#', "")
    assert resolved["table_rows"] == [] and resolved["delta_rank"] == 2 and resolved["merge_impl"] == "lowrank"
    assert resolved["exp_folder"] == "exp/adaltm_recipe/rows"
    assert resolved["output_folder"] == "exp/adaltm_recipe/rows/setup3_ser_only_lowrank_r2/1986"
    assert sorted(resolved["task_vectors"]) == ["SER"] and resolved["lambda_mode"] == "layerwise"
