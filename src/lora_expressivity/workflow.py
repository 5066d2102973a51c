"""Helpers of the Snakemake workflow: logging to the rule's log file, configuration checks and provenance.

Every table that the workflow writes (CSV or TSV) has a provenance sidecar
`<table>.meta.json`. It records the configuration files, the grid hash, the
package version, git commit and dirty flag of the code that wrote the table, the
commits of the result records it read and the files it skipped.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import platform
import sys
from datetime import datetime, timezone

import yaml


def log_to(path: str, level=logging.INFO) -> logging.Logger:
    """Send this process's log records and uncaught errors to the rule's log file."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    def log_uncaught(kind, error, trace):
        root.error("job failed", exc_info=(kind, error, trace))
        sys.__excepthook__(kind, error, trace)

    sys.excepthook = log_uncaught
    return logging.getLogger("lora_expressivity.workflow")


def figure_metadata(config_name: str, runs_hash: str) -> dict:
    """PDF and PNG metadata naming the configuration and the commit a figure comes from."""
    from . import __version__
    from .results import git_state

    commit, dirty = git_state()
    origin = f"config {config_name} (runs {runs_hash}), commit {commit}{' (dirty)' if dirty else ''}"
    return {
        "Subject": origin,
        "Keywords": f"lora-expressivity {__version__}; {origin}",
        "Creator": f"lora-expressivity {__version__}",
        "Description": origin,
        "Software": f"lora-expressivity {__version__}",
    }


# ---------------------------------------------------------------- provenance of tables


def write_table(path, table, *, description: str, config: dict, config_files: str, records=None,
                skipped=(), sep: str = ","):
    """Write a pandas table atomically, and its provenance to the sidecar `<path>.meta.json`.

    config is the workflow's configuration and config_files the comma-separated
    paths it was read from. records, when given, are the result rows the table
    was made from, and skipped lists (path, reason) for the files left out.
    """
    from .results import atomic_write_text

    provenance = table_provenance(path, table, description=description, config=config,
                                  config_files=config_files, records=records, skipped=skipped)
    atomic_write_text(path, table.to_csv(sep=sep, index=False))
    atomic_write_text(f"{path}.meta.json", json.dumps(provenance, indent=1, default=str) + "\n")


def table_provenance(path, table, *, description: str, config: dict, config_files: str, records=None,
                     skipped=()) -> dict:
    """Return the sidecar record of a table. write_table documents the arguments."""
    import pandas as pd

    from . import __version__
    from .results import git_state

    commit, dirty = git_state()
    provenance = {
        "table": str(path),
        "description": description,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config_files": [name for name in config_files.split(",") if name],
        "grid_hash": grid_hash(config),
        "rows": len(table),
        "columns": [str(column) for column in table.columns],
        "written_by": {
            "package_version": __version__,
            "git_commit": commit,
            "git_dirty": dirty,
            "python": platform.python_version(),
            "pandas": pd.__version__,
        },
    }
    if records is not None:
        provenance["runs"] = {
            "read": len(records),
            "git_commits": _distinct(records, "git_commit"),
            "any_git_dirty": bool(records["git_dirty"].fillna(False).astype(bool).any())
            if "git_dirty" in records else None,
            "package_versions": _distinct(records, "package_version"),
        }
    provenance["skipped"] = [{"path": str(file), "reason": reason} for file, reason in skipped]
    return provenance


def _distinct(records, column: str) -> list:
    if column not in records:
        return []
    return sorted(str(value) for value in records[column].dropna().unique())


# ---------------------------------------------------------------- configuration checks


