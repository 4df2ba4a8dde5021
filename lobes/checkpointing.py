"""Atomic, safely loaded, exactly resumable checkpoints: a drop-in for SpeechBrain's ``Checkpointer``.

    checkpointer: !new:lobes.checkpointing.AtomicCheckpointer
        checkpoints_dir: !ref <save_folder>
        recoverables: {...}

Why (SpeechBrain 1.1.2): ``Checkpointer.save_checkpoint`` creates ``CKPT+<stamp>/``, writes ``CKPT.yaml`` first
and then one file per recoverable *in place*. A run killed in between leaves a directory that lists as a valid
checkpoint but lacks files, or holds a half-written ``*.ckpt``; the next start then "resumes" from it, or dies in
``torch.load`` with a zip/pickle traceback. Deleting old checkpoints (``shutil.rmtree`` in place) has the same
problem. ``AtomicCheckpointer`` changes only how directories are written, deleted, listed and loaded:

* **save**: every file goes into ``.tmp-CKPT+<stamp>/`` (a name SpeechBrain never lists), ``CKPT.yaml`` last, all
  fsync'ed; the directory is then renamed to ``CKPT+<stamp>`` in one ``os.rename``. A checkpoint exists
  completely or not at all. Nothing is written when a module holds NaN/inf (:class:`NonFiniteCheckpointError`).
* **delete**: a checkpoint is renamed to ``.trash-CKPT+...`` before it is removed.
* **start** (main process): debris of a killed run is cleaned up: a ``.tmp-`` directory without ``CKPT.yaml`` is
  half-written and removed, one with ``CKPT.yaml`` was complete and is published; ``.trash-`` directories and
  ``CKPT+`` directories without ``CKPT.yaml`` (half-deleted by plain SpeechBrain) are removed. A ``.tmp-``
  directory whose writer (``.writer``: host and pid) is still alive is left alone, since loading the recipe YAML
  elsewhere (inference during training) builds a checkpointer on the same folder.
* **load**: module / optimizer files are read with ``torch.load(weights_only=True)`` (pickled Python objects are
  refused, never run); any file that cannot be read raises :class:`lobes.errors.DataError` naming the file, and
  a checkpoint lacking a recoverable's file names the checkpoint and the recoverable.
* **exact resume**: the global RNG states (torch CPU/CUDA, numpy, python; per DDP rank) are saved with every
  checkpoint as ``rng_state.ckpt`` (JSON) and restored with it, and a training ``DataLoader`` registered for
  intra-epoch checkpoints gets its own seed generator, so that creating its iterator (which draws the workers'
  base seed) does not consume the global stream. With both, a run resumed from an intra-epoch checkpoint sees the
  same dropout masks and batch order as one that never stopped. Known limit: the loader's own generator is one
  draw behind after an intra-epoch resume; it only seeds DataLoader *worker processes*, which matters only for
  data pipelines that draw random numbers in workers (none of ours do).

Safe loading also applies to plain SpeechBrain users in the same process: importing this module replaces
SpeechBrain's default module / optimizer / scheduler load hooks (``torch_recovery``, whose ``torch.load`` relies
on torch's version-dependent default for ``weights_only``) and the parameter-transfer hook with explicit
``weights_only=True`` versions.
"""
import logging
import os
import pickle
import shutil
import socket
import zlib
from pathlib import Path

import torch
import yaml
from speechbrain.utils import checkpoints as sb_ckpt
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process

from lobes.errors import DataError
from lobes.rng_state import RNGState

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
RNG_RECOVERABLE = "rng_state"
WRITER_FILE = ".writer"  # "<host> <pid>" of the process filling a temp directory
_CKPT_PREFIX = sb_ckpt.CKPT_PREFIX
_METAFNAME = sb_ckpt.METAFNAME
_EXT = sb_ckpt.PARAMFILE_EXT


class NonFiniteCheckpointError(FloatingPointError):
    """A recoverable module holds NaN/inf: the checkpoint is refused so that NaN weights are never resumed from."""


