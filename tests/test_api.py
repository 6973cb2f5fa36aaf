"""The public API's shape (dm_pix's api_test in spirit): keyword-only options, import rules, no cycles, __all__.

- Every option is keyword-only: in every public function and in every Flax
  layer's ``__call__`` (and NNX constructor), a parameter with a default is
  keyword-only unless it is a data argument (``scale``, ``bias``, ...) or one
  that flax's own layer takes positionally (drop-in compatibility); those are
  listed in ``POSITIONAL_DATA``. Required parameters are data: what to
  normalize and, for ``jn.moments(x, axes)``, what to reduce over (the
  signature DESIGN.md fixes, as ``jnp.mean(x, axis)``; ``axes=`` also works).
- ``import jaxnorm`` loads no flax; ``import jaxnorm.nnx`` loads neither
  ``jaxnorm.linen`` nor ``jaxnorm._linen`` (``flax.nnx`` itself imports
  ``flax.linen`` in flax 0.12, so that is the rule that can hold).
- No import cycles among jaxnorm's modules, function-level imports included.
- ``__all__`` lists every public name of each public module, and each has a docstring.
"""

import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

import jaxnorm

ROOT = pathlib.Path(jaxnorm.__file__).parent
PUBLIC = ["jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.interop"]
# Data arguments, and arguments flax's layer of the same name takes positionally.
# tau: filter_response_norm(x, scale, bias, tau), as DESIGN.md fixes it
POSITIONAL_DATA = {"scale", "bias", "tau", "bn_bias", "use_running_average", "num_groups", "group_size"}


def _public_names(module_name):
    module = importlib.import_module(module_name)
    return module, list(module.__all__)


def _signatures():
    for module_name in PUBLIC:
        module, names = _public_names(module_name)
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                call = vars(obj).get("__call__") or next(
                    (vars(c)["__call__"] for c in obj.__mro__ if "__call__" in vars(c)), None
                )
                if inspect.isfunction(call):
                    yield f"{module_name}.{name}.__call__", call
                if module_name == "jaxnorm.nnx":
                    yield f"{module_name}.{name}.__init__", obj.__init__
            elif inspect.isfunction(obj) or callable(obj) and hasattr(obj, "__wrapped__"):
                yield f"{module_name}.{name}", inspect.unwrap(obj)


SIGNATURES = dict(_signatures())


def test_signatures_are_found():
    assert "jaxnorm.batch_norm" in SIGNATURES
    assert "jaxnorm.nnx.RMSNorm.__call__" in SIGNATURES
    assert "jaxnorm.linen.BatchNorm.__call__" in SIGNATURES


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_options_are_keyword_only(name):
    params = list(inspect.signature(SIGNATURES[name]).parameters.values())
    positional_options = [
        p.name for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name not in POSITIONAL_DATA
    ]
    assert not positional_options, f"{name}: options {positional_options} must be keyword-only (put them after `*`)"


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent, check=True)


def test_import_jaxnorm_loads_no_flax():
    out = _run(
        "import sys, jaxnorm, jaxnorm.interop; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flax'))"
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_import_jaxnorm_nnx_loads_no_linen_side():
    out = _run(
        "import sys, jaxnorm.nnx; "
        "print(sorted(m for m in sys.modules if m.startswith(('jaxnorm.linen', 'jaxnorm._linen'))))"
    )
    assert out.stdout.strip() == "[]", out.stdout


def _module_name(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_graph():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):  # every import, function-level ones included
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    assert "jaxnorm._src.state" in graph["jaxnorm._src.batch_norm"]
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_core_imports_no_flax_and_nnx_side_no_linen_side():
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        if name.startswith("jaxnorm._src") or name in ("jaxnorm", "jaxnorm.interop"):
            assert not any(m.split(".")[0] == "flax" for m in imported), name
        if name.startswith("jaxnorm._nnx") or name == "jaxnorm.nnx":
            assert not any(m.startswith(("jaxnorm.linen", "jaxnorm._linen")) for m in imported), name


@pytest.mark.parametrize("module_name", PUBLIC)
def test_all_is_complete_and_exists(module_name):
    module, names = _public_names(module_name)
    assert len(names) == len(set(names)), "duplicates in __all__"
    for n in names:
        assert hasattr(module, n), f"{module_name}.__all__ names {n}, which does not exist"
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and not inspect.ismodule(v) and getattr(v, "__module__", "").startswith("jaxnorm")
    }
    missing = sorted(public - set(names))
    assert not missing, f"{module_name}: public names missing from __all__: {missing}"


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_exported_name_is_documented(module_name):
    module, names = _public_names(module_name)
    assert (module.__doc__ or "").strip(), module_name
    undocumented = [n for n in names if len(inspect.getdoc(getattr(module, n)) or "") < 20]
    assert not undocumented, f"{module_name}: no docstring for {undocumented}"


def test_moments_takes_axes_by_position_or_keyword():
    import jax.numpy as jnp

    x = jnp.arange(6.0).reshape(2, 3)
    by_position, by_keyword = jaxnorm.moments(x, 0), jaxnorm.moments(x, axes=0)
    assert [a.tolist() for a in by_position] == [a.tolist() for a in by_keyword]


def test_no_module_holds_ambient_state():
    """No module of jaxnorm (core or Flax side) imports contextvars or threading: results depend on arguments only."""
    import ast
    import pathlib

    root = pathlib.Path(jaxnorm.__file__).parent
    paths = sorted(root.rglob("*.py"))
    assert len(paths) > 40 and any("_linen" in p.parts for p in paths)
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("contextvars", "threading") for n in names), path
