"""Spec errors: `SpecError` carries one `Issue` (field path + how to fix it) per problem, and `issues_from` turns
a pydantic ValidationError into Issues whose paths read as the spec is written.

Named `spec_errors`, not `errors`: it holds the errors of job specs only, and leaves `l2cluster.errors` free for
a package-wide error hierarchy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from l2cluster.errors import InputError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from l2cluster.registry import Registry


@dataclass(frozen=True)
class Issue:
    path: str
    message: str


class SpecError(InputError, ValueError):
    """A spec was refused; carries one Issue (field path + how to fix) per problem."""

    def __init__(self, source: str, issues: Sequence[Issue]):
        self.source, self.issues = source, list(issues)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.source}: invalid job spec ({len(self.issues)} problem{'s' * (len(self.issues) != 1)})"]
        for i in self.issues:
            lines.append(f"  {i.path or '(top level)'}")
            lines.append(f"    {i.message}")
        return "\n".join(lines)

    def __reduce__(self):
        return (type(self), (self.source, self.issues))


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _hint(err: Mapping[str, Any], problems: dict[str, str]) -> str:
    kind, msg = err["type"], err["msg"]
    tag = (err.get("ctx") or {}).get("tag")
    if kind == "union_tag_invalid" and tag in problems:  # a plugin by that name exists but could not be loaded
        return f"plugin {tag!r} is {problems[tag]}"
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    if kind == "union_tag_invalid":
        return f"{msg}; use one of those names"
    if kind == "union_tag_not_found":
        return f"{msg}; add `name:` to say which one this is"
    return msg.removeprefix("Value error, ")


_STATIC_TAGS = frozenset({"sgd", "adam", "adamw", "constant", "step", "cosine", "plateau"})


def issues_from(err: ValidationError, tags: frozenset[str] = _STATIC_TAGS, prefix: str = "",
                problems: dict[str, str] | None = None) -> list[Issue]:
    """One Issue per pydantic error, with the path as written in the spec. `problems`: plugin name → why it is
    not loaded (refused or unavailable), to say so when a spec names it."""
    out = []
    for e in err.errors(include_url=False):
        clean: list[Any] = []
        skipped_at = -1
        for part in e["loc"]:
            prev = clean[-1] if clean else None
            in_union = prev in ("optimizer", "schedule") or (
                isinstance(prev, int) and len(clean) >= 2 and clean[-2] == "regularizers")
            # pydantic puts the tag of a tagged union in the location (optimizer.adamw.lr,
            # regularizers[0].l2.strength); drop it so paths read as they are written in the spec.
            if in_union and part in tags and skipped_at != len(clean):
                skipped_at = len(clean)
                continue
            clean.append(part)
        path = _loc(clean)
        sep = "." if prefix and path and not path.startswith("[") else ""
        out.append(Issue(f"{prefix}{sep}{path}", _hint(e, problems or {})))
    return out


def union_tags(registry: Registry) -> frozenset[str]:
    return _STATIC_TAGS | (frozenset(registry.names) if len(registry.names) > 1 else frozenset())


def plugin_problems(registry: Registry) -> dict[str, str]:
    return {p.name: f"{p.status}: {p.reason}" for p in registry.problems}


