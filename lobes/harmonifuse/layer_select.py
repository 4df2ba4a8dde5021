"""Which encoder layers reach the speech LM: the fixed-layer ablation and the parameters it leaves unused.

* :class:`FixedLayerSelect` stands in for :class:`lobes.harmonifuse.gated_encoder_fusion.GatedEncoderFusion`
  when a row sets ``fixed_layer`` (transformer layer l's output for every task).
* :func:`rescale_layer_index` maps the paper's layer numbers (counted on the 24-layer WavLM-Large) to the
  encoder in use.
* :func:`freeze_unused_encoder_parameters` freezes what can get no gradient, so DDP needs no
  ``find_unused_parameters``.
"""
import torch

from lobes.errors import DataError
from lobes.harmonifuse.gated_encoder_fusion import GatedEncoderFusion, stack_hidden_states, task_indices


class FixedLayerSelect(torch.nn.Module):
    """Drop-in for :class:`GatedEncoderFusion` that returns one fixed encoder layer for every task.

    ``layer`` counts transformer layers 1..L (hidden-state index ``layer``; 0, the CNN output, is not offered).
    ``layer_weights`` is one-hot on that layer and ``gate_values`` all ones, so plots and logs keep working.
    """

    def __init__(self, layer, num_layers, hidden_size, tasks=("asr", "ser")):
        super().__init__()
        self.tasks = tuple(tasks)
        self.num_layers, self.hidden_size = int(num_layers), int(hidden_size)
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
            raise DataError(f"fixed_layer={layer!r} is not a transformer layer of this {self.num_layers}-layer "
                            f"encoder (valid: 1..{self.num_layers})")
        self.layer = layer
        self.include_cnn = False

    def forward(self, hidden_states, task):
        hs = stack_hidden_states(hidden_states)
        if hs.shape[0] != self.num_layers + 1:
            raise DataError(f"encoder gave {hs.shape[0]} hidden states, expected {self.num_layers + 1} "
                            f"(CNN output + {self.num_layers} layers)")
        task_indices(task, self.tasks, hs.shape[1], hs.device)  # same task checks as the gated fusion
        return hs[self.layer]

    def layer_weights(self, task):
        task_indices(task, self.tasks, 1, "cpu")
        w = torch.zeros(self.num_layers)
        w[self.layer - 1] = 1.0
        return w

    def gate_values(self, task):
        task_indices(task, self.tasks, 1, "cpu")
        return torch.ones(self.hidden_size)


def rescale_layer_index(layer, num_layers, reference_layers=None):
    """Map a layer counted on a ``reference_layers``-deep encoder to this ``num_layers``-deep one.

    ``round(layer · num_layers / reference_layers)``, at least 1: the paper's layers 12 and 24 of WavLM-Large
    (24 layers) are the middle and the top; on the 4-layer test WavLM they become 2 and 4. Identity when
    ``reference_layers`` is None or equals ``num_layers``; None stays None (no fixed layer).

    Arguments
    ---------
    layer : int or None
        Layer index counted on the reference encoder; None means no fixed layer.
    num_layers : int
        Transformer layers of the encoder in use.
    reference_layers : int or None
        Transformer layers of the encoder ``layer`` was counted on (24 for the paper's WavLM-Large).
    """
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise DataError(f"fixed_layer must be an integer layer number, got {layer!r}")
    if reference_layers is None or int(reference_layers) == int(num_layers):
        return layer
    if not 1 <= layer <= int(reference_layers):
        raise DataError(f"fixed_layer={layer} is outside 1..{reference_layers} (layer_depth_reference)")
    return max(1, int(round(layer * int(num_layers) / int(reference_layers))))


def freeze_unused_encoder_parameters(encoder, fixed_layer=None):
    """Freeze encoder parameters that can get no gradient, so DDP needs no ``find_unused_parameters``.

    HF WavLM / wav2vec2 keep ``masked_spec_embed`` (used only by SpecAugment time masking, off in
    :func:`lobes.wavlm_encoder.load_wavlm`). With a fixed layer l < L, layers l+1..L (and, for stable-layer-norm
    models, the final encoder LayerNorm, applied to hidden state L only) never reach the loss.
    Returns the names frozen here.
    """
    model = getattr(encoder, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return []
    frozen = []

    def freeze(prefix, module):
        for n, p in module.named_parameters(prefix=prefix):
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(n)

    spec = getattr(model, "masked_spec_embed", None)
    if isinstance(spec, torch.nn.Parameter) and spec.requires_grad and not (
            getattr(config, "apply_spec_augment", False) and getattr(config, "mask_time_prob", 0) > 0):
        spec.requires_grad_(False)
        frozen.append("masked_spec_embed")
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if fixed_layer is not None and layers is not None and fixed_layer < len(layers):
        for i in range(fixed_layer, len(layers)):
            freeze(f"encoder.layers.{i}", layers[i])
        if getattr(config, "do_stable_layer_norm", False):
            freeze("encoder.layer_norm", model.encoder.layer_norm)
    return frozen


def make_encoder_fusion(num_layers, hidden_size, tasks, gate="none", include_cnn=False, layer_norm=False,
                        fixed_layer=None):
    """The per-task encoder layer fusion (:class:`GatedEncoderFusion`), or with ``fixed_layer=l`` the ablation
    :class:`FixedLayerSelect` (one fixed layer for every task, no weights, no gate)."""
    if fixed_layer is None:
        return GatedEncoderFusion(num_layers, hidden_size, tasks, gate=gate, include_cnn=include_cnn,
                                  layer_norm=layer_norm)
    return FixedLayerSelect(fixed_layer, num_layers, hidden_size, tasks)
