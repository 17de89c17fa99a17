"""The package as installed: where it was imported from, its metadata, its type stubs and docstrings.
Needs only the standard library (and mypy, when installed, for the stub check)."""

import os
from pathlib import Path

import posenc

PACKAGE = Path(posenc.__file__).resolve().parent


def test_imported_from_the_expected_place():
    """tests/python/installed.sh sets POSENC_EXPECT_INSTALLED to the virtual environment the package
    was installed into: the suite must then test that copy, not a build tree on PYTHONPATH."""
    venv = os.environ.get("POSENC_EXPECT_INSTALLED")
    if venv:
        assert PACKAGE.is_relative_to(Path(venv).resolve()), f"posenc imported from {PACKAGE}, not from {venv}"
        assert "site-packages" in PACKAGE.parts
    assert posenc.__version__.count(".") == 2
    assert (PACKAGE / "py.typed").is_file() and (PACKAGE / "__init__.pyi").is_file()


# --- Docstrings: every public class, function, method and parameter --------------------------------

import ast  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

CLASSES = [getattr(posenc, n) for n in posenc.__all__ if isinstance(getattr(posenc, n), type)]
FUNCTIONS = [getattr(posenc, n) for n in posenc.__all__ if not isinstance(getattr(posenc, n), type)]


def methods(cls):
    """(name, function) of the public methods and __init__ of a class of the module."""
    return [(n, f) for n, f in vars(cls).items()
            if callable(f) and (n == "__init__" or not n.startswith("_")) and not isinstance(f, type)]


def documented_parameters(doc):
    """Names listed as `name : type` under the docstring's Parameters heading."""
    if "Parameters\n" not in doc:
        return set()
    section = doc.split("Parameters\n", 1)[1]
    return set(re.findall(r"^([A-Za-z_][A-Za-z_0-9]*) : ", section, flags=re.M))


def parameters(f):
    return [p for p in inspect.signature(f).parameters if p != "self"]


def test_every_public_name_has_a_docstring():
    assert posenc.__doc__ and "attention" in posenc.__doc__
    for obj in CLASSES + FUNCTIONS:
        if obj is posenc.PreconditionError:
            continue
        assert obj.__doc__ and len(obj.__doc__.strip()) > 40, f"{obj.__name__} has no docstring"


@pytest.mark.parametrize("owner", [c.__name__ for c in CLASSES if c is not posenc.PreconditionError] + ["posenc"])
def test_every_parameter_is_documented(owner):
    """Each parameter of each function, method and constructor has a `name : type` line in its docstring,
    and the docstring documents no parameter the signature lacks."""
    callables = [(f.__name__, f) for f in FUNCTIONS] if owner == "posenc" else methods(getattr(posenc, owner))
    assert callables
    for name, f in callables:
        want = parameters(f)
        got = documented_parameters(f.__doc__ or "")
        assert set(want) == got, f"{owner}.{name}: parameters {want}, documented {sorted(got)}"


@pytest.mark.parametrize("cls", [c for c in CLASSES if c is not posenc.PreconditionError], ids=lambda c: c.__name__)
def test_every_property_is_documented(cls):
    for name, attr in vars(cls).items():
        if isinstance(attr, property) or type(attr).__name__ == "property":
            assert attr.__doc__ and len(attr.__doc__) > 3, f"{cls.__name__}.{name} has no docstring"


def test_help_reads_like_the_cpp_docs():
    doc = posenc.attention.__doc__
    for phrase in ("[batch, heads, tokens, head_dim]", "1 / sqrt(head_dim)", "kv head h // (heads // kv_heads)",
                   "kpos[j] <= qpos[i]", "-inf for a row with no visible key"):
        assert phrase in doc, phrase
    assert "'half_split' pairs (i, i + r/2)" in posenc.Rope.__doc__


# --- Type stubs -------------------------------------------------------------------------------------

