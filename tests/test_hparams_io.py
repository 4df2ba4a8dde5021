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