def grid_hash(config: dict) -> str:
    """Return the first 12 hex digits of the SHA-256 of the whole configuration as sorted JSON.

    The hash covers every key (grid, figures, batching, train), so any change of the
    configuration file changes it.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_config(config: dict, schema_path) -> list:
    """Validate the workflow configuration and return the runs of its grid.

    Three checks run in order: the JSON schema (unknown keys, types, ranges, empty or
    duplicated lists), each run's settings (grid.expand_grid), and that every figure
    to draw has runs. Raises ConfigError that lists every schema violation, or names
    the first invalid run or figure, each with the key's path and a fix.
    """
    from .config import ConfigError
    from .figures import FIGURES, feeds
    from .grid import expand_grid

    with open(schema_path) as stream:
        schema = yaml.safe_load(stream)
    problems = schema_problems(config, schema)
    if problems:
        listed = "\n".join(f"  - {problem}" for problem in problems)
        noun = "setting" if len(problems) == 1 else "settings"
        raise ConfigError(f"{schema_path} rejects {len(problems)} {noun}:\n{listed}")

    runs = expand_grid(config)
    listed = "figures" in config
    for name in config.get("figures", [*FIGURES, "rank_steps"]):
        if any(feeds(name, run.config.to_dict()) for run in runs):
            continue
        if listed:
            raise ConfigError(
                f"figures lists {name!r}, but no run of the grid feeds it; remove it from 'figures' "
                f"or add the experiments it plots (config/config.yaml has them all)"
            )
        raise ConfigError(
            f"no run of the grid feeds the figure {name!r}, and without a 'figures' list every figure "
            f"is drawn; list the figures to draw under 'figures', e.g. figures: [figure1]"
        )
    return runs


# Hints appended to schema messages about these keys, because their form is not obvious.
KEY_HINTS = {
    "depths": "depths lists [target_depth, frozen_depth] pairs, e.g. [[1, 2], [2, 4]]",
    "ranks": "ranks lists per-layer rank lists, one rank per frozen layer, e.g. [[4, 4], [2, 6]]",
    "batch_over": "batch_over names the settings in which the runs of one training job may differ",
}


def schema_problems(config: dict, schema: dict) -> list[str]:
    """Return one message per violation of the JSON schema, each naming the key and a fix."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    errors = sorted(validator.iter_errors(config), key=lambda error: [str(part) for part in error.absolute_path])
    for error in errors:
        for message in _error_messages(error, schema):
            if message not in messages:
                messages.append(message)
    return messages


def _error_messages(error, root: dict) -> list[str]:
    where = _key_path(error.absolute_path)
    value = error.instance
    kind = error.validator

    if kind in ("oneOf", "anyOf"):
        return _alternatives_messages(error, root)
    if kind in ("unevaluatedProperties", "additionalProperties"):
        return _unknown_key_messages(error, root)
    if "propertyNames" in error.schema_path:
        # The value is a key of the mapping at `where`, not a value of it.
        if kind == "enum":
            return [f"{where} has the unknown key {value!r}; use one of {_choices(error.validator_value)}"]
        return [f"{where} has the invalid name {value!r}; a name starts with a letter and contains only "
                f"letters, digits and underscores"]

    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        message = f"{where} is missing the key {missing[0]!r}; add it (config/config.yaml shows an example)"
    elif kind == "enum":
        message = f"{where} must be one of {_choices(error.validator_value)}, got {value!r}"
    elif kind == "type":
        message = f"{where} must be {_describe_type(error.validator_value)}, got {_shown(value)}"
    elif kind == "minimum":
        message = f"{where} must be at least {error.validator_value}, got {value!r}"
    elif kind == "exclusiveMinimum":
        message = f"{where} must be above {error.validator_value}, got {value!r}"
    elif kind == "maximum":
        message = f"{where} must be at most {error.validator_value}, got {value!r}"
    elif kind == "minItems" and error.validator_value == 1:
        message = f"{where} is an empty list; give at least one value"
    elif kind == "minItems":
        message = f"{where} must have at least {error.validator_value} items, got {value!r}"
    elif kind == "maxItems":
        message = f"{where} must have at most {error.validator_value} items, got {value!r}"
    elif kind == "uniqueItems":
        message = f"{where} lists {_first_duplicate(value)!r} more than once; remove the duplicate"
    elif kind == "minProperties":
        message = f"{where} is empty; add at least one entry"
    else:
        message = f"{where}: {error.message}"
    return [_with_hint(message, error.absolute_path)]


