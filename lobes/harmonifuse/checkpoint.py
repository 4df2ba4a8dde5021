"""Checkpointing of the HarmoniFuse speech LM: only the parameters that train."""
import torch
from speechbrain.utils.checkpoints import mark_as_loader, mark_as_saver, register_checkpoint_hooks

from lobes.errors import DataError
from lobes.io_utils import atomic_path


@register_checkpoint_hooks
class TrainableParameters:
    """Checkpoint recoverable holding only the parameters of ``module`` that train (safetensors file).

    A frozen LM (and a frozen WavLM) is re-read from its source, not copied into every checkpoint: with a
    1B-parameter LM that is gigabytes per epoch. Loading checks that the file holds exactly the parameters
    that train now (a checkpoint from a differently frozen configuration is refused, naming the file).

    Arguments
    ---------
    module : torch.nn.Module
        Model whose parameters with ``requires_grad`` are saved and loaded.
    """

    def __init__(self, module):
        self.module = module

    def _trainable(self):
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @mark_as_saver
    def save(self, path):
        from safetensors.torch import save_file
        state = {n: p.detach().cpu().contiguous() for n, p in self._trainable().items()}
        with atomic_path(path) as tmp:
            save_file(state, tmp)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError
            raise DataError(f"{path}: cannot read the trainable-parameter checkpoint ({e})") from e
        params = self._trainable()
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise DataError(f"{path}: checkpoint does not match the trainable parameters (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); was it saved with other freeze settings?")
        with torch.no_grad():
            for n, p in params.items():
                if state[n].shape != p.shape:
                    raise DataError(f"{path}: '{n}' has shape {tuple(state[n].shape)}, model has {tuple(p.shape)}")
                p.copy_(state[n].to(p.device, p.dtype))

