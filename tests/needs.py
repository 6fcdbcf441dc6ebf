"""What a test module needs importable: skipped without it, but failed where CI=true (CI installs
every extra, so a missing one there is a broken set-up, not a reason to skip)."""

import importlib
import os

import pytest


def require(*names: str, extra: str = "hf") -> None:
    """Skip the calling module (fail it under CI=true) unless every module in ``names`` imports."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    if missing:
        why = f"not importable: {', '.join(missing)}; the {extra} extra installs them: pip install -e '.[{extra}]'"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, and {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)
