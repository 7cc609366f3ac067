"""The registry of pluggable heads."""

from __future__ import annotations

import pytest

from vstream.errors import ConfigError
from vstream.models.heads import Head, create_head, list_heads, register_head


def test_unknown_head_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown head 'nope'; known: "):
        create_head("nope")


def test_a_registered_head_is_created_by_name():
    @register_head("test_echo")
    class Echo(Head):
        def __init__(self, value):
            super().__init__(None)
            self.value = value

    assert "test_echo" in list_heads()
    head = create_head("test_echo", 3)
    assert isinstance(head, Echo) and head.value == 3 and head.name == "test_echo"
