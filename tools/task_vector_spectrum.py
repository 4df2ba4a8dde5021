"""Energy of task vectors captured vs rank, per merge group: how far ``delta_rank`` can go (lobes.adaltm.low_rank).

    python -m tools.task_vector_spectrum exp/adaltm_recipe/task_vectors/*.safetensors \\
        --out exp/adaltm_recipe/spectrum [--ranks 1,2,4,8,16,32]

For each vector and merge group (group 0 = CNN + projection + positional conv, group l = transformer layer l,
as in ``lobes.adaltm.layer_groups``), the fraction of Σ ||ΔW||² over the group's matrices (the keys
``delta_rank`` truncates) that the best rank-r factors keep, per matrix, for each r; and the smallest rank per
matrix that reaches 0.9 of the energy (the ``delta_rank: 0.9`` choice), as the median over the group's
matrices whose ΔW is not zero. Writes ``spectrum.md`` (one table per vector), ``spectrum.json`` and ``spectrum.png`` (one line per
group, one panel per vector).
"""
import argparse
import json
import statistics
from pathlib import Path

import torch

from lobes.adaltm import layer_groups
from lobes.adaltm.low_rank import energy_captured, is_matrix, rank_for
from lobes.adaltm.task_vector import load_task_vector
from lobes.io_utils import atomic_write
from lobes.plots import _new_figure, _save

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def spectrum(delta, num_layers, stable_layer_norm, ranks):
    """{group: {"energy": {r: fraction}, "rank_0.9": median rank, "matrices": n}} for one task vector."""
    by_group = {}
    for key, t in delta.items():
        if is_matrix(t):
            by_group.setdefault(layer_groups.group_of(key, num_layers, stable_layer_norm), {})[key] = t
    out = {}
    for g in sorted(by_group):
        mats = by_group[g]
        r90 = [rank_for(torch.linalg.svdvals(t.reshape(t.shape[0], -1).double()), 0.9) for t in mats.values()]
        nonzero = [r for r in r90 if r]  # a frozen module (e.g. the CNN of a fine-tuning recipe) has ΔW = 0
        out[g] = {"energy": energy_captured(mats, ranks), "rank_0.9": statistics.median(nonzero) if nonzero else 0,
                  "matrices": len(mats), "zero_matrices": len(r90) - len(nonzero)}
    return out


def table(name, spec, ranks, num_layers):
    labels = layer_groups.group_names(num_layers)
    head = "| group | matrices (ΔW = 0) | " + " | ".join(f"r={r}" for r in ranks) + " | rank for 0.9 (median) |"
    lines = [f"### {name}", "", head, "|" + "---|" * (len(ranks) + 3)]
    for g, row in spec.items():
        cells = " | ".join(f"{row['energy'][r]:.3f}" for r in ranks)
        lines.append(f"| {labels[g]} | {row['matrices']} ({row['zero_matrices']}) | {cells} | {row['rank_0.9']:g} |")
    return "\n".join(lines)


def figure(results, ranks, path, num_layers):
    fig = _new_figure((4.5 * len(results), 4), 100)
    labels = layer_groups.group_names(num_layers)
    for i, (name, spec) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for g, row in spec.items():
            ax.plot(ranks, [row["energy"][r] for r in ranks], marker="o", ms=3, lw=1,
                    color=f"C{g % 10}", ls="-" if g < 10 else "--", label=labels[g])
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set_title(name)
        ax.set_xlabel("rank per matrix")
        if i == 0:
            ax.set_ylabel("energy captured (fraction of ||ΔW||²)")
    fig.axes[-1].legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return _save(fig, path, 100)


def run(vectors, out, ranks=DEFAULT_RANKS):
    out = Path(out)
    results, num_layers, stable = {}, None, True
    for path in vectors:
        tv = load_task_vector(path)
        num_layers = int(tv.metadata["num_layers"])
        # post-norm WavLM (Base) keeps encoder.layer_norm in group 0, stable-layer-norm (Large) in group L
        stable = "encoder.layer_norm.weight" not in tv.delta or any("final_layer_norm" in k for k in tv.delta)
        results[f"{Path(path).stem} ({tv.name})"] = spectrum(tv.delta, num_layers, stable, ranks)
    md = "\n\n".join(table(name, spec, ranks, num_layers) for name, spec in results.items())
    with atomic_write(out / "spectrum.md") as f:
        f.write("Energy captured (fraction of Σ ||ΔW||² over the group's matrices) by the best rank-r factors "
                "of each matrix.\n\n" + md + "\n")
    with atomic_write(out / "spectrum.json") as f:
        json.dump({name: {str(g): row for g, row in spec.items()} for name, spec in results.items()}, f, indent=1)
    figure(results, ranks, out / "spectrum.png", num_layers)
    return results, md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vectors", nargs="+", help="task vector .safetensors files")
    p.add_argument("--out", required=True, help="folder for spectrum.md / .json / .png")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)), help="comma-separated ranks")
    a = p.parse_args(argv)
    _, md = run(a.vectors, a.out, tuple(int(r) for r in a.ranks.split(",")))
    print(md)


if __name__ == "__main__":
    main()
