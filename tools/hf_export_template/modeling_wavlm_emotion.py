"""WavLM -> α weighted layer sum -> emotion head, as a transformers model (written by ``tools/export_hf.py``).

    from transformers import AutoModelForAudioClassification, pipeline
    model = AutoModelForAudioClassification.from_pretrained("this_folder", trust_remote_code=True)
    classify = pipeline("audio-classification", model="this_folder", trust_remote_code=True)

Input: 16 kHz mono waveforms through this folder's ``Wav2Vec2FeatureExtractor``, which normalises each utterance to
zero mean and unit variance (``do_normalize``) exactly as training did; the model itself does not normalise. The
forward is the recipes': hidden states of every layer, α = softmax(layer_weights) over them (eq. 5 of AdaLTM),
a frame projection, pooling over the valid frames only, an MLP classifier. It depends on torch and transformers
only, so the folder works without the toolkit that trained it.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import WavLMConfig, WavLMModel, WavLMPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class WavLMEmotionConfig(WavLMConfig):
    """WavLM's configuration plus the layer sum (``layer_sum``) and the emotion head (``emotion_head``)."""

    # its own type: without trust_remote_code, loading fails instead of giving a stock head with random weights
    model_type = "wavlm_emotion"

    def __init__(self, layer_sum=None, emotion_head=None, **kwargs):
        super().__init__(**kwargs)
        self.layer_sum = layer_sum or {"include_cnn": False, "layer_norm": False}
        self.emotion_head = emotion_head or {"hidden_size": 256, "pooling": "mean", "dropout": 0.1,
                                             "num_proj_layers": 1, "head_type": "frame_mlp"}


def masked_mean_std(x, mask):
    """Mean and std of x [B, T, D] over the frames where mask [B, T] is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    n = m.sum(1).clamp(min=1.0)
    mean = (x * m).sum(1) / n
    var = (((x - mean.unsqueeze(1)) * m) ** 2).sum(1) / n
    return mean, torch.sqrt(var + 1e-6)


class EmotionHead(nn.Module):
    """Frame projection, masked pooling (``mean`` or ``mean_std``), MLP classifier. ``head_type`` ``frame_mlp``:
    ReLU per frame; ``pooled_linear``: linear projection, ReLU after pooling."""

    def __init__(self, input_size, num_classes, hidden_size, pooling, dropout, num_proj_layers, head_type):
        super().__init__()
        self.pooling = pooling
        layers, size = [], input_size
        for _ in range(num_proj_layers):
            layers.append(nn.Linear(size, hidden_size))
            if head_type == "frame_mlp":
                layers += [nn.ReLU(), nn.Dropout(dropout)]
            size = hidden_size
        self.frame_proj = nn.Sequential(*layers)
        self.post_pool = nn.Sequential(nn.ReLU(), nn.Dropout(dropout)) if head_type == "pooled_linear" \
            else nn.Identity()
        pooled = hidden_size * (2 if pooling == "mean_std" else 1)
        self.classifier = nn.Sequential(nn.Linear(pooled, hidden_size), nn.ReLU(), nn.Dropout(dropout),
                                        nn.Linear(hidden_size, num_classes))

    def forward(self, feats, mask):
        mean, std = masked_mean_std(self.frame_proj(feats), mask)
        return self.classifier(self.post_pool(mean if self.pooling == "mean" else torch.cat([mean, std], dim=-1)))


class WavLMForEmotionClassification(WavLMPreTrainedModel):
    """WavLM + α weighted sum of its layers + emotion head; logits over ``config.id2label``."""

    config_class = WavLMEmotionConfig

    def __init__(self, config):
        super().__init__(config)
        self.wavlm = WavLMModel(config)
        n_weights = config.num_hidden_layers + int(config.layer_sum["include_cnn"])
        self.layer_weights = nn.Parameter(torch.zeros(n_weights))
        self.head = EmotionHead(config.hidden_size, config.num_labels, **config.emotion_head)
        self.post_init()

    def forward(self, input_values, attention_mask=None, labels=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        out = self.wavlm(input_values, attention_mask=attention_mask, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)  # [L+1, B, T, D]; 0 = CNN output
        if not self.config.layer_sum["include_cnn"]:
            hidden = hidden[1:]
        if self.config.layer_sum["layer_norm"]:
            hidden = F.layer_norm(hidden, hidden.shape[-1:])
        alpha = torch.softmax(self.layer_weights, dim=0).to(hidden.dtype)
        feats = torch.einsum("l,lbtd->btd", alpha, hidden)
        if attention_mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:  # pooling ignores the frames of padding
            mask = self.wavlm._get_feature_vector_attention_mask(feats.shape[1], attention_mask)
        logits = self.head(feats, mask)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=out.hidden_states if output_hidden_states else None)
