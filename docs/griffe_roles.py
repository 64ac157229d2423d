"""Griffe extension: render the reST bits of our docstrings as Markdown in the API reference.

The package's docstrings are read by people in ``help()`` and in the editor as much as on the site, so they keep
Sphinx's conventions: cross-reference roles (``:class:`~birdnet_stm32.config.Config```, ``:mod:`.io```,
``:func:`open_run```), reST's ``::`` literal-block marker and ``#:`` comments documenting module constants.
Markdown and griffe know none of them. This extension, loaded by mkdocstrings (see ``mkdocs.yml``), rewrites them
before the docstrings are parsed:

* ``#:`` comment lines right above an attribute without a docstring become its docstring;
* a role becomes an autorefs link, ``[`Config`][birdnet_stm32.config.Config]``, resolved the way Sphinx resolves it
  (relative ``.name`` against the current package, bare names against the current class and module); a name inside
  ``birdnet_stm32`` that does not resolve is still linked, so the strict build fails on the typo; a name outside
  the package (``tf.data.Dataset``) becomes inline code;
* a paragraph ending in ``::`` before an indented block ends in ``:`` (the block renders as code either way);
* a ``Returns:``/``Yields:`` section whose first line holds a colon gets a leading ``: ``. With
  ``returns_named_value: false`` griffe reads ``TYPE: text`` there and would show "A JSON-ready dict" or
  ``{"csv"`` as the type; an empty type makes it take the function's return annotation, as for any other line.

The root package only gets griffe's ``on_package`` event, not ``on_object``, so both are handled.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):`(~?)([^`<]+?)`")
LITERAL_MARKER = re.compile(r"(\S)::(\n\s*\n)")
RETURNS_HEADER = re.compile(r"^(Returns|Yields):[ \t]*$")
PACKAGE = "birdnet_stm32"


class SphinxRolesToAutorefs(griffe.Extension):
    """Rewrite Sphinx roles and ``::`` markers in every docstring of the loaded package."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring in place once the whole object tree is loaded."""
        if obj.docstring is None and obj.is_attribute and obj.lineno:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is None:
            return
        text = ROLE.sub(lambda match: self._link(match, obj, loader), obj.docstring.value)
        obj.docstring.value = _untyped_returns(LITERAL_MARKER.sub(r"\1:\2", text))

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Rewrite the root package's docstring (griffe fires ``on_object`` only for its members)."""
        self.on_object(obj=pkg, loader=loader)

    def _link(self, match: re.Match[str], obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        path = self._resolve(target, obj, loader)
        shown = target.lstrip(".").rsplit(".", 1)[-1] if short else target.lstrip(".")
        if path is None:
            return f"`{shown}`"
        return f"[`{shown}`][{path}]"

    @staticmethod
    def _resolve(target: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
        module = obj if obj.is_module else obj.module
        if target.startswith("."):
            candidates = [module.path + target]
            if not module.is_package:
                candidates.append(module.path.rsplit(".", 1)[0] + target)
        elif "." not in target:
            scopes = [obj, obj.parent, module] if obj.parent is not None else [obj, module]
            candidates = [f"{scope.path}.{target}" for scope in scopes if scope is not None]
        else:
            candidates = [target]
        for path in candidates:
            try:
                target_obj = loader.modules_collection.get_member(path)
            except (KeyError, ValueError, griffe.AliasResolutionError):
                continue
            if target_obj.is_attribute and target_obj.docstring is None and not _has_comment(target_obj):
                return target_obj.parent.path  # an undocumented field: its class's Args section describes it
            return path
        internal = [path for path in candidates if path.split(".", 1)[0] == PACKAGE]
        return internal[0] if internal and target.startswith((PACKAGE, ".")) else None


def _untyped_returns(text: str) -> str:
    """Prefix ``: `` to the first line of each ``Returns:``/``Yields:`` section that contains a colon."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not RETURNS_HEADER.match(line):
            continue
        first = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
        if first is None:
            continue
        body = lines[first].lstrip()
        indent = lines[first][: len(lines[first]) - len(body)]
        if indent and ":" in body and not body.startswith(":"):
            lines[first] = f"{indent}: {body}"
    return "\n".join(lines)


def _comment_above(obj: griffe.Object) -> str:
    """The ``#:`` comment lines right above ``obj``'s first line, joined (empty if there are none)."""
    lines = obj.module.lines
    index = obj.lineno - 2
    comment: list[str] = []
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return "\n".join(comment)


def _has_comment(obj: griffe.Object) -> bool:
    return bool(obj.lineno and _comment_above(obj))
