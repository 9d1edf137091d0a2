"""What docs/config.md documents, read as the tests need it: the "Enumerated keys" table
(every enumerated config key with all its allowed values)."""

from __future__ import annotations

import os
import re
from typing import Dict, List

from tests.parallel.launch import REPO

CONFIG_DOC = os.path.join(REPO, "docs", "config.md")


def enumerated_keys(path: str = CONFIG_DOC) -> Dict[str, List[str]]:
    """``{dotted key: [documented value, ...]}`` from the table under ``## Enumerated keys``:
    rows ``| `key` | `v1`, `v2`, ... |``, every backticked token of the second cell a value
    (``null`` included as the string ``"null"``). Raises if the section or its rows are missing."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"^## Enumerated keys\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"{path}: no '## Enumerated keys' section"
    table = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        key = cells[0].strip("`")
        table[key] = re.findall(r"`([^`]+)`", cells[1])
        assert table[key], f"{path}: no values for {key}"
    assert table, f"{path}: the 'Enumerated keys' table has no rows"
    return table
