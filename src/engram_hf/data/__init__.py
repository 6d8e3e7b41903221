"""Built-in text, so the demo runs on a machine with no data and no network.

``sonnets.txt``: Shakespeare's Sonnets, public domain (Project Gutenberg text).
"""

from importlib import resources


def builtin_text() -> str:
    return resources.files(__name__).joinpath("sonnets.txt").read_text(encoding="utf-8")
