"""Checkpoint importers: every supported layout gives the canonical WavLMModel state dict."""
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import WavLMConfig, WavLMForCTC, WavLMModel

from lobes.adaltm.checkpoint_import import load_backbone_state, weight_norm_effective
from lobes.errors import DataError
from tools.make_tiny_wavlm import make_tiny_wavlm

G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
FF = "encoder.layers.{}.feed_forward.{}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base_dir = make_tiny_wavlm(root / "base", seed=0)
    ft_dir = make_tiny_wavlm(root / "ft", seed=1)
    return {
        "base_dir": base_dir,
        "ft_dir": ft_dir,
        "base": load_file(str(base_dir / "model.safetensors")),
        "ft": load_file(str(ft_dir / "model.safetensors")),
    }


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == torch.float32 and a[k].device.type == "cpu", k
        assert torch.equal(a[k], b[k]), k


def test_hf_dir_matches_wavlm_model_state(tiny):
    state, info = load_backbone_state(tiny["base_dir"])
    model = WavLMModel.from_pretrained(tiny["base_dir"])
    assert_same_state(state, model.state_dict())
    assert info["kind"] == "hf" and info["prefix"] == "" and info["dropped_keys"] == []
    assert info["weight_norm"] == "parametrizations" and info["lora"] is None


def test_hf_ctc_gives_the_wavlm_submodule(tiny, tmp_path):
    cfg = WavLMConfig.from_pretrained(tiny["base_dir"])
    torch.manual_seed(5)
    ctc = WavLMForCTC(cfg)
    ctc.save_pretrained(tmp_path / "ctc")
    for kind in ("auto", "hf_ctc"):
        state, info = load_backbone_state(tmp_path / "ctc", kind=kind)
        assert_same_state(state, ctc.wavlm.state_dict())
        assert info["kind"] == "hf_ctc" and info["prefix"] == "wavlm."
        assert info["dropped_keys"] == ["lm_head.bias", "lm_head.weight"]
    with pytest.raises(DataError, match="looks like 'hf_ctc'"):
        load_backbone_state(tmp_path / "ctc", kind="voxprofile")


def test_legacy_weight_g_v_map_to_parametrizations(tiny, tmp_path):
    legacy = {k: v for k, v in tiny["base"].items() if k not in (G, V)}
    legacy["encoder.pos_conv_embed.conv.weight_g"] = tiny["base"][G]
    legacy["encoder.pos_conv_embed.conv.weight_v"] = tiny["base"][V]
    (tmp_path / "old").mkdir()
    torch.save(legacy, tmp_path / "old" / "pytorch_model.bin")
    state, info = load_backbone_state(tmp_path / "old", kind="hf")
    assert_same_state(state, tiny["base"])
    assert info["weight_norm"] == "legacy weight_g/weight_v (renamed)"
    both = dict(legacy, **{G: tiny["base"][G]})
    torch.save(both, tmp_path / "both.bin")
    with pytest.raises(DataError, match="weight_g"):
        load_backbone_state(tmp_path / "both.bin")


def test_weight_norm_effective_matches_the_module(tiny):
    model = WavLMModel.from_pretrained(tiny["base_dir"])
    w = weight_norm_effective(tiny["base"][G], tiny["base"][V])
    assert torch.allclose(w, model.encoder.pos_conv_embed.conv.weight.detach(), rtol=0, atol=1e-6)
    # direction of each kernel tap k (dim 2) has unit norm times g[k]
    k = 3
    assert torch.linalg.vector_norm(w[:, :, k]).item() == pytest.approx(abs(tiny["base"][G][0, 0, k].item()), rel=1e-5)


