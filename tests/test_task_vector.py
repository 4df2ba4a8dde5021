"""Task vectors (AdaLTM eqs. 2-3): exact ΔW, safetensors round trip, architecture checks, extraction tool."""
import math

import pytest
import torch
from safetensors.torch import load_file

from lobes.errors import DataError
from lobes.adaltm.task_vector import (
    TaskVector,
    architecture_fingerprint,
    backbone_group,
    check_compatible,
    compute_task_vector,
    load_task_vector,
    save_task_vector,
)
from tools.extract_task_vector import extract_task_vector, main
from tools.make_tiny_wavlm import make_tiny_wavlm

# Tiny config (tools/tiny_configs/wavlm.json): 7 conv layers (7 weights + 7 layer norms x2) + projection (4)
# + pos_conv (3) = 28 group-0 keys; layer 0 has 20 keys (rel_attn_embed), layers 1-3 19 each; + 2 final LN.
N_KEYS = 28 + 20 + 3 * 19 + 2
LAYER3_KEYS = 19


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        "base": make_tiny_wavlm(root / "base", seed=0),
        "ft": make_tiny_wavlm(root / "ft", seed=1),
        "l3": make_tiny_wavlm(root / "l3", seed=2, num_layers=3),
        "h48": make_tiny_wavlm(root / "h48", seed=3, hidden_size=48),
    }
    states = {k: load_file(str(d / "model.safetensors")) for k, d in dirs.items()}
    return dirs, states


def test_delta_is_exact_difference_for_every_key(models):
    _, s = models
    tv = compute_task_vector(s["base"], s["ft"], "ASR")
    assert tv.keys() == sorted(s["base"]) and len(tv.keys()) == N_KEYS
    for k in s["base"]:
        assert torch.equal(tv.delta[k], s["ft"][k] - s["base"][k]), k
    assert tv.num_params() == sum(t.numel() for t in s["base"].values())
    assert tv.metadata["num_layers"] == "4" and tv.metadata["hidden_size"] == "32"
    assert tv.metadata["num_keys"] == str(N_KEYS)


def test_handmade_delta_skips_integer_buffers_and_groups_norms():
    base = {
        "feature_projection.projection.weight": torch.tensor([1.0, 2.0]),
        "encoder.layers.0.attention.k_proj.weight": torch.tensor([0.0, 0.0, 0.0]),
        "encoder.layers.10.attention.k_proj.weight": torch.tensor([1.0]),
        "encoder.layer_norm.weight": torch.tensor([1.0]),
        "steps": torch.tensor([3], dtype=torch.long),
    }
    ft = {
        "feature_projection.projection.weight": torch.tensor([4.0, 6.0]),  # Δ = (3, 4) -> norm 5
        "encoder.layers.0.attention.k_proj.weight": torch.tensor([1.0, 2.0, 2.0]),  # norm 3
        "encoder.layers.10.attention.k_proj.weight": torch.tensor([-1.0]),  # Δ = -2
        "encoder.layer_norm.weight": torch.tensor([1.5]),
        "steps": torch.tensor([7], dtype=torch.long),
    }
    tv = compute_task_vector(base, ft, "SER", metadata={"kind": "hf"})
    assert "steps" not in tv.delta
    assert torch.equal(tv.delta["feature_projection.projection.weight"], torch.tensor([3.0, 4.0]))
    assert tv.num_params() == 7
    norms = tv.norm_per_group()
    # numeric layer order (10 after 0), final layer norm reported on its own, last
    assert list(norms) == ["group 0", "layer 0", "layer 10", "encoder.layer_norm"]
    assert norms == {"group 0": 5.0, "layer 0": 3.0, "layer 10": 2.0, "encoder.layer_norm": 0.5}
    assert tv.norm() == pytest.approx(math.sqrt(25 + 9 + 4 + 0.25))
    assert tv.metadata["kind"] == "hf" and tv.metadata["num_layers"] == "11"


