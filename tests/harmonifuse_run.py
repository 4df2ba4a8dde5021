"""The HarmoniFuse recipe run shared by the recipe and export tests (fixture ``harmonifuse_trained`` in conftest.py,
built once per session): train.py on the full row, 4 interleaved batches (2 ASR, 2 SER), then validation and test,
on smaller evaluation sets (``N_EVAL``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/MSP-Podcast/harmonifuse"
N_EVAL = {"msp": 16, "libri": 8}  # evaluation subsets: 2 utterances per emotion class, 8 LibriSpeech utterances


def subset_manifests(src, dst, keep):
    """Copy the prepared manifests; ``keep[split]`` picks the utterances of the smaller evaluation sets."""
    dst.mkdir(parents=True)
    for path in src.glob("*.json"):
        data = json.loads(path.read_text())
        pick = keep.get(path.stem)
        (dst / path.name).write_text(json.dumps(pick(data) if pick else data))
    return dst


def two_per_class(data):
    out, seen = {}, {}
    for utt, entry in sorted(data.items()):
        if seen.get(entry["emo"], 0) < 2:
            seen[entry["emo"]] = seen.get(entry["emo"], 0) + 1
            out[utt] = entry
    return out


def train_full_row(mini_corpora, msp_manifests, libri_manifests, root):
    """The experiment folder of one training run of the full row under ``root`` (tiny WavLM + tiny LM)."""
    from tools.make_tiny_lm import make_tiny_lm
    from tools.make_tiny_wavlm import make_tiny_wavlm

    wavlm, lm = make_tiny_wavlm(root / "wavlm"), make_tiny_lm(root / "lm")
    first = lambda n: (lambda d: dict(sorted(d.items())[:n]))  # noqa: E731
    msp = subset_manifests(msp_manifests, root / "msp", {"valid": two_per_class, "test": two_per_class})
    libri = subset_manifests(libri_manifests, root / "libri", {"dev-clean": first(8), "test-clean": first(8)})
    out = root / "exp"
    cmd = [sys.executable, str(RECIPE / "train.py"), str(RECIPE / "hparams/rows/full.yaml"),
           "--msp_folder", str(mini_corpora.msp), "--libri_folder", str(mini_corpora.libri),
           "--skip_prep=True", f"--msp_prep_folder={msp}", f"--libri_prep_folder={libri}",
           f"--wavlm_source={wavlm}", f"--lm_source={lm}", f"--output_folder={out}",
           "--number_of_epochs=1", "--interleave_length=4", "--asr_batch_size=8", "--ser_batch_size=8",
           "--lr=0.01", "--asr_max_decode_len=20", "--ser_max_decode_len=10", "--num_bootstraps=20",
           "--device=cpu", "--noprogressbar"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out
