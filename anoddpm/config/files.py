"""Config files: a YAML (.yaml/.yml) or JSON file of the sections of ``Config`` (``schema``)."""
from __future__ import annotations

import json
from pathlib import Path

from anoddpm.config.schema import Config


def load_config_file(path: str | Path) -> Config:
    """Read a YAML (.yaml/.yml) or JSON config file into a Config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:  # syntax, or a tag such as !!python/object: never constructed
                raise ValueError(f"config file {path} is not plain YAML: {' '.join(str(err).split())[:200]}") from err
        else:
            data = json.loads(text)
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path} is not UTF-8 text") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return Config.from_dict(data)
