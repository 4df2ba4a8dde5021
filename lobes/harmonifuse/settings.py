"""Settings groups of the HarmoniFuse speech LM (:class:`lobes.harmonifuse.speech_lm.SpeechLM`): each a frozen
dataclass, or the same keys as a mapping in the recipe YAML (:func:`as_settings`). The LM's own group,
:class:`lobes.harmonifuse.lm_loading.LMSettings`, lives with the LM loading."""
from dataclasses import dataclass

from lobes.errors import DataError

PROMPT_MODES = ("text", "soft")
SER_MODES = ("generate", "classify")
# Instruction words of prompt mode "text" when no texts are given (the recipe YAML sets its own).
DEFAULT_TASK_PROMPTS = {"asr": "Transcribe the audio.", "ser": "Which emotion does the speaker express?"}


@dataclass(frozen=True)
class SpeechSettings:
    """Encoder layer fusion and adapter (the recipe's ``encoder_gate``, ``include_cnn``, ``encoder_layer_norm``,
    ``fixed_layer``, ``adapter_stack``, ``adapter_hidden``)."""

    gate: str = "none"              # none (softmax layer sum) | channel
    include_cnn: bool = False       # also fuse hidden state 0 (CNN output)
    layer_norm: bool = False        # LayerNorm each layer before the per-task weights
    fixed_layer: int = None         # ablation: transformer layer l for every task; None fuses
    adapter_stack: int = 4          # consecutive encoder frames stacked into one LM position
    adapter_hidden: int = None      # adapter MLP width; None = LM width
    encoder_layers: int = None      # None reads encoder.num_layers
    encoder_dim: int = None         # None reads encoder.hidden_size


@dataclass(frozen=True)
class PromptSettings:
    """Task prompts (the recipe's ``prompt_mode``, ``task_prompts``, ``num_prompt_tokens``)."""

    mode: str = "text"              # text (instruction words) | soft (learned vectors)
    texts: dict = None              # {task: instruction} for mode text; None = DEFAULT_TASK_PROMPTS
    num_tokens: int = 4             # learned vectors per task, mode soft

    def __post_init__(self):
        if self.mode not in PROMPT_MODES:
            raise DataError(f"prompt_mode must be one of {PROMPT_MODES}, got '{self.mode}'")


@dataclass(frozen=True)
class FusionSettings:
    """LM-layer fusion (the recipe's ``lm_fusion``, ``fusion_ffn_hidden``, ``lm_fusion_form``)."""

    mode: str = "dynamic"           # dynamic (b_τ + FFN score of the prefix) | static (b_τ only) | last (plain LM)
    ffn_hidden: int = 64            # hidden width of the FFN scoring each layer's pooled prefix
    # residual (β affine, unbounded) | simplex (β ≥ 0, Σ = 1); dynamic_fusion.py. The recipe YAML sets simplex;
    # residual here rebuilds exports written before the key existed as they were trained.
    form: str = "residual"


@dataclass(frozen=True)
class SERSettings:
    """How the emotion task answers (the recipe's ``ser_mode``, ``emotion_classes``)."""

    mode: str = "generate"          # generate (the emotion word) | classify (linear head on the fused prefix)
    emotions: tuple = ()            # class names, the classify head's labels
    task: str = "ser"               # the emotion task among the model's tasks

    def __post_init__(self):
        if self.mode not in SER_MODES:
            raise DataError(f"ser_mode must be 'generate' or 'classify', got '{self.mode}'")


def as_settings(cls, value, key):
    """A settings dataclass from itself, a YAML mapping of its fields, or None (its defaults)."""
    if isinstance(value, cls):
        return value
    try:
        return cls(**dict(value or {}))
    except TypeError as e:
        raise DataError(f"speech_lm {key}: {e} (fields of {cls.__name__}: "
                        f"{list(cls.__dataclass_fields__)})") from e


def check_chunk_size(loss_chunk_size):
    if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or int(loss_chunk_size) < 1):
        raise DataError(f"loss_chunk_size must be null or a positive number of tokens, got {loss_chunk_size!r}")
    return None if loss_chunk_size is None else int(loss_chunk_size)
