"""The 25 merge groups of AdaLTM (paper §2.2), for any layer count.

group 0      : CNN feature extractor, feature projection, positional convolution embedding (incl. its
               weight-norm g and v) and ``masked_spec_embed``;
group l=1..L : transformer layer l (``encoder.layers.{l-1}.*``; layer 1 alone holds ``rel_attn_embed``).
``encoder.layer_norm``: with stable layer norm (WavLM-Large) it is applied after the last layer and only
touches hidden state L, so it belongs to group L; with post-norm WavLM (Base) it is applied before layer 1,
so it belongs to group 0.
"""
from lobes.errors import DataError

GROUP0_PREFIXES = ("feature_extractor.", "feature_projection.", "encoder.pos_conv_embed.", "masked_spec_embed")


def num_groups(num_layers):
    return num_layers + 1


def group_of(key, num_layers, stable_layer_norm=True):
    """Merge group of one ``WavLMModel`` parameter name."""
    if key.startswith("encoder.layers."):
        layer = int(key.split(".")[2])
        if not 0 <= layer < num_layers:
            raise DataError(f"parameter '{key}' names layer {layer + 1}, but the model has {num_layers} layers")
        return layer + 1
    if key.startswith("encoder.layer_norm."):
        return num_layers if stable_layer_norm else 0
    if key.startswith(GROUP0_PREFIXES):
        return 0
    raise DataError(f"parameter '{key}' belongs to no merge group (not a WavLMModel backbone key)")


def group_modules(num_layers, stable_layer_norm=True):
    """(module path, group) for each submodule merged as a unit; covers every key but ``masked_spec_embed``."""
    mods = [("feature_extractor", 0), ("feature_projection", 0), ("encoder.pos_conv_embed", 0)]
    mods += [(f"encoder.layers.{i}", i + 1) for i in range(num_layers)]
    mods.append(("encoder.layer_norm", num_layers if stable_layer_norm else 0))
    return mods


def group_names(num_layers):
    """Human-readable labels for plots and logs."""
    return ["CNN+pos"] + [f"L{i}" for i in range(1, num_layers + 1)]