# ------------------------------------------------------------------------------------------- safe loading
def _first_line(e):
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError):  # torch's first line only advises weights_only=False: show the cause
        lines = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln] or lines
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def load_state_dict_file(path):
    """``torch.load(weights_only=True)`` of one checkpoint file, with SpeechBrain's key-renaming hook applied."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return sb_ckpt.hook_on_loading_state_dict_checkpoint(state)


def safe_torch_recovery(obj, path, end_of_epoch):
    """Load hook for modules, optimizers and schedulers (replaces SpeechBrain's ``torch_recovery``)."""
    del end_of_epoch  # the state is the same either way
    state = load_state_dict_file(path)
    try:
        obj.load_state_dict(state, strict=True)
    except TypeError:  # optimizers / schedulers take no ``strict``
        obj.load_state_dict(state)


def safe_torch_parameter_transfer(obj, path):
    """Transfer hook (``Pretrainer``): non-strict load, like SpeechBrain's, but ``weights_only=True``."""
    result = obj.load_state_dict(load_state_dict_file(path), strict=False)
    for key in result.missing_keys:
        logger.warning("%s: no parameter for '%s' of %s", path, key, type(obj).__name__)
    for key in result.unexpected_keys:
        logger.warning("%s: parameter '%s' unused by %s", path, key, type(obj).__name__)


_SAFE_REPLACEMENTS = {sb_ckpt.torch_recovery: safe_torch_recovery,
                      sb_ckpt.torch_parameter_transfer: safe_torch_parameter_transfer}


def register_safe_loading():
    """Swap SpeechBrain's default torch load / transfer hooks for the ``weights_only=True`` ones (idempotent)."""
    for hooks in (sb_ckpt.DEFAULT_LOAD_HOOKS, sb_ckpt.DEFAULT_TRANSFER_HOOKS):
        for cls, hook in list(hooks.items()):
            if hook in _SAFE_REPLACEMENTS:
                hooks[cls] = _SAFE_REPLACEMENTS[hook]


register_safe_loading()


# ------------------------------------------------------------------------------------------- file helpers
def _fsync_path(path, directory=False):
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _remove_dir(path):
    """Rename to a ``.trash-`` name first, so that an interrupted removal never leaves a listable checkpoint."""
    path = Path(path)
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)  # another process's clean-up may be removing it too


