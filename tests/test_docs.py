"""The documentation site: strict build, generated references, and docstrings that render cleanly.

One ``mkdocs build --strict`` (about 10 s of CPU; no TensorFlow import: mkdocstrings reads the source
statically) feeds every test that inspects pages; those tests are marked ``slow``. The docstring checks read the
package with griffe, the same static analysis the site uses.
"""

import argparse
import functools
import html
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from birdnet_stm32.cli import build_parser

griffe = pytest.importorskip("griffe", reason="documentation tools not installed (pip install -e .[docs])")
pytest.importorskip("mkdocs", reason="documentation tools not installed (pip install -e .[docs])")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "birdnet_stm32"
LR_FINDER = "birdnet_stm32.training.lr_finder"

#: Keras hooks whose parameters Keras documents; overriding them needs a docstring but no ``Args:`` section.
FRAMEWORK_HOOKS = {"build", "call", "get_config", "from_config", "compute_output_shape", "compute_output_spec",
                   "build_from_config", "get_build_config", "update_state", "result", "reset_state"}  # fmt: skip


def public_modules() -> list[str]:
    """Dotted names of the modules that must have a reference page (as ``docs/gen_ref_pages.py`` decides)."""
    names = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__" or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def page_path(site: Path, module: str) -> Path:
    return site / "reference" / Path(*module.split(".")) / "index.html"


class _PageReader(HTMLParser):
    """Collects, from a rendered page: text outside code, blockquotes, and parameter tables per object heading."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.prose: list[str] = []
        self.blockquotes = 0
        self.heading_ids: set[str] = set()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self._code_depth = 0
        self._object: str | None = None
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("code", "pre"):
            self._code_depth += 1
        elif tag == "blockquote":
            self.blockquotes += 1
        elif re.fullmatch(r"h[1-6]", tag) and attrs.get("id"):
            self.heading_ids.add(attrs["id"])
            self._object = attrs["id"]
        elif tag == "table":
            self._table = []
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("code", "pre"):
            self._code_depth -= 1
        elif tag in ("td", "th") and self._cell is not None and self._table:
            self._table[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table" and self._table is not None:
            self.tables.setdefault(self._object or "", []).append(self._table)
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if not self._code_depth:
            self.prose.append(data)


@functools.cache
def read_page(path: Path) -> _PageReader:
    reader = _PageReader()
    reader.feed(path.read_text(encoding="utf-8"))
    return reader


def parameters(reader: _PageReader, obj: str) -> dict[str, str]:
    """``{name: default}`` from the Name/Type/Description/Default table under the heading of ``obj``."""
    for table in reader.tables.get(obj, []):
        if table and table[0] == ["Name", "Type", "Description", "Default"]:
            return {row[0]: row[3] for row in table[1:]}
    return {}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> subprocess.CompletedProcess:
    """One ``mkdocs build --strict``; mkdocs writes every page before it aborts on warnings, so pages are checked
    even when the strict build fails for an unrelated reason."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    proc.site = out
    return proc


@pytest.fixture(scope="module")
def site(build) -> Path:
    assert (build.site / "index.html").is_file(), "mkdocs wrote no site:\n" + build.stderr[-3000:]
    return build.site


@pytest.mark.slow
def test_strict_build_passes(build):
    problems = [line for line in build.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert build.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [build.stderr[-3000:]])


@pytest.mark.slow
def test_site_has_the_guides_and_both_references(site):
    for page in ["index.html", "getting-started/index.html", "architecture/index.html", "cli/index.html"]:
        assert (site / page).is_file(), page
    home = (site / "index.html").read_text(encoding="utf-8")
    for target in ["getting-started/", "cli/", "reference/birdnet_stm32/"]:
        assert f'href="{target}' in home, f"navigation has no link to {target}"


