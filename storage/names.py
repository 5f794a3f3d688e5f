"""Names that become folder names (MLflow experiments keep their artifacts in ``mlruns/<experiment>``)."""

from __future__ import annotations

import re

# No path separators, no "..", printable: a name can never point outside the workspace.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._+=,()-]{0,127}$"


def check_name(value: str, what: str) -> str:
    if ".." in value or not re.match(NAME_PATTERN, value):
        raise ValueError(
            f"{what} {value!r}: use letters, digits, spaces and ._+=,()- (no '/', no '..'), at most 128 characters"
        )
    return value
