"""Every in-repo callable a recipe YAML builds (``!new:`` / ``!name:`` / ``!apply:``) documents all its
parameters in a numpydoc ``Arguments`` section (issue 15, item 7), so a YAML key can be looked up by name."""
import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"!(?:new|name|apply):([A-Za-z_][\w.]*)")
HEADING = re.compile(r"^\s*Arguments\s*\n\s*-{9}\s*$", re.M)
SECTION_END = re.compile(r"^\s*\S.*\n\s*-{3,}\s*$", re.M)  # the next numpydoc heading
SKIP_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _is_local(top, recipe_dir):
    """True when the dotted path's first part is a module of this repository (root or the recipe's folder)."""
    return any((d / top).is_dir() or (d / f"{top}.py").is_file() for d in (ROOT, recipe_dir))


def yaml_callables():
    """{dotted path: recipe folder} of the in-repo callables referenced by recipes/**/*.yaml."""
    found = {}
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        for dotted in TAG.findall(path.read_text(encoding="utf-8")):
            if "." in dotted and _is_local(dotted.split(".")[0], path.parent):
                found.setdefault(dotted, path.parent)
    return found


def resolve(dotted, recipe_dir):
    """(docstring, parameter names) of a YAML-referenced callable, read from its source with ``ast``.

    Static rather than imported: importing the WavLM/LM modules costs seconds (transformers) and this test must
    stay fast. A class is taken with its own ``__init__``; ``self``, ``*args`` and ``**kwargs`` are skipped.
    """
    parts = dotted.split(".")
    for base in (ROOT, recipe_dir):
        for cut in range(len(parts) - 1, 0, -1):
            stem = base.joinpath(*parts[:cut])
            for path in (stem.with_suffix(".py"), stem / "__init__.py"):
                if path.is_file():
                    return _definition(path, parts[cut:], dotted)
    raise AssertionError(f"{dotted}: no module file under {ROOT} or {recipe_dir}")


def _definition(path, names, dotted):
    node = ast.parse(path.read_text(encoding="utf-8"))
    for name in names:
        found = [n for n in node.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name]
        assert found, f"{dotted}: '{name}' is not defined in {path}"
        node = found[-1]
    doc = ast.get_docstring(node) or ""
    if isinstance(node, ast.ClassDef):
        inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
        assert inits, f"{dotted}: no __init__ in the class body of {path} (document the inherited one here)"
        node = inits[-1]
    a = node.args
    params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return doc, params


def documented_arguments(doc):
    """Names listed in a docstring's ``Arguments`` section (``name : type`` lines; ``a, b : type`` too)."""
    heads = list(HEADING.finditer(doc))
    if not heads:
        return None
    body = doc[heads[-1].end():]
    end = SECTION_END.search(body)
    body = body[:end.start()] if end else body
    indent = min((len(ln) - len(ln.lstrip()) for ln in body.splitlines() if ln.strip()), default=0)
    names = set()
    for line in body.splitlines():
        m = re.match(r" {%d}([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:(?:\s|$)" % indent, line)
        if m and not line[indent:indent + 1].isspace():
            names.update(n.strip() for n in m.group(1).split(","))
    return names


def undocumented(doc, params):
    """None when every parameter is in the ``Arguments`` section, else what is wrong."""
    names = documented_arguments(doc)
    if names is None:
        return "no 'Arguments\\n---------' section"
    missing = [p for p in params if p not in names]
    return f"undocumented parameters {missing}" if missing else None


def runtime_view(obj):
    """(docstring, parameter names) of a live object, via inspect (used for the locally defined negative case)."""
    sig = inspect.signature(obj)  # a class: its __init__ without self
    return inspect.getdoc(obj) or "", [p.name for p in sig.parameters.values() if p.kind not in SKIP_KINDS]


CALLABLES = yaml_callables()


def test_recipes_reference_in_repo_callables():
    # the collector must see the lobes classes the recipes build; an empty list would pass vacuously
    assert {"lobes.wavlm_encoder.WavLMEncoder", "lobes.ser_head.SERHead",
            "lobes.adaltm.merged_wavlm.MergedWavLM", "lobes.harmonifuse.speech_lm.SpeechLM"} <= set(CALLABLES)
    assert not any(d.split(".")[0] in ("speechbrain", "torch", "transformers", "peft") for d in CALLABLES)


@pytest.mark.parametrize("dotted", sorted(CALLABLES))
def test_yaml_callable_documents_every_argument(dotted):
    problem = undocumented(*resolve(dotted, CALLABLES[dotted]))
    assert problem is None, f"{dotted}: {problem}"


def test_checker_catches_an_undocumented_parameter():
    class Documented:
        """Toy.

        Arguments
        ---------
        size : int
            Width.
        beta, gamma : float
            Two coefficients.

        Returns
        -------
        other : str
            Not an argument.
        """

        def __init__(self, size, beta=0.5, gamma=1.0, *args, **kwargs):
            pass

    class Missing(Documented):
        __doc__ = Documented.__doc__

        def __init__(self, size, beta=0.5, gamma=1.0, other=None):
            pass

    class NoSection:
        """size : int, but no Arguments heading."""

        def __init__(self, size):
            pass

    assert documented_arguments(inspect.getdoc(Documented)) == {"size", "beta", "gamma"}
    assert runtime_view(Documented)[1] == ["size", "beta", "gamma"]  # *args/**kwargs skipped
    assert undocumented(*runtime_view(Documented)) is None
    # ``other`` appears only under Returns, so it does not count as documented
    assert undocumented(*runtime_view(Missing)) == "undocumented parameters ['other']"
    assert undocumented(*runtime_view(NoSection)) == "no 'Arguments\\n---------' section"


def test_static_reader_catches_an_undocumented_parameter(tmp_path):
    # the same check through the ast path the recipe callables take
    (tmp_path / "toy.py").write_text('class Head:\n    """Toy.\n\n    Arguments\n    ---------\n    size : int\n'
                                     '        Width.\n    """\n\n    def __init__(self, size, dropout=0.1, **kw):\n'
                                     '        pass\n', encoding="utf-8")
    doc, params = resolve("toy.Head", tmp_path)
    assert params == ["size", "dropout"]
    assert undocumented(doc, params) == "undocumented parameters ['dropout']"
