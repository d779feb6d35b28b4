"""Reading a route file: turnout's own YAML document, or a multi-document stream of Kubernetes HTTPRoute,
turnout Version and turnout route-file documents, into one State.

Design rule: the one entry point for route-file text (`turnout apply` through the admin API, `turnout
check`, `serve --routes`); a stream is translated to the native document (proxy.httproute) and then
validated by proxy.parse like any route file, so both syntaxes become the same model. Errors of the native
validator are reported at the HTTPRoute field they came from.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from proxy.errors import FieldError, ValidationError
from proxy.httproute import Translation, is_resource_stream, translate_stream
from proxy.model import State
from proxy.parse import parse_document, version_to_dict

_ROUTE_PATH = re.compile(r"^routes\[(\d+)\]\.?(.*)$", re.S)


def load_documents(text: str) -> list[Any]:
    try:
        # libyaml's C loader is ~10x faster: a route file with 100,000 pins loads in well under a second.
        return list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValidationError([FieldError("", f"invalid YAML: {where}{getattr(e, 'problem', e)}")]) from e


def translate_text(text: str, current: State | None = None) -> tuple[dict[str, Any], Translation | None]:
    """The native route-file document `text` stands for, with the translation when it was a stream."""
    docs = load_documents(text)
    if not is_resource_stream(docs):
        doc = docs[0] if docs else None
        return (doc if doc is not None else {}), None
    t = translate_stream(docs, () if current is None else current.versions.keys())
    document = t.document
    if current is not None:
        for name in sorted(t.borrowed):
            # Named by an HTTPRoute, registered but not in the stream: carried over (same spec, kept as it is).
            document["versions"][name] = version_to_dict(current.versions[name])
    return document, t


def load_route_file(text: str, *, now: float = 0.0, current: State | None = None,
                    warnings: list[FieldError] | None = None) -> State:
    """Route-file text -> State. `warnings` receives what a stream's translation ignored, by field path."""
    document, t = translate_text(text, current)
    if t is None:
        return parse_document(document, now=now, current=current)
    if warnings is not None:
        warnings.extend(t.warnings)
    try:
        return parse_document(document, now=now, current=current)
    except ValidationError as e:
        raise ValidationError([_origin(err, t) for err in e.errors]) from e


def _origin(err: FieldError, t: Translation) -> FieldError:
    """`routes[3].split.v2` -> `HTTPRoute shop: spec.rules[1] (route shop.1): split.v2`."""
    m = _ROUTE_PATH.match(err.path)
    if m is not None and int(m.group(1)) < len(t.origins):
        i, rest = int(m.group(1)), m.group(2)
        origin = t.origins[i]
        if origin.startswith("documents["):  # a plain route file's route: its own field path
            return FieldError(f"{origin}.{rest}" if rest else origin, err.message)
        where = f"{origin} (route {t.document['routes'][i]['name']})"
        return FieldError(f"{where}: {rest}" if rest else where, err.message)
    if err.path.startswith("versions."):
        name = err.path[len("versions."):].split(".", 1)[0]
        source = t.version_origins.get(name)
        if source is not None:
            rest = err.path[len("versions.") + len(name):].lstrip(".")
            return FieldError(f"{source}.{rest}" if rest else source, err.message)
    return err