def test_speechbrain_ckpt_file_dir_and_bare(tiny, tmp_path):
    prefixed = {"model." + k: v for k, v in tiny["ft"].items()}
    torch.save(prefixed, tmp_path / "wavlm_file.ckpt")
    state, info = load_backbone_state(tmp_path / "wavlm_file.ckpt")
    assert_same_state(state, tiny["ft"])
    assert info["kind"] == "speechbrain" and info["prefix"] == "model."
    # SpeechBrain checkpoint directory: wavlm.ckpt among other recoverables
    ckpt = tmp_path / "save" / "CKPT+2024-01-01+00-00-00+00"
    ckpt.mkdir(parents=True)
    torch.save(prefixed, ckpt / "wavlm.ckpt")
    torch.save({"step": torch.tensor(3)}, ckpt / "counter.ckpt")
    assert_same_state(load_backbone_state(ckpt, kind="speechbrain")[0], tiny["ft"])
    assert_same_state(load_backbone_state(tmp_path / "save")[0], tiny["ft"])  # single CKPT+ inside
    # bare WavLMModel state dict saved with torch.save
    torch.save(dict(tiny["ft"]), tmp_path / "bare.ckpt")
    state, info = load_backbone_state(tmp_path / "bare.ckpt", kind="speechbrain")
    assert_same_state(state, tiny["ft"])
    assert info["kind"] == "speechbrain" and info["prefix"] == ""


def _voxprofile_state(tiny, lora_layers, r, merged=False, ones_module=None):
    """Backbone = fine-tuned weights except the LoRA-wrapped linears, which keep the base (frozen) weight."""
    g = torch.Generator().manual_seed(7)
    sd = {"backbone_model." + k: v.clone() for k, v in tiny["ft"].items()}
    lora = {}
    for i in lora_layers:
        for name in ("intermediate_dense", "output_dense"):
            m = FF.format(i, name)
            w = tiny["base"][m + ".weight"]
            if m == ones_module:
                a, b = torch.ones(r, w.shape[1]), torch.ones(w.shape[0], r)
            else:
                a, b = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)
            sd[f"backbone_model.{m}.weight"] = w + (b @ a) * (1.0 / r) if merged else w.clone()
            sd[f"backbone_model.{m}.lora_A"], sd[f"backbone_model.{m}.lora_B"] = a, b
            lora[m] = (a, b)
    head = {
        "weights": torch.full((5,), 0.2),
        "model_seq.0.weight": torch.randn(8, 32, 1, generator=g),
        "model_seq.0.bias": torch.zeros(8),
        "emotion_layer.0.weight": torch.randn(8, 8, generator=g),
        "emotion_layer.2.weight": torch.randn(9, 8, generator=g),
        "arousal_layer.0.weight": torch.randn(8, 8, generator=g),
    }
    sd.update(head)
    return sd, lora, sorted(head)


def test_voxprofile_unmerged_lora_gives_base_plus_BA_scaling(tiny, tmp_path):
    r = 4  # loralib default lora_alpha=1 -> scaling 1/4
    ones = FF.format(3, "output_dense")
    sd, lora, head = _voxprofile_state(tiny, [2, 3], r, ones_module=ones)
    d = tmp_path / "vox"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"finetune_method": "lora", "lora_rank": r}))
    with pytest.raises(DataError, match="base_state"):
        load_backbone_state(d)
    state, info = load_backbone_state(d, base_state=tiny["base"])
    assert info["kind"] == "voxprofile" and info["prefix"] == "backbone_model."
    assert info["dropped_keys"] == head
    assert info["voxprofile_finetune_method"] == "lora"
    lo = info["lora"]
    assert (lo["case"], lo["rank"], lo["lora_alpha"], lo["scaling"], lo["layers"]) == ("unmerged", 4, 1.0, 0.25, [2, 3])
    assert sorted(state) == sorted(tiny["base"])  # lora_A/B consumed
    for k in tiny["base"]:
        m = k.rsplit(".", 1)[0]
        if m in lora and k.endswith(".weight"):
            a, b = lora[m]
            assert torch.equal(state[k], tiny["base"][k] + (b @ a) * 0.25), k
        else:
            assert torch.equal(state[k], tiny["ft"][k]), k
    # hand check: B = A = ones -> B@A = r everywhere -> ΔW = 1 (up to float32 rounding of W + 1)
    assert torch.allclose(state[ones + ".weight"] - tiny["base"][ones + ".weight"],
                          torch.ones_like(tiny["base"][ones + ".weight"]), rtol=0, atol=1e-6)
    # per-layer ||ΔW|| = Frobenius over the layer's two LoRA products; ones module: sqrt(32*64)
    a, b = lora[FF.format(3, "intermediate_dense")]
    expect3 = math.sqrt(float(((b @ a) * 0.25).pow(2).sum()) + 32 * 64)
    assert lo["delta_norm_per_layer"][3] == pytest.approx(expect3, rel=1e-6)
    assert lo["delta_norm_per_module"][ones] == pytest.approx(math.sqrt(32 * 64), rel=1e-6)
    # a non-default lora_alpha changes the scaling
    state8, info8 = load_backbone_state(d, base_state=tiny["base"], lora_alpha=8)
    assert info8["lora"]["scaling"] == 2.0
    assert torch.allclose(state8[ones + ".weight"] - tiny["base"][ones + ".weight"],
                          torch.full_like(tiny["base"][ones + ".weight"], 8.0), rtol=0, atol=1e-5)


