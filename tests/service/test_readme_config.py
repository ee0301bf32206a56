"""The README's configuration table documents every option the service reads, and no other."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import ServiceConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_lists_exactly_the_service_options():
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(ServiceConfig.__struct_fields__)
