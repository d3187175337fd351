"""Form bodies: reading them (``application/x-www-form-urlencoded``, no extra parser), and
forms generated from a plugin type's JSON schema (``config_schema`` of ``GET
/v1/backend-types`` and ``GET /v1/connector-types``) and read back into the JSON the API
takes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from gateway.errors import BadRequest

MAX_FIELDS = 500


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)

    def one(self, name: str) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else None

    def text(self, name: str) -> str:
        return (self.one(name) or "").strip()

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, ()))


async def read_form(request: Request) -> Form:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise BadRequest("The console's forms are application/x-www-form-urlencoded.", code="invalid_form")
    try:
        pairs = parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=MAX_FIELDS)
    except ValueError:
        raise BadRequest(f"The form has more than {MAX_FIELDS} fields.", code="invalid_form") from None
    form = Form()
    for name, value in pairs:
        form.fields.setdefault(name, []).append(value)
    return form


# --- forms from a JSON schema ------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One input of a generated form. ``kind``: text, secret, number, integer, checkbox,
    select, lines (a list of strings, one per line) or json (anything else, as JSON)."""

    name: str
    label: str
    kind: str
    required: bool
    description: str
    default: Any = None
    options: tuple[str, ...] = ()

    @property
    def shown_default(self) -> str:
        if self.default is None or self.kind == "secret":
            return ""
        if self.kind == "lines":
            return "\n".join(str(v) for v in self.default)
        if self.kind == "json":
            return json.dumps(self.default)
        return str(self.default)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return schema.get("$defs", {}).get(ref.split("/")[-1], {})
    return node


def _kind(schema: dict[str, Any], prop: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    prop = _resolve(schema, prop)
    variants = [_resolve(schema, v) for v in prop.get("anyOf", []) if v.get("type") != "null"]
    if len(variants) == 1:
        prop = {**variants[0], **{k: v for k, v in prop.items() if k != "anyOf"}}
    if "enum" in prop:
        return "select", tuple(str(v) for v in prop["enum"])
    if "const" in prop:
        return "select", (str(prop["const"]),)
    t = prop.get("type")
    if prop.get("format") == "password" or prop.get("writeOnly"):
        return "secret", ()
    if t == "string":
        return "text", ()
    if t in ("integer", "number"):
        return t, ()
    if t == "boolean":
        return "checkbox", ()
    if t == "array" and _resolve(schema, prop.get("items", {})).get("type") == "string":
        return "lines", ()
    return "json", ()


def schema_fields(schema: dict[str, Any]) -> list[Field]:
    required = set(schema.get("required", ()))
    out = []
    for name, prop in (schema.get("properties") or {}).items():
        kind, options = _kind(schema, prop)
        out.append(Field(
            name=name, label=prop.get("title") or name.replace("_", " "), kind=kind, required=name in required,
            description=str(prop.get("description") or ""), default=prop.get("default"), options=options,
        ))
    return out


def read_schema_form(form: Form, fields: list[Field], prefix: str) -> dict[str, Any]:
    """The JSON object the API takes from the inputs named ``PREFIX.NAME``; an empty optional
    input is left out (the type's default applies). 400 ``invalid_form`` names the field at fault."""
    out: dict[str, Any] = {}
    for f in fields:
        raw = form.one(f"{prefix}.{f.name}")
        if f.kind == "checkbox":
            if raw is not None or f.required:
                out[f.name] = raw is not None
            continue
        if raw is None or raw.strip() == "":
            continue
        raw = raw.strip() if f.kind != "secret" else raw
        try:
            if f.kind == "integer":
                out[f.name] = int(raw)
            elif f.kind == "number":
                out[f.name] = float(raw)
            elif f.kind == "lines":
                out[f.name] = [line.strip() for line in raw.splitlines() if line.strip()]
            elif f.kind == "json":
                out[f.name] = json.loads(raw)
            else:
                out[f.name] = raw
        except ValueError:
            what = {"integer": "a whole number", "number": "a number", "json": "JSON"}.get(f.kind, "valid")
            raise BadRequest(f"{f.label}: not {what}.", code="invalid_form") from None
    return out