def test_voxprofile_already_merged_lora_is_not_added_twice(tiny, tmp_path):
    sd, lora, _ = _voxprofile_state(tiny, [3], 4, merged=True)
    save_file(sd, str(tmp_path / "model.safetensors"))
    state, info = load_backbone_state(tmp_path / "model.safetensors", kind="voxprofile", base_state=tiny["base"])
    assert info["lora"]["case"] == "merged"
    for m in lora:
        assert torch.equal(state[m + ".weight"], sd["backbone_model." + m + ".weight"])


def test_voxprofile_without_lora_is_full_finetune(tiny, tmp_path):
    sd = {"backbone_model." + k: v for k, v in tiny["ft"].items()}
    sd["emotion_layer.2.bias"] = torch.zeros(9)
    save_file(sd, str(tmp_path / "model.safetensors"))
    state, info = load_backbone_state(tmp_path / "model.safetensors", base_state=tiny["base"])
    assert_same_state(state, tiny["ft"])
    assert info["lora"] is None and info["case"].startswith("full weights")


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"w": torch.zeros(2), "obj": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(DataError, match="evil.ckpt"):
        load_backbone_state(tmp_path / "evil.ckpt")
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(DataError, match="evil.bin"):
        load_backbone_state(tmp_path / "evil.bin")
    assert not marker.exists()


def test_truncated_files_raise_data_error_naming_them(tiny, tmp_path):
    data = (tiny["base_dir"] / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut/model.safetensors"):
        load_backbone_state(tmp_path / "cut")
    torch.save(dict(tiny["base"]), tmp_path / "whole.ckpt")
    blob = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(DataError, match="cut.ckpt"):
        load_backbone_state(tmp_path / "cut.ckpt")


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_backbone_state(tmp_path / "missing_dir")
    with pytest.raises(DataError, match="unknown checkpoint kind"):
        load_backbone_state(tmp_path, kind="fairseq")
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DataError, match="no WavLM backbone found"):
        load_backbone_state(tmp_path / "other.safetensors")


def test_half_precision_is_returned_as_float32(tiny, tmp_path):
    save_file({k: v.half() for k, v in tiny["base"].items()}, str(tmp_path / "model.safetensors"))
    state, info = load_backbone_state(tmp_path / "model.safetensors")
    assert info["converted_dtypes"] == ["torch.float16"]
    assert all(t.dtype == torch.float32 for t in state.values())
    assert torch.equal(state[V], tiny["base"][V].half().float())


