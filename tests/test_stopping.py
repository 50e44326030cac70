"""Detection of a closed JSON value in a partly generated reply."""

from __future__ import annotations

import pytest

from patch_matters_core.models.stopping import json_value_closed


@pytest.mark.parametrize(
    ("text", "closed"),
    [
        ('{"consistent": [', False),
        ('{"consistent": []}', True),
        ('{"a": "}"', False),
        ('{"a": "}"}', True),
        ('{"a": "say \\"}\\" here"', False),
        ('{"a": "say \\"}\\" here"}', True),
        ("[1, [2, 3]", False),
        ("[1, [2, 3]] and more", True),
        ("Sure! Here it is: {\"x\": 1}", True),
        ("no json at all } ]", False),
        ("", False),
    ],
)
def test_json_value_closed(text, closed):
    assert json_value_closed(text) is closed