def stub_tree():
    return ast.parse((PACKAGE / "__init__.pyi").read_text())


def stub_parameters(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args] + (["*"] if a.kwonlyargs else []) + [x.arg for x in a.kwonlyargs]
    return [n for n in names if n != "self"]


def runtime_parameters(f):
    out, star = [], False
    for p in inspect.signature(f).parameters.values():
        if p.name == "self":
            continue
        if p.kind == p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name)
    return out


def test_stubs_cover_every_public_name_with_the_runtime_signatures():
    tree = stub_tree()
    top = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            top.setdefault(node.name, node)  # the first of an overload set
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top[node.target.id] = node
    assert "__version__" in top
    for name in posenc.__all__:
        assert name in top, f"{name} has no stub"
    for f in FUNCTIONS:
        assert stub_parameters(top[f.__name__]) == runtime_parameters(f), f.__name__
    for cls in CLASSES:
        node = top[cls.__name__]
        members = {}
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                members.setdefault(item.name, item)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                members[item.target.id] = item
        if cls is posenc.PreconditionError:
            continue
        for name, attr in vars(cls).items():
            if name.startswith("_") and name != "__init__":
                continue
            assert name in members, f"{cls.__name__}.{name} has no stub"
            if callable(attr) and not isinstance(attr, property):
                assert stub_parameters(members[name]) == runtime_parameters(attr), f"{cls.__name__}.{name}"


GOOD = '''
import posenc
from typing import Any, Tuple

def block(q: Any, k: Any, v: Any) -> Any:
    rope = posenc.Rope(head_dim=64, base=5e5, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    rope.rotate(q, range(16), layout="bhtd")
    out, lse = posenc.attention(q, k, v, encoding=posenc.Alibi(num_heads=8), causal=True, return_lse=True)
    pair: Tuple[Any, Any] = (out, lse)
    version: str = posenc.__version__
    return posenc.attention(q, k, v, layout="bthd", window=(128, 0), scale=0.125, out=out)
'''

BAD = '''
import posenc
from typing import Any

def block(q: Any, k: Any, v: Any) -> None:
    posenc.Rope(head_dm=64)
    posenc.attention(q, k, v, layout="tbhd")
    posenc.attention(q, k, v, causal=True, window=128)
    n: int = posenc.Rope().name
'''


@pytest.mark.skipif(sys.version_info < (3, 9), reason="ast details")
def test_mypy_checks_calls_against_the_stubs(tmp_path):
    """mypy (Debian: python3-mypy), when installed, finds the stubs through py.typed (installed) or
    MYPYPATH (the build tree): a correct sample passes, wrong calls are reported line by line."""
    pytest.importorskip("mypy", reason="mypy is not installed (Debian: python3-mypy)")
    env = dict(os.environ)
    if "site-packages" not in PACKAGE.parts and "dist-packages" not in PACKAGE.parts:
        env["MYPYPATH"] = str(PACKAGE.parent)
    results = {}
    for name, text in (("good", GOOD), ("bad", BAD)):
        (tmp_path / f"{name}.py").write_text(text)
        r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
                            "--python-executable", sys.executable, str(tmp_path / f"{name}.py")],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        results[name] = r
    assert results["good"].returncode == 0, results["good"].stdout + results["good"].stderr
    bad = results["bad"].stdout
    assert results["bad"].returncode == 1, bad + results["bad"].stderr
    assert 'bad.py:6: error: Unexpected keyword argument "head_dm" for "Rope"' in bad, bad
    assert 'bad.py:7: error: No overload variant of "attention" matches argument types "Any", "Any", "Any", "str"' \
        in bad, bad
    assert 'bad.py:8: error: No overload variant of "attention" matches argument types "Any", "Any", "Any", "bool", ' \
        '"int"' in bad, bad
    assert 'bad.py:9: error: Incompatible types in assignment (expression has type "str", variable has type "int")' \
        in bad, bad
