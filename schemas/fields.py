"""Which fields a request body has that no request schema declares (by path), at any depth."""

from __future__ import annotations

import functools
from typing import Any

import msgspec.inspect as mi


def unknown_body_fields(body: Any, body_type: type) -> list[str]:
    """Paths (`foo`, `messages[0].bar`) of the fields in `body` (plain decoded objects) that
    `body_type` and the structs inside it do not declare. A field typed as a free mapping
    (a JSON schema, template kwargs) is not looked into, nor is an object of a kind its struct
    does not read (a struct's `known_types`: the `type` values it reads; another `type` is
    refused by the service as that kind, by its path, not field by field)."""
    return list(_unknown(body, _type_info(body_type), ""))


@functools.cache
def _type_info(struct_type: type) -> mi.Type:
    return mi.type_info(struct_type)


def _unknown(value: Any, t: mi.Type, path: str):
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if _matches(value, member):
                yield from _unknown(value, member, path)
                return
    elif isinstance(t, mi.StructType) and isinstance(value, dict):
        if not _is_known_kind(value, t.cls):
            return
        fields = {f.encode_name: f for f in t.fields}
        for key, item in value.items():
            name = f"{path}.{key}" if path else str(key)
            field = fields.get(key)
            if field is None:
                yield name
            else:
                yield from _unknown(item, field.type, name)
    elif isinstance(t, mi.ListType) and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _unknown(item, t.item_type, f"{path}[{i}]")


def _is_known_kind(value: dict, struct_type: type) -> bool:
    known = getattr(struct_type, "known_types", None)
    if known is None:
        return True
    kind = value.get("type", getattr(struct_type, "default_type", None))
    return kind in known


def _matches(value: Any, t: mi.Type) -> bool:
    return (isinstance(t, mi.StructType) and isinstance(value, dict)) or (
        isinstance(t, mi.ListType) and isinstance(value, list)
    )
