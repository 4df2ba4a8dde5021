"""λ of eq. (4): the merging coefficients, one row per task vector and one column per layer group.

Modes (Table 1, Part 4):
- ``fixed``     : static global merging, λ = ``init`` everywhere, not trained (a buffer);
- ``global``    : adaptive global merging, one learnable λ per task vector shared by all groups;
- ``layerwise`` : adaptive layer-wise merging (AdaLTM), one learnable λ per task vector per group.
All start at ``init`` (0.5 in the paper).
"""
import torch

MODES = ("fixed", "global", "layerwise")


class MergeCoefficients(torch.nn.Module):
    def __init__(self, vector_names, num_groups, mode="layerwise", init=0.5):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"lambda mode '{mode}' is not one of {MODES}")
        self.vector_names = list(vector_names)
        self.num_groups = num_groups
        self.mode = mode
        cols = num_groups if mode == "layerwise" else 1
        values = torch.full((len(self.vector_names), cols), float(init))
        if mode == "fixed" or not self.vector_names:
            # nothing to train (Setup 1 has no task vector): a trainable parameter that never gets a gradient
            # would stop DDP at the second step
            self.register_buffer("lam", values)
        else:
            self.lam = torch.nn.Parameter(values)
        # bumped on every state-dict load: MergedWavLM (materialized) re-merges when λ changed without a GPU read
        self.revision = 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.revision += 1

    def forward(self):
        """λ as a [num_vectors, num_groups] tensor (global modes broadcast their single column)."""
        return self.lam.expand(len(self.vector_names), self.num_groups)

    def as_dict(self):
        """{vector name: [λ per group]} for logs, plots and model cards."""
        lam = self().detach().cpu()
        return {name: lam[k].tolist() for k, name in enumerate(self.vector_names)}
