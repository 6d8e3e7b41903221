"""Print pip pins for the oldest releases pyproject.toml declares (``name>=X`` -> ``name==X``).

CI installs these in a second environment and runs the tests that touch those packages' internals,
so a floor that no longer works fails CI instead of a user's fresh install.
"""

import re
import sys
import tomllib

# The dependencies whose internals we touch; the others are used through stable public APIs.
CHECKED = {"transformers", "accelerate", "peft", "lm-eval"}

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
specs = list(project["dependencies"])
for extra in project.get("optional-dependencies", {}).values():
    specs.extend(extra)
pins = {}
for spec in specs:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", spec)
    if m and m.group(1).lower() in CHECKED:
        pins[m.group(1).lower()] = m.group(2)
missing = CHECKED - set(pins)
if missing:
    sys.exit(f"pyproject.toml declares no lower bound for {sorted(missing)}")
print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
