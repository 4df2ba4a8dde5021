"""Extract a task vector ΔW = W_finetuned − W_base (AdaLTM eqs. 2-3) and save it as safetensors.

    python -m tools.extract_task_vector --base microsoft/wavlm-large \\
        --finetuned exp/msp_asr/save/CKPT+best --kind speechbrain --name ASR --out exp/tv/asr.safetensors

``--base`` / ``--finetuned`` take anything :func:`lobes.adaltm.checkpoint_import.load_backbone_state` reads (hf dir or
hub id, WavLMForCTC, SpeechBrain ckpt, vox-profile). Prints what the importer detected and the ΔW norm per
group ("group 0" = CNN/projection/pos_conv/masked_spec_embed, "layer i" = encoder.layers.i, other keys such
as encoder.layer_norm separately).
"""
import argparse
import logging
import math
import sys

from lobes.adaltm.checkpoint_import import KINDS, load_backbone_state
from lobes.errors import DataError
from lobes.adaltm.task_vector import backbone_group, compute_task_vector, save_task_vector


def group_summary(tv, base_state):
    """Rows (group, num_params, ||ΔW||, ||W_base||) in group order."""
    base_sq, counts = {}, {}
    for k, t in tv.delta.items():
        g = backbone_group(k)
        counts[g] = counts.get(g, 0) + t.numel()
        base_sq[g] = base_sq.get(g, 0.0) + float(base_state[k].double().pow(2).sum())
    return [(g, counts[g], n, math.sqrt(base_sq[g])) for g, n in tv.norm_per_group().items()]


def format_summary(tv, base_state, info):
    lines = [f"task vector '{tv.name}': {len(tv.delta)} keys, {tv.num_params()} params, "
             f"||ΔW|| = {tv.norm():.6g}, fingerprint {tv.metadata['fingerprint']}",
             f"fine-tuned source: kind={info['kind']} prefix='{info['prefix']}' weight_norm={info['weight_norm']} "
             f"dropped={len(info['dropped_keys'])} keys",
             f"case: {info['case']}"]
    if info.get("lora"):
        lo = info["lora"]
        lines.append(f"LoRA: {lo['case']}, rank {lo['rank']}, alpha {lo['lora_alpha']}, scaling {lo['scaling']}, "
                     f"layers {lo['layers']}")
    lines.append(f"{'group':<24}{'params':>12}{'||ΔW||':>14}{'||W_base||':>14}{'ratio':>12}")
    for g, n, d, b in group_summary(tv, base_state):
        lines.append(f"{g:<24}{n:>12}{d:>14.6g}{b:>14.6g}{(d / b if b else float('nan')):>12.3e}")
    return "\n".join(lines)


def extract_task_vector(base, finetuned, name, out, kind="auto", base_kind="auto", lora_alpha=None, verbose=True):
    """Load both backbones, compute ΔW, save to ``out`` (safetensors); returns ``out``."""
    base_state, base_info = load_backbone_state(base, kind=base_kind)
    ft_state, ft_info = load_backbone_state(finetuned, kind=kind, base_state=base_state, lora_alpha=lora_alpha)
    meta = {
        "kind": ft_info["kind"],
        "base_source": str(base),
        "finetuned_source": str(finetuned),
        "base_kind": base_info["kind"],
        "import_case": ft_info["case"],
    }
    if ft_info.get("lora"):
        meta["lora_case"] = ft_info["lora"]["case"]
        meta["lora_scaling"] = str(ft_info["lora"]["scaling"])
    tv = compute_task_vector(base_state, ft_state, name, metadata=meta)
    if ft_info.get("lora"):  # exact low-rank factors of the LoRA-trained weights (lobes.adaltm.low_rank)
        tv.factors = dict(ft_info["lora"]["factors"])
    save_task_vector(tv, out)
    if verbose:
        print(format_summary(tv, base_state, ft_info))
        print(f"saved {out}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base checkpoint (hf dir / hub id / ckpt)")
    p.add_argument("--finetuned", required=True, help="fine-tuned checkpoint")
    p.add_argument("--kind", default="auto", choices=KINDS, help="layout of --finetuned")
    p.add_argument("--base-kind", default="auto", choices=KINDS, help="layout of --base")
    p.add_argument("--lora-alpha", type=float, default=None, help="loralib lora_alpha (default 1)")
    p.add_argument("--name", required=True, help="task name, e.g. ASR or SER")
    p.add_argument("--out", required=True, help="output .safetensors")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return extract_task_vector(a.base, a.finetuned, a.name, a.out, kind=a.kind, base_kind=a.base_kind,
                                   lora_alpha=a.lora_alpha)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
