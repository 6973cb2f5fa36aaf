"""Sphinx extension of the jaxnorm docs: pages generated from the code and the results files.

At ``builder-inited`` (before Sphinx looks for source files) it writes, under
``docs/api/`` and ``docs/gallery/`` (both ignored by git, rebuilt every time):

- ``api/<module>.md`` for each public module of :data:`MODULES`: a table of
  every name in the module's ``__all__`` and one page ``api/<module>.<name>.md``
  per name with its autodoc entry. A name added to an ``__all__`` gets its page
  without any edit here.
- ``gallery/<example>.md`` for each ``docs/_data/examples/<example>.json``: the
  plot and the numbers of that example's committed full run, read from its
  results file (``make gallery`` reruns the examples and copies the files).
- ``_generated/*.md``: tables rendered from ``benchmarks/*.json`` for the
  speed and inference guides (``{include}``d there), so no measured number is
  typed by hand.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

MODULES = ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.interop")

DOCS = Path(__file__).resolve().parents[1]
ROOT = DOCS.parent
API = DOCS / "api"
GALLERY = DOCS / "gallery"
GENERATED = DOCS / "_generated"
EXAMPLE_DATA = DOCS / "_data" / "examples"

# The gallery's order and one line on each example; an example not named here is listed after these.
EXAMPLES = {
    "figure1": "Ioffe & Szegedy 2015, Figure 1: a 3x100 sigmoid MLP on MNIST-1D with and without batch norm.",
    "learning_rates": "Batch norm trains at learning rates that break the plain network (BN-x5/BN-x30 in small).",
    "batch_size": "Wu & He 2018, Table 2 in small: test error against batch size for seven normalizations.",
    "flax_cnn": "A flax.linen and a flax.nnx CNN with jaxnorm layers: trained, saved, restored, folded.",
    "data_parallel": "Synchronized batch norm under shard_map on 8 devices matches single-device training.",
}


def public_names(module_name: str) -> list[str]:
    """The names of ``module_name.__all__``, in its order."""
    module = importlib.import_module(module_name)
    return list(module.__all__)


def api_page(module_name: str, name: str) -> str:
    return f"api/{module_name}.{name}"


def _summary(obj: Any) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # unchanged files keep Sphinx's cache valid
        path.write_text(text)


def _object_page(module_name: str, name: str, obj: Any) -> str:
    if isinstance(obj, type):
        directive = f".. autoclass:: {name}\n   :members:\n"
        if "__call__" in vars(obj):
            directive += "   :special-members: __call__\n"
    elif callable(obj):
        directive = f".. autofunction:: {name}\n"
    else:
        directive = f".. autodata:: {name}\n"
    return (
        f"# {module_name}.{name}\n\n"
        f"```{{eval-rst}}\n.. currentmodule:: {module_name}\n\n{directive}```\n"
    )


def write_api() -> list[str]:
    if API.exists():
        shutil.rmtree(API)
    pages = []
    index = [
        "# API reference\n",
        "Generated from the docstrings: one page for every name in the `__all__` of each public module.\n",
        "```{toctree}\n:maxdepth: 1\n",
        *[f"{m}\n" for m in MODULES],
        "```\n",
    ]
    _write(API / "index.md", "\n".join(index))
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = public_names(module_name)
        doc = _summary(module)
        lines = [f"# `{module_name}`\n", f"{doc}\n" if doc else "", "```{eval-rst}",
                 f".. currentmodule:: {module_name}", "", ".. autosummary::", ""]
        lines += [f"   {name}" for name in names]
        lines += ["```", "", "```{toctree}", ":hidden:", ""]
        lines += [f"{module_name}.{name}" for name in names]
        lines += ["```", ""]
        _write(API / f"{module_name}.md", "\n".join(lines))
        for name in names:
            _write(API / f"{module_name}.{name}.md", _object_page(module_name, name, getattr(module, name)))
            pages.append(api_page(module_name, name))
    return pages


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _flat(prefix: str, value: Any, out: list[tuple[str, Any]], depth: int = 0) -> None:
    """Scalar leaves of a results tree as (dotted key, value); long lists (curves) are left to the plot."""
    if isinstance(value, dict) and depth < 3:
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out, depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) or v is None for v in value):
            out.append((prefix, ", ".join(_cell(v) for v in value)))
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out.append((prefix, value))


def example_numbers(result: dict) -> list[tuple[str, Any]]:
    """Every scalar of an example's results JSON (and short lists), under its dotted key."""
    out: list[tuple[str, Any]] = []
    _flat("", result, out)
    return out


def _example_doc(name: str) -> str:
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        return ""
    import ast

    return ast.get_docstring(ast.parse(path.read_text())) or ""


