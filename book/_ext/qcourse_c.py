"""Show C source in the book by name: a named region or a function, never a matched line of text.

A local Sphinx extension (``_config.yml``: ``local_extensions``). The ``csource`` directive is
``literalinclude`` whose lines are found by name::

    ```{csource} ../qcourse/csrc/pack.c
    :function: qc_pack_b
    ```

    ```{csource} ../qcourse/csrc/u8s8.c
    :region: u8s8
    ```

``:function: NAME`` is the definition of the C function NAME with the comment right above it;
``:region: NAME`` is what lies between the lines ``/* region: NAME */`` and
``/* endregion: NAME */``. A name that is missing, or found twice, fails the build (and
``tests/test_kernels.py`` checks every name the book uses without building it). Every other
``literalinclude`` option works as usual; the language defaults to C.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["find_function", "find_region", "setup"]


def _code_only(line: str, in_comment: bool) -> tuple[str, bool]:
    """The line with comments and string/char literals blanked out, and whether a block comment
    is still open at its end."""
    out, i = [], 0
    while i < len(line):
        if in_comment:
            end = line.find("*/", i)
            if end < 0:
                return "".join(out), True
            i, in_comment = end + 2, False
        elif line.startswith("/*", i):
            in_comment, i = True, i + 2
        elif line.startswith("//", i):
            break
        elif line[i] in "\"'":
            quote, i = line[i], i + 1
            while i < len(line) and line[i] != quote:
                i += 2 if line[i] == "\\" else 1
            i += 1
        else:
            out.append(line[i])
            i += 1
    return "".join(out), in_comment


def find_region(text: str, name: str) -> tuple[int, int]:
    """1-based (first, last) lines strictly between ``/* region: name */`` and its end marker."""
    lines = text.splitlines()
    starts = [i for i, s in enumerate(lines) if s.strip() == f"/* region: {name} */"]
    ends = [i for i, s in enumerate(lines) if s.strip() == f"/* endregion: {name} */"]
    if len(starts) != 1 or len(ends) != 1 or ends[0] <= starts[0] + 1:
        raise ValueError(f"region {name!r}: expected one '/* region: {name} */' line and one "
                         f"'/* endregion: {name} */' line after it, found {len(starts)} and "
                         f"{len(ends)}")
    return starts[0] + 2, ends[0]


def find_function(text: str, name: str) -> tuple[int, int]:
    """1-based (first, last) lines of the definition of C function ``name``, from the comment
    right above it (if any) to its closing brace."""
    lines = text.splitlines()
    code, open_comment = [], False
    for line in lines:
        stripped, open_comment = _code_only(line, open_comment)
        code.append(stripped)
    found, depth = [], 0
    for i, line in enumerate(code):
        call = re.search(rf"\b{re.escape(name)}\s*\(", line)
        if depth == 0 and call and not line.startswith((" ", "\t", "#")):
            rest, j = line[call.start():], i  # a definition if '{' comes before ';'
            while not re.search(r"[;{]", rest) and j + 1 < len(code):
                j += 1
                rest = code[j]
            end = re.search(r"[;{]", rest)
            if end and end.group() == "{":
                found.append(i)
        depth += line.count("{") - line.count("}")
    if len(found) != 1:
        raise ValueError(f"function {name!r}: expected one definition, found {len(found)}")
    first = found[0]
    depth, last = 0, None
    for j in range(first, len(code)):
        depth += code[j].count("{") - code[j].count("}")
        if depth == 0 and "}" in code[j]:
            last = j
            break
    if last is None:
        raise ValueError(f"function {name!r}: no closing brace")
    top = first
    if top > 0 and lines[top - 1].rstrip().endswith("*/"):  # the comment right above
        top -= 1
        while top > 0 and not lines[top].lstrip().startswith("/*"):
            top -= 1
    return top + 1, last + 1


def setup(app: Any) -> dict[str, Any]:
    from docutils.parsers.rst import directives
    from sphinx.directives.code import LiteralInclude

    class CSource(LiteralInclude):
        option_spec = dict(LiteralInclude.option_spec, function=directives.unchanged_required,
                           region=directives.unchanged_required)

        def run(self):
            if ("function" in self.options) == ("region" in self.options):
                raise self.error("csource needs exactly one of :function: and :region:")
            _, filename = self.env.relfn2path(self.arguments[0])
            try:
                text = Path(filename).read_text(encoding="utf-8")
                if "function" in self.options:
                    first, last = find_function(text, self.options.pop("function"))
                else:
                    first, last = find_region(text, self.options.pop("region"))
            except (OSError, ValueError) as err:
                raise self.error(f"{self.arguments[0]}: {err}") from None
            self.options["lines"] = f"{first}-{last}"
            self.options.setdefault("language", "c")
            return super().run()

    app.add_directive("csource", CSource)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
