"""Generate one API reference page per public module of ``birdnet_stm32`` (run by mkdocs-gen-files at build time).

Every ``.py`` file under ``birdnet_stm32/`` becomes ``reference/<dotted/path>.md`` holding a single mkdocstrings
directive; packages (``__init__.py``) become the ``index.md`` of their folder. Private modules (``_name.py``) and
``__main__.py`` are skipped. ``reference/SUMMARY.md`` lists the pages for mkdocs-literate-nav, so the navigation
follows the package tree and picks up whatever modules exist when the site is built.
"""

from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "birdnet_stm32"


def public_modules(package_dir: Path) -> list[tuple[str, ...]]:
    """Dotted-name parts of every public module under ``package_dir``, packages first within their folder."""
    modules = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__main__" or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        modules.append(parts[:-1] if parts[-1] == "__init__" else parts)
    return sorted(set(modules))


nav = mkdocs_gen_files.Nav()
for parts in public_modules(ROOT / PACKAGE):
    is_package = (ROOT.joinpath(*parts) / "__init__.py").is_file()
    doc_path = Path(*parts, "index.md") if is_package else Path(*parts).with_suffix(".md")
    nav[parts] = doc_path.as_posix()
    with mkdocs_gen_files.open(Path("reference", doc_path), "w") as page:
        page.write(f"::: {'.'.join(parts)}\n")

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())
