"""MkDocs hook: the docstrings are written for Python's help() and Sphinx-style readers, with roles
such as :math:`x` and :class:`~pkg.Name`. Markdown renders the backticked part as code already;
this drops the role names and the leading ``~`` so the reference reads cleanly."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:math|class|func|meth|data|mod|attr|obj):(?=<code>)")
_TILDE = re.compile(r"<code>~")


def on_page_content(html: str, **kwargs: object) -> str:
    return _TILDE.sub("<code>", _ROLE.sub("", html))
