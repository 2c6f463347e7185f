"""Keyword arguments on the command line: `--method-options` and `--backbone-options` as `key=value` text.

train.py parses them for a run and writes them back resolved into config.yaml; the tools read them from
a checkpoint's saved config (tools/eval_knn.py) the same way.
"""

from __future__ import annotations

import re

import yaml


class ConfigError(ValueError):
    """An option that cannot be used; the message is one line naming the option and the fix."""


def parse_options(text: str | dict | None, flag: str) -> dict:
    """`key=value,key=value` (values read as YAML, so lists work: `channels=[32,64]`) or a mapping
    from a --config file."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    options = {}
    for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):  # commas that start the next key=
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"{flag} {text!r}: expected key=value pairs joined by ','")
        try:
            options[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            raise ConfigError(f"{flag} {text!r}: {value.strip()!r} is not a YAML value") from None
    return options


def format_options(options: dict) -> str:
    """The inverse of `parse_options` (values written as YAML flow)."""
    return ",".join(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
                    for key, value in options.items())
