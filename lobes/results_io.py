"""Results files: ``metrics.json`` written atomically as strict JSON (no NaN), and read back with clear errors."""
import json
import math

from lobes.errors import DataError
from lobes.io_utils import atomic_write


def _jsonable(obj, where="metrics"):
    """numpy/torch scalars and arrays -> Python types; NaN/inf rejected (JSON has no such numbers)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise DataError(f"{where} = {obj} is not a finite number; JSON cannot store it")
        return obj
    raise DataError(f"{where}: cannot write a {type(obj).__name__} to JSON")


def write_metrics(path, metrics):
    """Write ``metrics`` as indented JSON, atomically (temp file + rename).

    The per-experiment file is ``<output_folder>/metrics.json``::

        {"experiment": "adaltm_dual_in_domain",
         "part": "Part 2: Ablation", "row": "Setup 4: Proposed Dual-Vector", "order": 4,   # optional, for tables
         "test": {uar, uar_ci, precision, precision_ci, macro_f1, macro_f1_ci, accuracy, per_class_recall,
                  confusion, n},                                                         # ser_report output
         "wer": 0.2309,                                                                  # optional, fraction
         "lambdas": {"ASR": [...], "SER": [...]}, "alphas": [...]}                       # optional
    """
    data = _jsonable(metrics)
    with atomic_write(path) as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def read_metrics(path):
    """Load a ``metrics.json``; DataError naming the file when it is missing, not JSON or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: metrics file not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