def _live_writer(tmp_dir):
    """True when the process that is writing ``tmp_dir`` still runs (or runs on another host: cannot tell).

    The recipe YAML builds a checkpointer whenever it is loaded (e.g. by ``lobes.inference`` while training goes
    on), so start-up clean-up must not remove a directory that a live run is filling.
    """
    try:
        host, pid = (tmp_dir / WRITER_FILE).read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _nonfinite_keys(module):
    return [k for k, t in module.state_dict().items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


# --------------------------------------------------------------------------------------------- checkpointer
class AtomicCheckpointer(sb_ckpt.Checkpointer):
    """SpeechBrain ``Checkpointer`` with atomic save/delete, start-up cleanup, safe loading and RNG state.

    Arguments are those of ``speechbrain.utils.checkpoints.Checkpointer``, plus
    ``save_rng_state`` (default True: checkpoint the RNG streams, see module doc) and
    ``check_finite`` (default True: refuse to checkpoint modules holding NaN/inf).

    Arguments
    ---------
    checkpoints_dir : str or path
        Directory holding the ``CKPT+...`` checkpoint folders (created if missing).
    recoverables : dict or None
        ``{name: object}`` to save and load (modules, optimizers, counters, schedulers).
    custom_load_hooks : dict or None
        ``{name: load_fn}`` for recoverables without SpeechBrain's saver/loader marks.
    custom_save_hooks : dict or None
        ``{name: save_fn}`` for recoverables without SpeechBrain's saver/loader marks.
    allow_partial_load : bool
        Recover even when a recoverable has no file in the checkpoint (SpeechBrain's meaning).
    save_rng_state : bool
        Checkpoint the global RNG streams (and named loader generators) so a resumed run draws the same numbers.
    check_finite : bool
        Refuse to save a checkpoint whose modules hold NaN/inf values.
    """

    def __init__(self, checkpoints_dir, recoverables=None, custom_load_hooks=None, custom_save_hooks=None,
                 allow_partial_load=False, save_rng_state=True, check_finite=True):
        self.rng_state = RNGState() if save_rng_state else None
        super().__init__(checkpoints_dir, recoverables, custom_load_hooks, custom_save_hooks, allow_partial_load)
        self.check_finite = check_finite
        if self.rng_state is not None:
            self.add_recoverable(RNG_RECOVERABLE, self.rng_state, custom_load_hook=RNGState.load,
                                 custom_save_hook=RNGState.save, optional_load=True)
        if if_main_process():
            self.clean_debris()

    # -- registration --------------------------------------------------------------------------------------
    def add_recoverable(self, name, obj, custom_load_hook=None, custom_save_hook=None, optional_load=False):
        if (isinstance(obj, torch.utils.data.DataLoader) and obj.generator is None
                and self.rng_state is not None):
            # The iterator draws its base seed from the global RNG unless the loader has a generator; give it
            # its own so that re-creating the iterator on resume leaves the global stream (dropout) untouched.
            g = torch.Generator()
            g.manual_seed((torch.initial_seed() + zlib.crc32(name.encode())) % (2 ** 63))
            obj.generator = g
            self.rng_state.generators[name] = g
        super().add_recoverable(name, obj, custom_load_hook, custom_save_hook, optional_load)

    def add_recoverables(self, recoverables):
        if not isinstance(recoverables, dict) and not hasattr(recoverables, "items"):
            raise AttributeError(f"Checkpointer needs a mapping (e.g. dict), got {recoverables!r} instead.")
        for name, obj in recoverables.items():
            self.add_recoverable(name, obj)

    # -- start-up cleanup ----------------------------------------------------------------------------------
    def clean_debris(self):
        """Remove / publish what a killed run left behind (see module doc); returns {action: [names]}."""
        done = {"published": [], "removed": []}
        if not self.checkpoints_dir.is_dir():
            return done
        for entry in sorted(self.checkpoints_dir.iterdir()):
            if not entry.is_dir():
                continue
            name = entry.name
            if name.startswith(TMP_PREFIX + _CKPT_PREFIX):
                if _live_writer(entry):
                    continue
                final = entry.with_name(name[len(TMP_PREFIX):])
                if (entry / _METAFNAME).is_file():  # CKPT.yaml is written last: the save had completed
                    if final.exists():
                        _remove_dir(final)
                    os.rename(entry, final)
                    (final / WRITER_FILE).unlink(missing_ok=True)
                    done["published"].append(final.name)
                    logger.warning("%s: completed checkpoint of an interrupted run published as %s", entry, final)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                    done["removed"].append(name)
                    logger.warning("%s: half-written checkpoint of an interrupted run removed", entry)
            elif name.startswith(TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                done["removed"].append(name)
            elif name.startswith(_CKPT_PREFIX) and not (entry / _METAFNAME).exists():
                shutil.rmtree(entry)
                done["removed"].append(name)
                logger.warning("%s: checkpoint directory without %s (interrupted save or delete) removed",
                               entry, _METAFNAME)
        return done

    # -- save ----------------------------------------------------------------------------------------------
    def _check_finite(self):
        bad = {}
        for name, obj in self.recoverables.items():
            if isinstance(obj, torch.nn.Module):
                keys = _nonfinite_keys(obj)
                if keys:
                    bad[name] = keys[:10]
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to write a checkpoint in {self.checkpoints_dir}: NaN/inf weights in "
                + "; ".join(f"'{n}': {', '.join(k)}" for n, k in bad.items()))

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006 (SpeechBrain's signature)
        """Write all files into a temp directory, ``CKPT.yaml`` last, then rename it into place."""
        if self.check_finite:
            self._check_finite()
        final = tmp = None
        if if_main_process():
            final = self._new_checkpoint_dirpath() if name is None else self._custom_checkpoint_dirpath(name)
            tmp = final.with_name(TMP_PREFIX + final.name)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            (tmp / WRITER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        final, tmp = ddp_broadcast((final, tmp), src=0)

        paramfiles = {}
        try:
            for rec_name, obj in self.recoverables.items():
                path = tmp / f"{rec_name}{_EXT}"
                if rec_name in self.custom_save_hooks:
                    self.custom_save_hooks[rec_name](obj, path)
                else:
                    hook = sb_ckpt.get_default_hook(obj, sb_ckpt.DEFAULT_SAVE_HOOKS)
                    if hook is None:
                        raise RuntimeError(f"Don't know how to save {type(obj)} ('{rec_name}'): register a "
                                           "default hook or add a custom hook for it")
                    hook(obj, path)
                paramfiles[rec_name] = final / path.name
            ddp_barrier()  # every rank has written its files into tmp
            if not if_main_process():
                return None
            saved_meta = self._save_checkpoint_metafile(tmp / _METAFNAME, meta, end_of_epoch)
            for f in tmp.iterdir():
                if f.name != WRITER_FILE:
                    _fsync_path(f)
            _fsync_path(tmp, directory=True)
            if final.exists():  # custom name saved again
                _remove_dir(final)
            os.rename(tmp, final)
            _fsync_path(final.parent, directory=True)
            (final / WRITER_FILE).unlink(missing_ok=True)  # after the rename: a complete save is never 'live'
        except BaseException:
            if if_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.log(verbosity, "Saved an %s checkpoint in %s", "end-of-epoch" if end_of_epoch else "intra-epoch",
                   final)
        return sb_ckpt.Checkpoint(final, saved_meta, paramfiles)

    # -- delete --------------------------------------------------------------------------------------------
    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None, importance_keys=None,
                           ckpt_predicate=None, verbosity=logging.INFO):
        """Same selection as SpeechBrain's (``num_to_keep`` per ranking, union protected), atomic removal."""
        if num_to_keep < 0:
            raise ValueError("Number of checkpoints to keep must be positive.")
        if importance_keys is None:
            importance_keys = [sb_ckpt.ckpt_recency]
        # SpeechBrain's save_and_keep_only appends ckpt_recency to a shared default list on every call
        importance_keys = list(dict.fromkeys(importance_keys))
        rankings = ([{"min_key": k} for k in min_keys or []] + [{"max_key": k} for k in max_keys or []]
                    + [{"importance_key": k} for k in importance_keys])
        candidates, protected = set(), set()
        for kw in rankings:
            candidates.update(self.find_checkpoints(ckpt_predicate=ckpt_predicate, **kw))
            protected.update(self.find_checkpoints(ckpt_predicate=ckpt_predicate, max_num_checkpoints=num_to_keep,
                                                   **kw))
        ddp_barrier()
        if if_main_process():
            for ckpt in candidates - protected:
                _remove_dir(ckpt.path)
                logger.log(verbosity, "Deleted checkpoint in %s", ckpt.path)
        ddp_barrier()

    # -- list / load ---------------------------------------------------------------------------------------
    @staticmethod
    def _construct_checkpoint_objects(checkpoint_dirs):
        checkpoints = []
        for ckpt_dir in checkpoint_dirs:
            meta_path = ckpt_dir / _METAFNAME
            try:
                with open(meta_path, encoding="utf-8") as f:
                    meta = yaml.load(f, Loader=yaml.SafeLoader)
            except Exception as e:
                raise DataError(f"{meta_path}: unreadable checkpoint metadata ({_first_line(e)}); "
                                f"delete {ckpt_dir} to resume from an earlier checkpoint") from e
            if not isinstance(meta, dict) or "end-of-epoch" not in meta:
                raise DataError(f"{meta_path}: not SpeechBrain checkpoint metadata (no 'end-of-epoch' key); "
                                f"delete {ckpt_dir} to resume from an earlier checkpoint")
            files = {f.stem: f for f in ckpt_dir.iterdir() if f.suffix == _EXT}
            checkpoints.append(sb_ckpt.Checkpoint(ckpt_dir, meta, files))
        return checkpoints

    def _load_hook(self, name, obj):
        if name in self.custom_load_hooks:
            return self.custom_load_hooks[name]
        hook = sb_ckpt.get_default_hook(obj, sb_ckpt.DEFAULT_LOAD_HOOKS)
        return _SAFE_REPLACEMENTS.get(hook, hook)

    def _call_load_hooks(self, checkpoint):
        logger.info("Loading a checkpoint from %s", checkpoint.path)
        end_of_epoch = checkpoint.meta["end-of-epoch"]
        for name, obj in self.recoverables.items():
            path = checkpoint.paramfiles.get(name)
            if path is None:
                if self.allow_partial_load or self.optional_recoverables.get(name) or "dataloader" in name:
                    logger.info("%s: no %s%s in this checkpoint; '%s' keeps its current state",
                                checkpoint.path, name, _EXT, name)
                    continue
                raise DataError(f"{checkpoint.path}: checkpoint has no file for recoverable '{name}' "
                                f"({name}{_EXT}); it was written by another configuration or is incomplete")
            hook = self._load_hook(name, obj)
            if hook is None:
                raise RuntimeError(f"Don't know how to load {type(obj)} ('{name}'): register a default hook or "
                                   "add a custom hook for it")
            try:
                hook(obj, path, end_of_epoch)
            except DataError:
                raise
            except Exception as e:
                raise DataError(
                    f"{path}: cannot load the checkpoint file of '{name}' ({_first_line(e)}). The file is "
                    f"truncated or corrupt, holds pickled Python objects (refused: weights_only=True), or does not "
                    f"match the model; delete {checkpoint.path} to resume from an earlier checkpoint") from e