@pytest.mark.slow
def test_every_public_module_has_a_reference_page(site):
    modules = public_modules()
    assert {PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.cli"} <= set(modules)
    for module in modules:
        page = page_path(site, module)
        assert page.is_file(), f"no reference page for {module}"
        assert module in read_page(page).heading_ids, f"{page} does not document {module}"
    summary_nav = (site / "reference" / PACKAGE / "index.html").read_text(encoding="utf-8")
    for module in modules:
        href_tail = "/".join(module.split(".")[1:])
        assert href_tail == "" or f"{href_tail}/" in summary_nav, f"{module} is missing from the navigation"


@pytest.mark.slow
def test_private_modules_and_main_get_no_page(site):
    assert not page_path(site, f"{PACKAGE}.__main__").exists()
    assert not (site / "reference" / PACKAGE / "__main__").exists()


@pytest.mark.slow
def test_lr_finder_page_shows_the_public_api_with_parameters_defaults_and_source(site):
    page = page_path(site, LR_FINDER)
    assert page.is_file(), f"no reference page for {LR_FINDER} (is birdnet_stm32/training/lr_finder.py written?)"
    reader = read_page(page)
    for name in ["LRFinder", "LRFinder.suggest_lr", "LRFinder.plot", "run_lr_finder"]:
        assert f"{LR_FINDER}.{name}" in reader.heading_ids, f"{name} has no section on the page"

    finder = parameters(reader, f"{LR_FINDER}.LRFinder")
    assert {"min_lr": "1e-07", "max_lr": "1.0", "num_steps": "200"}.items() <= finder.items(), finder
    assert parameters(reader, f"{LR_FINDER}.LRFinder.suggest_lr").get("smoothing") == "5"
    assert {"path", "suggested_lr"} <= parameters(reader, f"{LR_FINDER}.LRFinder.plot").keys()
    run = parameters(reader, f"{LR_FINDER}.run_lr_finder")
    expected = {"min_lr": "1e-07", "max_lr": "1.0", "num_steps": "200", "loss_fn": "'categorical_crossentropy'"}
    assert expected.items() <= run.items(), run
    assert {"model", "dataset", "plot_path"} <= run.keys(), run

    text = page.read_text(encoding="utf-8")
    assert "Source code in <code>birdnet_stm32/training/lr_finder.py</code>" in text
    assert "class LRFinder" in html.unescape(re.sub(r"<[^>]+>", "", text))


def test_guides_have_no_unfilled_placeholders_and_their_images_exist():
    """A guide must not ship a ``{{...}}`` placeholder or "pending" figures, nor link an image that is not there."""
    problems = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        where = page.relative_to(ROOT)
        problems += [f"{where}: placeholder {m}" for m in re.findall(r"\{\{[^}]*\}\}", text)]
        if re.search(r"figures? pending|\bTODO\b|\bTBD\b", text):
            problems.append(f"{where}: unfinished text (pending / TODO / TBD)")
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text):
            if not (page.parent / image).is_file():
                problems.append(f"{where}: image {image} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_reference_pages_render_docstrings_as_markdown(site):
    """Doctest prompts only inside code blocks, no reST roles or ``::`` markers left, no blockquotes."""
    problems = []
    for module in public_modules():
        reader = read_page(page_path(site, module))
        prose = "".join(reader.prose)
        if ">>>" in prose:
            problems.append(f"{module}: '>>>' outside a code block (write examples under 'Examples:')")
        if reader.blockquotes:
            problems.append(f"{module}: {reader.blockquotes} blockquote(s), usually a mangled '>>>' example")
        for role in re.findall(r":(?:mod|class|func|meth|attr|data|exc|obj):`[^`]*`", prose):
            problems.append(f"{module}: unrendered role {role}")
        if re.search(r"\w::(\s|$)", prose):
            problems.append(f"{module}: reST '::' marker left in the text")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_cli_reference_lists_every_command_and_flag_of_the_parser(site):
    reader = read_page(site / "cli" / "index.html")
    text = (site / "cli" / "index.html").read_text(encoding="utf-8")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert subparsers.choices, "the parser has no subcommands"
    for name, sub in subparsers.choices.items():
        assert name in reader.heading_ids, f"no section for '{name}'"
        section = text.split(f'id="{name}"', 1)[1].split("<h2", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"<code>{flag}</code>" in section, f"'{name} {flag}' is missing from the CLI reference"
    assert "<code>--find-lr</code>" in text and "(default: 30)" in text


def _public_objects(obj):
    for member in obj.members.values():
        special = member.name.startswith("__") and member.name.endswith("__")  # __init__ is checked with its class
        if member.is_alias or special or not member.is_public:
            continue
        yield member
        if member.is_class or (member.is_module and member.path.startswith(obj.path)):
            yield from _public_objects(member)


def test_every_public_name_has_a_docstring_describing_each_parameter():
    """Static check with griffe (what the site renders): docstrings present, all parameters described."""
    loader = griffe.GriffeLoader(search_paths=[str(ROOT)], docstring_parser=griffe.Parser.google)
    package = loader.load(PACKAGE)
    loader.resolve_aliases(implicit=False)
    problems = []
    for obj in [package, *_public_objects(package)]:
        if obj.is_attribute:
            continue
        where = f"{obj.relative_filepath}:{obj.lineno or 1} {obj.path}"
        if obj.docstring is None or not obj.docstring.value.strip():
            problems.append(f"{where}: no docstring")
            continue
        doc = obj.docstring.value
        if re.search(r"^\s*Example:\s*$", doc, re.MULTILINE):
            problems.append(f"{where}: 'Example:' section (write 'Examples:')")
        if re.search(r"^\s*=+( +=+)+\s*$", doc, re.MULTILINE):
            problems.append(f"{where}: reST table (write a Markdown table: | a | b |)")
        if re.search(r"^( *)``[^`]+``\n\1 +\S", doc, re.MULTILINE):
            problems.append(f"{where}: reST definition list (write a Markdown list: * ``name``: text)")
        if obj.is_function:
            signature_owner, func = obj, obj
        elif obj.is_class and "__init__" in obj.all_members:
            signature_owner, func = obj, obj.all_members["__init__"]
        else:
            continue
        if func.is_alias or (obj.is_function and (obj.name in FRAMEWORK_HOOKS or obj.name.startswith("on_"))):
            continue
        params = [p.name for p in func.parameters if p.name not in ("self", "cls")]
        documented = set()
        for section in [*signature_owner.docstring.parsed, *(func.docstring.parsed if func.docstring else [])]:
            if section.kind is griffe.DocstringSectionKind.parameters:
                documented |= {p.name.lstrip("*") for p in section.value}
        missing = [p for p in params if p not in documented]
        if missing:
            problems.append(f"{where}: parameters without a description: {', '.join(missing)}")
    assert not problems, "\n".join(problems)