def test_hub_id_reads_weight_files_from_cache(tiny, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        path = tiny["base_dir"] / filename
        if not path.exists():
            raise FileNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    state, info = load_backbone_state("org/tiny-wavlm", kind="hf")
    assert_same_state(state, tiny["base"])
    assert info["files"] == ["org/tiny-wavlm/model.safetensors"]
    assert calls == [("org/tiny-wavlm", "config.json"), ("org/tiny-wavlm", "model.safetensors")]


# ------------------------------------------------------------------------------------------------- peft LoRA
PEFT_CASES = {  # LoraConfig kwargs -> expected scaling per target (name suffix), computed by hand
    "rslora": (dict(r=4, lora_alpha=8, use_rslora=True), {"q_proj": 4.0, "v_proj": 4.0, "intermediate_dense": 4.0}),
    "patterns": (dict(r=4, lora_alpha=8, rank_pattern={"intermediate_dense": 2}, alpha_pattern={"v_proj": 3}),
                 {"q_proj": 2.0, "v_proj": 0.75, "intermediate_dense": 4.0}),
}


def _peft_wavlm(base_dir, cfg):
    """A tiny WavLM with peft LoRA on q/v/intermediate_dense; B random (peft starts it at 0, ΔW would be 0)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(WavLMModel.from_pretrained(base_dir),
                           LoraConfig(target_modules=["q_proj", "v_proj", "intermediate_dense"], **cfg))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_gives_merge_and_unload_weights_and_its_exact_factors(tiny, tmp_path, case):
    import copy

    cfg, scalings = PEFT_CASES[case]
    model = _peft_wavlm(tiny["base_dir"], cfg)
    lora = {n[len("base_model.model."):] + ".weight": (m.lora_A["default"].weight.detach().clone(),
                                                       m.lora_B["default"].weight.detach().clone())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(lora) == 3 * 4  # three targets in each of the 4 layers
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    torch.save(model.state_dict(), tmp_path / "adapter" / "peft_state.pt")  # names with .default / .base_layer
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for source in (tmp_path / "adapter", tmp_path / "adapter" / "peft_state.pt"):
        state, info = load_backbone_state(source, base_state=tiny["base"])
        assert info["kind"] == "peft" and info["lora"]["case"] == "unmerged"
        assert sorted(state) == sorted(merged)
        for k in merged:  # the dense ΔW = merge_and_unload's weight − base, every key
            assert torch.allclose(state[k] - tiny["base"][k], merged[k] - tiny["base"][k], rtol=0, atol=1e-6), k
        factors = info["lora"]["factors"]
        assert sorted(factors) == sorted(lora)
        for kw, (u, v) in factors.items():  # kept exactly: U = B·scaling, V = Aᵀ (peft's scaling, by hand)
            a, b = lora[kw]
            s = scalings[kw.split(".")[-2]]
            assert torch.equal(u, b * s) and torch.equal(v, a.T), kw
            assert torch.allclose(u @ v.T, merged[kw] - tiny["base"][kw], rtol=0, atol=1e-6), kw


def test_peft_adapter_refusals_name_the_file(tiny, tmp_path):
    model = _peft_wavlm(tiny["base_dir"], dict(r=2, lora_alpha=4))
    model.save_pretrained(tmp_path / "a", save_embedding_layers=False)
    with pytest.raises(DataError, match="lora_alpha is given"):
        load_backbone_state(tmp_path / "a", base_state=tiny["base"], lora_alpha=4)
    with pytest.raises(DataError, match="pass base_state"):  # an adapter alone needs its base
        load_backbone_state(tmp_path / "a")
    with pytest.raises(DataError, match="looks like|not 'hf'"):
        load_backbone_state(tmp_path / "a", kind="hf", base_state=tiny["base"])
    (tmp_path / "a" / "adapter_config.json").rename(tmp_path / "a" / "moved.json")
    with pytest.raises(DataError, match="adapter_model.safetensors.*no adapter_config.json"):
        load_backbone_state(tmp_path / "a" / "adapter_model.safetensors", base_state=tiny["base"])
