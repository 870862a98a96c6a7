"""Feast imported without typeguard's instrumentation and without torch
(recstack/lean_imports.py), each case in a fresh interpreter: what a process imported
first is what the hooks act on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# After the preamble: import Feast, try a wrong-typed Field, report what the process holds.
PROBE = """
import json, sys
import feast, feast.torch_wrapper as wrapper
from feast import Field
from feast.types import Float32
try:
    Field(name=123, dtype=Float32)
    checked = False
except Exception as e:
    checked = type(e).__name__ == "TypeCheckError"
report = {"checked": checked, "torch_loaded": "torch" in sys.modules,
          "feast_sees_torch": wrapper.TORCH_AVAILABLE}
import torch  # training imports it after Feast: it must still load
report["torch_after"] = float(torch.ones(2).sum())
print(json.dumps(report))
"""


def _probe(preamble: str) -> dict[str, object]:
    code = textwrap.dedent(preamble) + PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_plain_feast_checks_types_and_loads_torch() -> None:
    """The baseline the hooks change (if Feast drops either, this module can go)."""
    assert _probe("") == {
        "checked": True,
        "torch_loaded": True,
        "feast_sees_torch": True,
        "torch_after": 2.0,
    }


def test_lean_feast_skips_the_checks_and_torch_which_still_loads_later() -> None:
    report = _probe(
        """
        from recstack.lean_imports import lean_feast_imports
        lean_feast_imports()
        """
    )
    assert report == {
        "checked": False,
        "torch_loaded": False,
        "feast_sees_torch": False,
        "torch_after": 2.0,
    }


def test_torch_imported_before_feast_is_used_by_feast() -> None:
    report = _probe(
        """
        import torch
        from recstack.lean_imports import lean_feast_imports
        lean_feast_imports()
        """
    )
    assert report["feast_sees_torch"] is True and report["checked"] is False


def test_every_recstack_command_imports_feast_lean() -> None:
    """The CLI's main installs the hooks before it parses (``--help`` exits right after)."""
    report = _probe(
        """
        from recstack.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        """
    )
    assert report["checked"] is False and report["feast_sees_torch"] is False


def test_the_tests_keep_typeguards_checks() -> None:
    """pytest's own process does not call the hooks: a wrong-typed definition fails here."""
    from feast import Field
    from feast.types import Float32

    with pytest.raises(Exception, match="is not an instance of str") as err:
        Field(name=123, dtype=Float32)  # type: ignore[arg-type]
    assert type(err.value).__name__ == "TypeCheckError"
