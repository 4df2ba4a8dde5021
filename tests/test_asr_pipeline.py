"""The ASR-CTC export (``lobes.ctc_export.export_ctc_model``, called by every asr_ctc/train.py) loads in
``transformers.pipeline("automatic-speech-recognition")``, which transcribes the mini IEMOCAP wavs into the very
strings the recipe's own greedy decoding gives, and keeps the backbone readable as a plain WavLM."""
import json
from pathlib import Path

import pytest
import soundfile as sf
import speechbrain as sb
import torch

from lobes import ctc_text

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tools" / "fixtures" / "tiny_wavlm_pretrained"
ASR_DIR = "recipes/IEMOCAP/asr_ctc"


@pytest.fixture(scope="module")
def recipe_asr(load_recipe, mini_iemocap, iemocap_manifests, tmp_path_factory):
    """The IEMOCAP ASR recipe's Brain (tiny pretrained WavLM, untrained head: a varied best path), its test-set
    hypotheses from its own compute_forward / compute_objectives, and its export folder."""
    from lobes.ctc_export import export_ctc_model
    from lobes.dataio import asr_datasets
    from lobes.hparams_io import load_hparams

    train = load_recipe(f"{ASR_DIR}/train.py")
    out = tmp_path_factory.mktemp("asr_pipeline")
    hparams, _, _ = load_hparams(ROOT / ASR_DIR / "hparams" / "train_asr_ctc.yaml", {
        "data_folder": str(mini_iemocap.root), "prep_folder": str(iemocap_manifests), "skip_prep": True,
        "wavlm_source": str(TINY), "output_folder": str(out), "fold": 1})
    torch.manual_seed(0)
    brain = train.ASRBrain(modules=hparams["modules"], opt_class=hparams["opt_class"], hparams=hparams,
                           run_opts={"device": "cpu"}, checkpointer=None)
    test = asr_datasets(train.iemocap_manifests(hparams, asr=True))["test"]
    batch = sb.dataio.batch.PaddedBatch([test[i] for i in range(len(test))])
    brain.modules.eval()
    brain.on_stage_start(sb.Stage.TEST)  # the recipe's collectors
    with torch.no_grad():
        brain.compute_objectives(brain.compute_forward(batch, sb.Stage.TEST), batch, sb.Stage.TEST)
    hyps = dict(zip(brain.asr["ids"], brain.asr["hyps"]))
    export_ctc_model(brain.modules.wavlm, brain.modules.ctc_head, hparams["export_folder"])  # as train.py
    manifest = json.loads(open(train.iemocap_manifests(hparams, asr=True)["test"]).read())
    return {"hyps": hyps, "export": hparams["export_folder"], "brain": brain,
            "wavs": {u: e["wav"] for u, e in manifest.items()}}


def test_pipeline_transcribes_as_the_recipe_decodes(recipe_asr):
    from transformers import pipeline

    asr = pipeline("automatic-speech-recognition", model=str(recipe_asr["export"]), device="cpu")
    got = {}
    for utt, wav in recipe_asr["wavs"].items():
        samples, rate = sf.read(wav, dtype="float32")  # a path works too where ffmpeg is installed
        got[utt] = asr({"raw": samples, "sampling_rate": rate})["text"]
    hyps = recipe_asr["hyps"]
    assert len(got) == len(hyps) == 12  # fold 1's test session: 2 speakers x 6 transcribed utterances
    assert got == hyps
    # not a vacuous equality: the untrained head gives long, varied strings, several with word delimiters
    assert len(set(hyps.values())) == len(hyps) and min(len(h) for h in hyps.values()) >= 20
    assert sum(" " in h for h in hyps.values()) >= 3, hyps


def test_export_is_wavlm_for_ctc_with_the_processor_and_the_same_backbone(recipe_asr):
    from transformers import AutoProcessor, WavLMForCTC

    from lobes.adaltm.checkpoint_import import load_backbone_state

    export, brain = recipe_asr["export"], recipe_asr["brain"]
    model, info = WavLMForCTC.from_pretrained(export, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert torch.equal(model.lm_head.weight, brain.modules.ctc_head.weight)
    proc = AutoProcessor.from_pretrained(export)
    assert proc.tokenizer.convert_ids_to_tokens(list(range(len(ctc_text.VOCAB)))) == ctc_text.VOCAB
    assert proc.tokenizer.pad_token_id == ctc_text.CHAR_TO_INDEX[ctc_text.BLANK] == model.config.pad_token_id == 0
    assert proc.feature_extractor.do_normalize is True and proc.feature_extractor.sampling_rate == 16000
    # the task-vector import reads the backbone alone, tensor for tensor what the recipe trained
    state, imported = load_backbone_state(export, kind="hf")
    expected = brain.modules.wavlm.export_state()
    assert sorted(state) == sorted(expected) and imported["dropped_keys"] == ["lm_head.bias", "lm_head.weight"]
    assert all(torch.equal(state[k], expected[k].float()) for k in expected)


@pytest.mark.parametrize("path, text", [
    ("__HH_E_LL_LLO||_WOR_LD|_", "HELLO WORLD"),     # repeats merged, blanks dropped, ends stripped
    ("|DON|'|T_|", "DON ' T"),                        # apostrophe kept as is (no clean-up of " ' ")
    ("A_A||B", "AA B"),                               # a blank separates two equal letters
])
def test_tokenizer_decodes_a_best_path_as_ctc_greedy_decode(path, text, tmp_path):
    from lobes.ctc_export import ctc_tokenizer

    ids = [0 if c == "_" else ctc_text.CHAR_TO_INDEX[c] for c in path]  # "_": the blank [PAD]
    one_hot = torch.nn.functional.one_hot(torch.tensor([ids]), len(ctc_text.VOCAB)).float()
    assert ctc_text.ctc_greedy_decode(one_hot)[0] == text
    assert ctc_tokenizer(tmp_path).decode(ids) == text


def test_known_difference_two_delimiters_around_a_blank(tmp_path):
    """Documented in lobes/ctc_export.py: transformers keeps both spaces, our decoding collapses them."""
    from lobes.ctc_export import ctc_tokenizer

    ids = [ctc_text.CHAR_TO_INDEX[c] if c != "_" else 0 for c in "A|_|B"]
    one_hot = torch.nn.functional.one_hot(torch.tensor([ids]), len(ctc_text.VOCAB)).float()
    assert ctc_text.ctc_greedy_decode(one_hot)[0] == "A B"
    assert ctc_tokenizer(tmp_path).decode(ids) == "A  B"