def test_backbone_group_names():
    assert backbone_group("feature_extractor.conv_layers.0.conv.weight") == "group 0"
    assert backbone_group("encoder.pos_conv_embed.conv.parametrizations.weight.original0") == "group 0"
    assert backbone_group("masked_spec_embed") == "group 0"
    assert backbone_group("encoder.layers.23.feed_forward.output_dense.bias") == "layer 23"
    assert backbone_group("encoder.layer_norm.bias") == "encoder.layer_norm"


def test_save_load_round_trip_bit_exact(models, tmp_path):
    _, s = models
    tv = compute_task_vector(s["base"], s["ft"], "ASR",
                             metadata={"base_source": "b", "finetuned_source": "f", "kind": "hf"})
    path = save_task_vector(tv, tmp_path / "tv" / "asr.safetensors")
    back = load_task_vector(path)
    assert back.name == "ASR"
    assert back.metadata == tv.metadata
    assert back.keys() == tv.keys()
    for k in tv.keys():
        assert back.delta[k].dtype == tv.delta[k].dtype
        assert torch.equal(back.delta[k], tv.delta[k]), k
    m = back.metadata
    assert (m["base_source"], m["finetuned_source"], m["kind"]) == ("b", "f", "hf")
    assert m["fingerprint"] == architecture_fingerprint(s["base"])
    assert m["fingerprint"].startswith(f"wavlm-L4-H32-K{N_KEYS}-")
    assert m["toolkit_version"] and m["format"] == "adaltm-task-vector"
    assert not [p for p in (tmp_path / "tv").iterdir() if p.name != "asr.safetensors"]  # no temp left


def test_fingerprint_separates_architectures(models):
    _, s = models
    fp = {k: architecture_fingerprint(v) for k, v in s.items()}
    assert fp["base"] == fp["ft"]
    assert len({fp["base"], fp["l3"], fp["h48"]}) == 3
    assert fp["l3"].startswith(f"wavlm-L3-H32-K{N_KEYS - LAYER3_KEYS}-")
    assert fp["h48"].startswith(f"wavlm-L4-H48-K{N_KEYS}-")


def test_other_layer_count_is_refused_naming_keys(models):
    _, s = models
    with pytest.raises(DataError) as e:
        compute_task_vector(s["l3"], s["ft"], "ASR")
    msg = str(e.value)
    assert f"{LAYER3_KEYS} unexpected keys in fine-tuned" in msg
    assert "encoder.layers.3.attention.k_proj.weight" in msg
    assert "missing" not in msg


def test_other_hidden_size_is_refused_with_both_shapes(models):
    _, s = models
    with pytest.raises(DataError) as e:
        compute_task_vector(s["base"], s["h48"], "ASR")
    msg = str(e.value)
    n_bad = sum(tuple(s["base"][k].shape) != tuple(s["h48"][k].shape) for k in s["base"])
    assert n_bad > 20  # the list is capped
    assert f"{n_bad} shape mismatches" in msg
    assert "encoder.layer_norm.weight (32,) vs (48,)" in msg
    assert f"and {n_bad - 20} more" in msg


def test_missing_and_renamed_keys_are_named(models):
    _, s = models
    ft = dict(s["ft"])
    del ft["encoder.layers.2.feed_forward.output_dense.bias"]
    with pytest.raises(DataError, match=r"1 keys missing in fine-tuned: encoder\.layers\.2\.feed_forward\.output_dense\.bias"):
        compute_task_vector(s["base"], ft, "ASR")
    ft = dict(s["ft"])
    ft["encoder.layers.1.attention.q.weight"] = ft.pop("encoder.layers.1.attention.q_proj.weight")
    with pytest.raises(DataError) as e:
        compute_task_vector(s["base"], ft, "ASR")
    assert "encoder.layers.1.attention.q_proj.weight" in str(e.value)  # missing
    assert "encoder.layers.1.attention.q.weight" in str(e.value)  # unexpected


