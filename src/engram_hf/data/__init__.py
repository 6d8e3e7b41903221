"""Built-in text, so the demo runs on a machine with no data and no network.

``sonnets.txt``: Shakespeare's Sonnets, public domain (Project Gutenberg text).
"""

import re
from importlib import resources


def builtin_text() -> str:
    return resources.files(__name__).joinpath("sonnets.txt").read_text(encoding="utf-8")


def builtin_documents() -> list[str]:
    """The built-in Sonnets as one document per sonnet (split at the lines holding only its roman
    numeral), for commands that hold out whole documents."""
    parts = re.split(r"^\s*[IVXLC]+\s*$", builtin_text(), flags=re.M)
    return [p.strip() for p in parts[1:] if p.strip()]
