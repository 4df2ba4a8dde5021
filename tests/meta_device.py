"""Helpers for tests/test_device_meta.py: run a recipe's Brain for one training step on PyTorch's ``meta`` device.

Why ``meta``: a meta tensor has a shape, a dtype and a device but no data, so a WavLM-Large step costs no
compute, and every op checks devices exactly as on CUDA ("Tensor on device cpu is not on the expected device
meta!" for a CPU tensor of dim > 0 next to a meta one; 0-dim CPU scalars are allowed, as on CUDA). A host
sync (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``) cannot work on meta; :class:`HostSyncRecorder`
records each one with its source line (a GPU stall in the training step) and returns a placeholder value,
so one run lists them all.

- :func:`register_meta_ctc` (``lobes.memory_tracking``): ``aten::_ctc_loss`` has no Meta kernel; these check
  devices like the CUDA ones (the length vectors may stay on the host, as CUDA accepts).
- :class:`EmulatedAutocast` (``lobes.memory_tracking``, shared with the memory planner): CUDA's autocast op
  lists on meta tensors, so ``precision: bf16`` runs as CUDA runs it (torch's autocast refuses "meta");
  :class:`SameDtypeCheck`: the operand-dtype check that meta GEMM / convolution kernels skip.
- :func:`meta_wavlm`: stands in for ``lobes.wavlm_encoder.load_wavlm``: WavLM-Large's configuration (hidden
  1024, 24 layers, 16 heads, FFN 4096, stable layer norm, conv bias), built on meta, with load_wavlm's
  LayerDrop / SpecAugment settings.
- :func:`meta_task_vector`: stands in for ``lobes.adaltm.task_vector.load_task_vector``: meta ΔW of the
  base's shapes.
"""
import linecache
import traceback
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode
from transformers import WavLMConfig, WavLMModel

from lobes.memory_tracking import (EmulatedAutocast, SameDtypeCheck, checkpoint_recomputes_emulated,  # noqa: F401
                                   register_meta_ctc)  # re-exported for the device test

LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
         "do_stable_layer_norm": True, "conv_bias": True, "feat_extract_norm": "layer",
         "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16, "num_buckets": 320,
         "max_bucket_distance": 800}
SAMPLE_RATE = 16000
SECONDS = 11.0                      # the paper's longest utterance
FRAMES = 549                        # WavLM's CNN on 11 s: (176000 - 400) // 320 + 1


def large_config():
    # load_wavlm's settings: no LayerDrop (a weighted layer sum needs every layer), no SpecAugment
    return WavLMConfig(**LARGE, layerdrop=0.0, apply_spec_augment=False)


def meta_wavlm(source=None, cache_dir=None, **overrides):
    """A WavLM-Large-shaped ``WavLMModel`` with every weight on the meta device (no data, no download)."""
    cfg = large_config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.device("meta"):
        return WavLMModel(cfg)


_SHAPES = {}


def meta_task_vector(path):
    """A task vector of the base's keys and shapes whose ΔW are meta tensors (``.delta``, like TaskVector)."""
    if not _SHAPES:
        _SHAPES.update({k: (v.shape, v.dtype) for k, v in meta_wavlm().state_dict().items()})
    return SimpleNamespace(delta={k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in _SHAPES.items()})


# ------------------------------------------------------------------------------------------------ host syncs
_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}


def _placeholder(name, t):
    if name == "tolist":
        return torch.zeros(t.shape, dtype=torch.long).tolist()
    if name == "numpy":
        return torch.zeros(t.shape, dtype=torch.float32).numpy()
    if name == "cpu":
        return torch.zeros(t.shape, dtype=t.dtype)
    if name == "__bool__":
        return True
    if name == "__float__" or (name == "item" and t.is_floating_point()):
        return 1.0
    return 1  # a count / index: 1 keeps every slice non-empty


class HostSyncRecorder(TorchFunctionMode):
    """Records every read of a non-CPU tensor's value by the host (a GPU sync; also ops whose output shape
    depends on values, such as boolean-mask selection), with the first source line
    outside torch that asked for it, as ``(function, file name, line)``; returns a placeholder so the step
    runs on. CPU tensors are free to read (e.g. HF's LayerDrop ``torch.rand([])``)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in _SYNC_METHODS and t is not None and t.device.type != "cpu" and (name == "cpu" or t.is_meta):
            self._record()
            return _placeholder(name, t)
        try:
            return func(*args, **(kwargs or {}))
        except NotImplementedError as e:
            # an output shape that depends on values (nonzero: boolean-mask indexing / selection) needs the host
            # to read them, a sync on CUDA too; meta refuses it unless told to assume "all true": record the
            # call, then let it run on with that shape
            if "nonzero" not in str(e):
                raise
            self._record()
            config = torch.fx.experimental._config
            saved, config.meta_nonzero_assume_all_nonzero = config.meta_nonzero_assume_all_nonzero, True
            try:
                return func(*args, **(kwargs or {}))
            finally:
                config.meta_nonzero_assume_all_nonzero = saved

    def _record(self):
        frame = next(f for f in reversed(traceback.extract_stack()[:-2])
                     if "/torch/" not in f.filename and not f.filename.endswith("meta_device.py"))
        self.syncs.append((frame.name, frame.filename.rsplit("/", 1)[-1], frame.lineno,
                           (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()))

    def sites(self):
        """Distinct (function, file) pairs that synced."""
        return sorted({(fn, f) for fn, f, _, _ in self.syncs})

    def report(self):
        return "\n".join(f"  {f}:{line} in {fn}(): {src}" for fn, f, line, src in sorted(set(self.syncs)))


def tensors_of(obj, seen=None):
    """Every tensor held by an optimizer state (nested dicts / lists)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_of(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_of(v)