def _alternatives_messages(error, root: dict) -> list[str]:
    """Describe a oneOf/anyOf failure through the one alternative of the value's type, if there is one."""
    alternatives = error.validator_value
    fitting = [index for index, alternative in enumerate(alternatives)
               if _type_fits(_resolve(alternative, root), error.instance)]
    if len(fitting) == 1:
        inner = [sub for sub in error.context if sub.relative_schema_path[0] == fitting[0]]
        if inner:
            messages = []
            for sub in inner:
                messages.extend(_error_messages(sub, root))
            return messages
    described = " or ".join(_describe_schema(alternative, root) for alternative in alternatives)
    where = _key_path(error.absolute_path)
    return [_with_hint(f"{where} must be {described}, got {_shown(error.instance)}", error.absolute_path)]


def _unknown_key_messages(error, root: dict) -> list[str]:
    """Name each key that no schema of this mapping defines, with the closest valid key.

    A key that a failed allOf branch defines also counts as unevaluated; it is
    reported by that branch's own error, so it is left out here.
    """
    known = _known_keys(error.schema, root)
    where = _key_path(error.absolute_path)
    messages = []
    for key in error.instance:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        prefix = f"{where}.{key}" if error.absolute_path else str(key)
        messages.append(f"{prefix} is not a known key; {suggestion}remove it or use one of: "
                        f"{', '.join(sorted(known))}")
    return messages


def _known_keys(schema: dict, root: dict) -> set[str]:
    schema = _resolve(schema, root)
    keys = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        keys |= _known_keys(part, root)
    return keys


def _resolve(schema: dict, root: dict) -> dict:
    """Follow local '#/...' references, the only kind the workflow's schema uses."""
    while isinstance(schema, dict) and "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = {**target, **{key: item for key, item in schema.items() if key != "$ref"}}
    return schema


_JSON_TYPES = {"integer": int, "number": (int, float), "string": str, "array": list, "object": dict,
               "null": type(None), "boolean": bool}


def _type_fits(schema: dict, value) -> bool:
    if "enum" in schema:
        return any(type(choice) is type(value) for choice in schema["enum"])
    expected = schema.get("type")
    if expected is None:
        return True
    names = expected if isinstance(expected, list) else [expected]
    if isinstance(value, bool):
        return "boolean" in names
    return any(isinstance(value, _JSON_TYPES[name]) for name in names)


def _describe_schema(schema: dict, root: dict) -> str:
    schema = _resolve(schema, root)
    if "enum" in schema:
        return f"one of {_choices(schema['enum'])}"
    kind = schema.get("type")
    if kind == "array":
        item = _describe_schema(schema.get("items", {}), root)
        size = "a non-empty list" if schema.get("minItems", 0) >= 1 else "a list"
        return f"{size} whose items are each {item}"
    if kind in ("integer", "number"):
        return _describe_number(kind, schema)
    if kind == "null":
        return "empty (null)"
    if kind == "object":
        return "a mapping"
    return _describe_type(kind) if kind else "valid"


def _describe_number(kind: str, schema: dict) -> str:
    noun = "an integer" if kind == "integer" else "a number"
    if kind == "integer" and schema.get("minimum") == 1:
        return "a positive integer"
    if "minimum" in schema:
        return f"{noun} >= {schema['minimum']}"
    if schema.get("exclusiveMinimum") == 0:
        return "a positive number"
    if "exclusiveMinimum" in schema:
        return f"{noun} above {schema['exclusiveMinimum']}"
    return noun


def _describe_type(kind) -> str:
    names = {"integer": "an integer", "number": "a number", "string": "a string", "array": "a list",
             "object": "a mapping", "null": "empty (null)", "boolean": "true or false"}
    kinds = kind if isinstance(kind, list) else [kind]
    return " or ".join(names.get(name, name) for name in kinds)


def _shown(value) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return f"{value!r} ({names.get(type(value), type(value).__name__)})"


def _choices(values) -> str:
    return ", ".join(str(value) for value in values)


def _first_duplicate(values: list):
    seen = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def _key_path(parts) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "the configuration"


def _with_hint(message: str, parts) -> str:
    for part in parts:
        if part in KEY_HINTS:
            return f"{message} ({KEY_HINTS[part]})"
    return message