def test_nonfinite_finetuned_weights_are_refused(models):
    _, s = models
    ft = dict(s["ft"])
    ft["encoder.layers.0.attention.v_proj.bias"] = ft["encoder.layers.0.attention.v_proj.bias"].clone()
    ft["encoder.layers.0.attention.v_proj.bias"][3] = float("nan")
    with pytest.raises(DataError, match="encoder.layers.0.attention.v_proj.bias"):
        compute_task_vector(s["base"], ft, "ASR")


def test_check_compatible_against_other_bases(models, tmp_path):
    _, s = models
    tv = load_task_vector(save_task_vector(compute_task_vector(s["base"], s["ft"], "SER"), tmp_path / "t.safetensors"))
    check_compatible(tv, s["base"])  # same architecture: no error
    with pytest.raises(DataError) as e:
        check_compatible(tv, s["l3"])
    assert f"{LAYER3_KEYS} unexpected keys in task vector 'SER'" in str(e.value)
    assert "encoder.layers.3.final_layer_norm.weight" in str(e.value)
    with pytest.raises(DataError) as e:
        check_compatible(tv, s["h48"])
    n_bad = sum(tuple(s["base"][k].shape) != tuple(s["h48"][k].shape) for k in s["base"])
    assert f"{n_bad} shape mismatches (base vs task vector 'SER')" in str(e.value)
    assert "encoder.layer_norm.weight (48,) vs (32,)" in str(e.value)
    partial = TaskVector("SER", {k: v for k, v in tv.delta.items() if k != "encoder.layer_norm.bias"})
    with pytest.raises(DataError, match=r"1 keys missing in task vector 'SER': encoder\.layer_norm\.bias"):
        check_compatible(partial, s["base"])


def test_load_refuses_truncated_foreign_and_missing_files(models, tmp_path):
    dirs, s = models
    path = save_task_vector(compute_task_vector(s["base"], s["ft"], "ASR"), tmp_path / "asr.safetensors")
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.safetensors"):
        load_task_vector(trunc)
    with pytest.raises(DataError, match="not a task vector file"):
        load_task_vector(dirs["base"] / "model.safetensors")  # a model, not a vector
    with pytest.raises(DataError, match="nope.safetensors"):
        load_task_vector(tmp_path / "nope.safetensors")


def test_extract_tool_writes_vector_and_prints_groups(models, tmp_path, capsys):
    dirs, s = models
    out = extract_task_vector(dirs["base"], dirs["ft"], "ASR", tmp_path / "asr.safetensors")
    tv = load_task_vector(out)
    for k in s["base"]:
        assert torch.equal(tv.delta[k], s["ft"][k] - s["base"][k])
    assert tv.metadata["base_source"] == str(dirs["base"]) and tv.metadata["kind"] == "hf"
    text = capsys.readouterr().out
    lines = {ln.split()[0] + (" " + ln.split()[1] if ln.startswith(("group", "layer")) else ""): ln
             for ln in text.splitlines() if ln.startswith(("group 0", "layer ", "encoder."))}
    assert list(lines) == ["group 0", "layer 0", "layer 1", "layer 2", "layer 3", "encoder.layer_norm"]
    norms = tv.norm_per_group()
    assert float(lines["layer 2"].split()[3]) == pytest.approx(norms["layer 2"], rel=1e-5)
    # CLI: same result, path returned; a mismatch exits with code 2
    assert main(["--base", str(dirs["base"]), "--finetuned", str(dirs["ft"]), "--name", "ASR",
                 "--out", str(tmp_path / "cli.safetensors")]) == str(tmp_path / "cli.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["--base", str(dirs["l3"]), "--finetuned", str(dirs["ft"]), "--name", "ASR",
              "--out", str(tmp_path / "bad.safetensors")])
    assert e.value.code == 2 and not (tmp_path / "bad.safetensors").exists()
