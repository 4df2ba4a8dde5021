"""Experiment rows as small YAML files on top of one recipe YAML.

Table 1 has many rows that differ in a handful of keys (which task vectors, which λ mode). A row file names
its base with ``base_hparams:`` (relative to itself) and lists only what changes; everything else, and the
command line's ``--key=value`` overrides (applied last), works as with any SpeechBrain hparams file:

    # hparams/rows/setup2_asr_only.yaml
    base_hparams: ../adaltm.yaml
    experiment: setup2_asr_only
    task_vectors:
        ASR: !ref <vectors_folder>/asr_in.safetensors

A plain hparams file (no ``base_hparams``) is loaded unchanged. A row's value replaces the base's value
as a whole (a mapping too). Every key of a row, also inside untagged nested mappings (``interleave_ratio``,
...), must exist in its base: a misspelt key raises an error naming the row file and the key path
(``interleave_ratio.sre``). Not checked inside: objects built with ``!new:`` / ``!name:`` tags and mappings
whose base value is empty (``task_vectors: {}``: the row lists the vectors it uses). Files are read as UTF-8.
"""
import atexit
import io
import os
import tempfile
from pathlib import Path

import ruamel.yaml
from hyperpyyaml import load_hyperpyyaml


def _yaml():
    y = ruamel.yaml.YAML()  # round-trip mode keeps !ref / !new tags untouched for hyperpyyaml
    y.preserve_quotes = True
    y.width = 1 << 16  # never fold long lines: folded flow scalars lose their spaces on reload
    return y


def _merge(dst, src):
    for k, v in src.items():  # a row's value, a mapping too, replaces the base's value as a whole
        dst[k] = v
    return dst


def _tagged(value):
    """True for a mapping written with a YAML tag (``!new:...``); ruamel gives untagged ones ``Tag(None)``."""
    return getattr(getattr(value, "tag", None), "value", None) is not None


def _unknown_keys(row, base, prefix=""):
    """Dotted paths of the keys of ``row`` that ``base`` lacks, descending into plain (untagged) mappings."""
    unknown = []
    for k, v in row.items():
        path = f"{prefix}{k}"
        if k not in base:
            unknown.append(path)
        elif isinstance(v, dict) and isinstance(base[k], dict) and base[k] and not _tagged(v) and not _tagged(base[k]):
            unknown += _unknown_keys(v, base[k], prefix=f"{path}.")
    return unknown


def _strip_comments(node):
    """Drop every comment of a ruamel tree, in place. ruamel re-attaches a comment after a tagged value
    (``data_folder: !PLACEHOLDER  # ...``) to the next key; dumped, re-read and dumped again (hyperpyyaml applies
    command-line overrides that way), such a comment can lose its line break and join two keys on one line
    (ScannerError "mapping values are not allowed here"). The base YAML keeps the comments."""
    ca = getattr(node, "ca", None)
    if ca is not None:
        ca.comment = None
        ca.items.clear()
        ca._post = []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        _strip_comments(child)
    return node


def _resolve_map(hparams_file):
    """``(mapping, is_row)``: a row file's mapping folded into its base's, recursively, as ruamel objects (a chain
    is merged in memory and dumped once)."""
    hparams_file = Path(hparams_file)
    row = _yaml().load(hparams_file.read_text(encoding="utf-8")) or {}
    if "base_hparams" not in row:
        return row, False
    base_path = (hparams_file.parent / row.pop("base_hparams")).resolve()
    base, _ = _resolve_map(base_path)
    unknown = _unknown_keys(row, base)
    if unknown:  # a typo in a row must not silently train the base configuration
        raise KeyError(f"{hparams_file}: keys {unknown} do not exist in its base {base_path}")
    return _merge(base, row), True


def resolve_row(hparams_file):
    """YAML text of a row file folded into its base (recursively); a plain file is returned as it is."""
    merged, is_row = _resolve_map(hparams_file)
    if not is_row:
        return Path(hparams_file).read_text(encoding="utf-8")
    buf = io.StringIO()
    _yaml().dump(_strip_comments(merged), buf)
    return buf.getvalue()


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def load_hparams(hparams_file, overrides=""):
    """Load a recipe or row YAML with command-line overrides.

    Returns (hparams, path of the effective YAML, overrides); the effective YAML is what
    ``create_experiment_directory`` should save, so the experiment folder records the full configuration.
    """
    text = resolve_row(hparams_file)
    fd, path = tempfile.mkstemp(prefix="hparams_", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    atexit.register(_remove_quietly, path)  # only needed until create_experiment_directory has copied it
    # !ref / !include paths in the file are resolved relative to the current directory, as in SpeechBrain.
    return load_hyperpyyaml(text, overrides or None), path, overrides