def write_gallery() -> list[str]:
    if GALLERY.exists():
        shutil.rmtree(GALLERY)
    names = sorted(p.stem for p in EXAMPLE_DATA.glob("*.json"))
    names = [n for n in EXAMPLES if n in names] + [n for n in names if n not in EXAMPLES]
    index = [
        "# Examples gallery\n",
        "Each example is a jit-compiled optax training script under `examples/`, on data generated or shipped "
        "offline. The plot and numbers below are those of its last full run, as the script wrote them to "
        "`results/<name>.{json,png}`; `make gallery` reruns every example and copies its files to "
        "`docs/_data/examples/`.\n",
        "| example | what it shows |",
        "|---|---|",
    ]
    index += [f"| [{n}]({n}.md) | {EXAMPLES.get(n, _summary_line(_example_doc(n)))} |" for n in names]
    index += ["", "```{toctree}", ":hidden:", "", *names, "```", ""]
    _write(GALLERY / "index.md", "\n".join(index))
    for name in names:
        result = json.loads((EXAMPLE_DATA / f"{name}.json").read_text())
        png = EXAMPLE_DATA / f"{name}.png"
        lines = [f"# `examples/{name}.py`\n", EXAMPLES.get(name, _summary_line(_example_doc(name))), ""]
        lines += [f"Run it with `python examples/{name}.py` (`--quick` for the short version the tests run, "
                  "`--out DIR` to write elsewhere).", ""]
        if png.exists():
            lines += [f"![The plot written by examples/{name}.py](../_data/examples/{name}.png)", ""]
        doc = _example_doc(name)
        if doc:
            lines += ["## What it does", "", "```text", doc, "```", ""]
        lines += ["## Numbers of the committed run", "",
                  f"Every scalar of `docs/_data/examples/{name}.json`, as written by the script:", "",
                  "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {_cell(v)} |" for k, v in example_numbers(result)]
        lines.append("")
        _write(GALLERY / f"{name}.md", "\n".join(lines))
    return names


def _summary_line(doc: str) -> str:
    return doc.strip().splitlines()[0] if doc.strip() else ""


def bench_table(result: dict) -> str:
    """The Markdown table of ``benchmarks/bench.py``'s results JSON (the columns bench.py prints)."""
    head = ("| case | dtype | step | jaxnorm ms | flax ms | naive ms | ratio | GB/s | stream % "
            "| compile s (ours/flax) | temp MiB (ours/flax) | diff to flax |")
    lines = [head, "|" + "---|" * 12]
    for row in result["rows"]:
        ms, c, t = row["ms"], row["compile_s"], row["temp_bytes"]
        diff = row.get("grad_rel_diff_ours_vs_flax", row.get("max_abs_diff_ours_vs_flax"))
        naive = f"{ms['naive']:.2f}" if "naive" in ms else "-"
        lines.append(
            f"| {row['case']} | {row['dtype']} | {row['mode']} | {ms['ours']:.2f} | {ms['flax']:.2f} | {naive} "
            f"| {row['ratio_to_flax']['ours']:.2f} | {row['gb_s']['ours']:.1f} "
            f"| {100 * row['fraction_of_streaming']['ours']:.0f}% | {c['ours']:.2f} / {c['flax']:.2f} "
            f"| {t['ours'] / 2**20:.1f} / {t['flax'] / 2**20:.1f} | {diff:.1e} |"
        )
    return "\n".join(lines) + "\n"


def ratio_table(result: dict) -> str:
    """jaxnorm's time over flax's per case, dtype and step, from bench.py's results JSON."""
    steps = ["fwd", "fwd+bwd", "eval"]
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in result["rows"]:
        table.setdefault((row["case"], row["dtype"]), {})[row["mode"]] = row["ratio_to_flax"]["ours"]
    lines = ["| case | dtype | " + " | ".join(steps) + " |", "|---|---|" + "---|" * len(steps)]
    for (case, dtype), r in table.items():
        lines.append(f"| {case} | {dtype} | " + " | ".join(f"{r[s]:.2f}" if s in r else "-" for s in steps) + " |")
    return "\n".join(lines) + "\n"


def bench_context(result: dict) -> str:
    v = result.get("versions", {})
    env = result.get("malloc_env") or {}
    return (f"Machine: {result.get('machine', '?')}; jax {v.get('jax', '?')}, flax {v.get('flax', '?')}, "
            f"backend {v.get('backend', '?')}; {result.get('repeats', '?')} timed calls per step; "
            f"streaming read bandwidth {result.get('streaming_gb_s', float('nan')):.1f} GB/s; "
            f"glibc malloc settings: {', '.join(f'`{k}={val}`' for k, val in env.items()) or 'defaults'}.\n")


def folding_text(result: dict) -> str:
    return (
        "| input | widths | batch norms folded | ms with batch norm | ms folded | speed-up "
        "| max abs output difference | ms to find and fold |\n|---|---|---|---|---|---|---|---|\n"
        f"| {tuple(result['input_shape'])} | {', '.join(map(str, result['widths']))} | {result['batch_norms_folded']} "
        f"| {result['ms_with_batch_norm']:.1f} | {result['ms_folded']:.1f} | {result['speedup']:.2f}x "
        f"| {result['max_abs_output_difference']:.1e} | {result['ms_to_fold']:.0f} |\n"
    )


def write_generated() -> None:
    bench = ROOT / "benchmarks"
    if (bench / "results.json").exists():
        result = json.loads((bench / "results.json").read_text())
        _write(GENERATED / "bench_table.md", bench_table(result))
        _write(GENERATED / "bench_context.md", bench_context(result))
    if (bench / "results_malloc.json").exists():
        result = json.loads((bench / "results_malloc.json").read_text())
        _write(GENERATED / "bench_malloc_ratios.md", ratio_table(result))
        _write(GENERATED / "bench_malloc_context.md", bench_context(result))
    if (bench / "folding.json").exists():
        _write(GENERATED / "folding_table.md", folding_text(json.loads((bench / "folding.json").read_text())))


def _generate(app) -> None:
    write_api()
    write_gallery()
    write_generated()


def setup(app):
    app.connect("builder-inited", _generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
