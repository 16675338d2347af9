"""Reading job specs: a YAML or JSON file into plain data (safe loader, size, depth and value limits, duplicate
keys refused), and plain data into a validated ExperimentSpec with every bad field named (`SpecError`)."""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from l2cluster.spec.config import spec_models
from l2cluster.spec.errors import Issue, SpecError, issues_from, plugin_problems, union_tags

if TYPE_CHECKING:
    from l2cluster.registry import Registry  # only a type here: reading a spec loads no plugin code

MAX_SPEC_BYTES = 16 << 20  # a 10,000-value grid is well under 1 MiB
MAX_DEPTH = 32  # sections nest 4 deep; a variant's `set` a few more
MAX_VALUES = 1_000_000  # YAML aliases can make a small file hold billions of values ("billion laughs")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader — plain data only, no Python tags — that also refuses a key written twice in one mapping
    (PyYAML would silently keep the last one)."""

    def compose_node(self, parent, index):
        # Refuse deep nesting while composing: PyYAML's scanner is quadratic in the nesting depth and its
        # composer recursive, so a file of 100,000 '[' would otherwise hang, then crash.
        depth = getattr(self, "_depth", 0)
        if depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                              self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node, deep=False):
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found the key {key_node.value!r} twice in one mapping (first on line "
                        f"{seen[key_node.value].line + 1}); keep one of them", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _located(construct):
    """A YAML scalar constructor whose ValueError (a 5000-digit number, !!float fast, a 13th month) is a YAML
    error with the line and column, like every other mistake in the file."""

    def located(loader, node):
        try:
            return construct(loader, node)
        except ValueError as e:
            why = "a number over 4300 digits long" if "digits" in str(e) else str(e)
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {node.value[:40]!r}: {why}",
                                                    node.start_mark) from None

    return located


for _tag in ("int", "float", "timestamp"):
    _SpecLoader.add_constructor(f"tag:yaml.org,2002:{_tag}",
                                _located(yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]))


class _DuplicateKey(ValueError):
    pass


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"found the key {key!r} twice in one object; keep one of them")
        out[key] = value
    return out


def read_spec_file(path: str | Path) -> dict:
    """Parse a YAML or JSON spec file into a dict; SpecError (with line and column) when it cannot be read.

    YAML is read with a safe loader: plain data only, never a Python object or tag."""
    path = Path(path)
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(source, [Issue("", f"cannot read the file: {e.strerror or e}")]) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(source, [Issue("", f"the file is larger than {MAX_SPEC_BYTES >> 20} MiB; a job spec is a "
                                           "few lines (sweep over values with `grid`, not by listing jobs)")])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(source, [Issue("", f"byte {e.start}: not UTF-8 text; save the spec as UTF-8")]) from None
    try:
        if path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_object)
        else:
            data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: plain data only
    except json.JSONDecodeError as e:
        raise SpecError(source, [Issue("", f"line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(source, [Issue("", f"{where}not valid YAML: {problem}")]) from None
    except RecursionError:  # JSON nested hundreds of levels deep
        raise SpecError(source, [Issue("", f"nested more than {MAX_DEPTH} levels deep")]) from None
    except _DuplicateKey as e:
        raise SpecError(source, [Issue("", f"not valid JSON: {e}")]) from None
    except ValueError as e:  # json: a number over 4300 digits long
        why = "it holds a number over 4300 digits long" if "digits" in str(e) else str(e)
        raise SpecError(source, [Issue("", f"cannot read the file: {why}")]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [Issue("", "the file must hold a mapping (name:, optimizer:, …) at the top")])
    issues = structure_issues(data)
    if issues:
        raise SpecError(source, issues)
    return data


def _kind(value: Any) -> str:
    kinds = {set: "a set (YAML !!set)", frozenset: "a set", tuple: "pairs (YAML !!omap or !!pairs)",
             bytes: "binary data (YAML !!binary)", bytearray: "binary data", bool: "true/false", int: "a number",
             float: "a number", type(None): "null", list: "a list", dict: "a mapping"}
    if type(value) in kinds:
        return kinds[type(value)]
    if hasattr(value, "isoformat"):
        return "a date or time (quote it to make it text)"
    return f"a {type(value).__name__}"


def structure_issues(data: Any, *, max_issues: int = 20) -> list[Issue]:
    """What keeps `data` from being plain spec data: mappings with text keys, lists, text, numbers, true/false
    and null, at most MAX_DEPTH levels deep and MAX_VALUES values in all. Checked before anything reads it."""
    issues: list[Issue] = []
    stack: list[tuple[str, Any, int]] = [("", data, 0)]
    seen = 0
    while stack and len(issues) < max_issues:
        path, value, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return [Issue("", f"the spec holds more than {MAX_VALUES:,} values (YAML aliases can multiply them); "
                              "a job spec is small: sweep with `grid` instead")]
        if value is None or isinstance(value, (str, bool, int, float)):
            continue
        if not isinstance(value, (dict, list)):
            issues.append(Issue(path, f"{_kind(value)} is not allowed in a job spec; use text, numbers, true/false, "
                                      "null, lists and mappings"))
            continue
        if depth >= MAX_DEPTH:
            issues.append(Issue(path, f"nested more than {MAX_DEPTH} levels deep"))
            continue
        if isinstance(value, list):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in reversed(list(enumerate(value))))
            continue
        for key, v in reversed(list(value.items())):
            if not isinstance(key, str):
                issues.append(Issue(path, f"the key {reprlib.repr(key)} is {_kind(key)}, not a field name; field "
                                          "names are text (quote it or remove it)"))
                continue
            stack.append((f"{path}.{key}" if path else key, v, depth + 1))
    return issues


def parse_spec(data: dict, registry: Registry, source: str = "<spec>"):
    """Validate a spec dict into an ExperimentSpec; raises SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(source, [Issue("", f"a job spec is a mapping (name:, optimizer:, …), not {_kind(data)}")])
    issues = structure_issues(data)
    if issues:
        raise SpecError(source, issues)
    try:
        spec = spec_models(registry).experiment.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, issues_from(e, union_tags(registry), problems=plugin_problems(registry))) from None
    issues = bools_as_numbers(spec, data)
    if issues:
        raise SpecError(source, issues)
    return spec


def bools_as_numbers(model: BaseModel, data: Any, path: str = "") -> list[Issue]:
    """Numeric fields that were given true/false. pydantic reads them as 1/0, so `epochs: yes` would silently
    train one epoch; a spec that writes a boolean where a number belongs has a mistake in it."""
    issues: list[Issue] = []
    if not isinstance(data, dict):
        return issues
    for name in type(model).model_fields:
        if name in data:
            issues += _bools_in(getattr(model, name), data[name], f"{path}.{name}" if path else name)
    return issues


def _bools_in(value: Any, raw: Any, path: str) -> list[Issue]:
    if isinstance(raw, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [Issue(path, f"expected a number, got {str(raw).lower()}")]
    if isinstance(value, BaseModel):
        return bools_as_numbers(value, raw, path)
    if isinstance(value, (list, tuple)) and isinstance(raw, list) and len(raw) == len(value):
        return [i for k, (v, r) in enumerate(zip(value, raw)) for i in _bools_in(v, r, f"{path}[{k}]")]
    return []


def load_spec(path: str | Path, registry: Registry):
    return parse_spec(read_spec_file(path), registry, source=str(path))


