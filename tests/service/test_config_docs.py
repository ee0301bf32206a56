"""docs/configuration.md documents every option the service reads, each once, and no other."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from engine import EngineConfig
from service.config import ServiceConfig, load_config
from service.limits import JobLimits

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _documented(heading: str) -> list[str]:
    """The option names of the table under `## <heading>`, in order, repeats kept."""
    section = PAGE.read_text().split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_service_options_table_lists_each_service_option_once():
    documented = _documented("Service options")
    assert len(documented) == len(set(documented)), "an option is documented twice"
    # the limits are nested in the code but set by their own top-level names
    top_level = set(ServiceConfig.__struct_fields__) - {"engine", "limits"} | set(JobLimits.__struct_fields__)
    assert set(documented) == top_level


def test_engine_options_table_lists_each_engine_config_field_once():
    documented = _documented("Engine options")
    assert len(documented) == len(set(documented)), "an option is documented twice"
    assert set(documented) == {f.name for f in dataclasses.fields(EngineConfig)}


def test_the_toml_example_is_a_valid_configuration(tmp_path):
    (example,) = re.findall(r"```toml\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    (tmp_path / "sluice.toml").write_text(example)
    config = load_config({"SLUICE_CONFIG": str(tmp_path / "sluice.toml")})
    assert (config.engine.dtype, config.engine.quantization_skip_modules) == ("bfloat16", ("down_proj",))
