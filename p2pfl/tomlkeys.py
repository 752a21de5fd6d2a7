"""Where a key is in a TOML text, for errors of the form ``file:line: dotted.key: problem``.

``tomllib`` reports no positions for values, so :func:`locate` finds the line by scanning the
text for the table header and the key (plain, quoted and dotted keys; inline tables are found at
their parent key; ``name[i]`` is the i-th ``[[name]]`` table). The daemon's configuration and
scenario files both report their errors with it.
"""

from __future__ import annotations

import re
from collections import Counter

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")


def split_key(dotted: str) -> list[str]:
    parts = re.findall(_KEY_PART, dotted)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def locate(text: str, key_path: list[str]) -> int | None:
    """The 1-based line in ``text`` where ``key_path`` is defined, or None if it cannot be found.

    Tries the longest match first: the key itself (under its table header, or dotted under a parent
    table, or dotted at top level); failing that, the closest enclosing table or key.
    """
    for depth in range(len(key_path), 0, -1):
        line = _locate_exact(text, key_path[:depth])
        if line is not None:
            return line
    return None


def _locate_exact(text: str, path: list[str]) -> int | None:
    table: list[str] = []
    plain: list[str] = []
    arrays: Counter[str] = Counter()
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = plain = split_key(header.group(2))
            if header.group(1) == "[[":  # the i-th [[name]] is name[i]
                name = ".".join(plain)
                table = [*plain[:-1], f"{plain[-1]}[{arrays[name]}]"]
                arrays[name] += 1
            if path in (table, plain):
                return number
            continue
        key = _KEY.match(line)
        if key and path in (table + split_key(key.group(1)), plain + split_key(key.group(1))):
            return number
    return None


def where(source: str, text: str | None, key: str) -> str:
    """``source:line`` for the dotted ``key`` (``setup[1].period``), or ``source`` alone."""
    line = locate(text, key.split(".")) if text is not None and key else None
    return f"{source}:{line}" if line is not None else source
