"""Structural-schema pruning, defaulting and validation of custom resources, as kube-apiserver does.

Pure functions over JSON-like values (dicts, lists, str, int, float, bool, None); no I/O except
`validate_crd_file`, which reads a CRD YAML file.

Error strings follow the apiserver's `field.Error` text (`<path>: <type>: <value>: <detail>`):

- type: `spec.workers: Invalid value: "string": spec.workers in body must be of type
  integer: "string"` (observed types: string, integer, number, boolean, array, object, null)
- required: `spec.template: Required value`
- enum: `spec.template: Unsupported value: "X": supported values: "A", "B"`
- bounds: `spec.workers: Invalid value: 0: spec.workers in body should be greater than or
  equal to 1` (`greater than 0` when exclusiveMinimum; `less than [or equal to]` for maximum)
- multipleOf `... should be a multiple of 32`; minLength `... should be at least 1 chars long`;
  pattern `... should match '<re>'`; minItems `... should have at least 1 items`;
  maxLength `spec.x: Too long: may not be more than 253 bytes`;
  maxItems `spec.x: Too many: must have at most 2 items`;
  date-time `spec.x: Invalid value: "bad": spec.x in body must be of type date-time: "bad"`
- list-map duplicates: `status.conditions[1]: Duplicate value:
  map[string]interface {}{"type":"Ready"}`; list-set duplicates `tags[2]: Duplicate value: "a"`
- CEL: `<path>: Invalid value: "<schema type>": <message>` (`<path>: Forbidden: <message>`,
  `Required value: <message>` with `reason`). A rule on the root schema reports the path `<nil>`,
  as the real server prints it, unless the rule has a `fieldPath`. Without a message:
  `failed rule: <rule>`. A rule that does not compile or fails at runtime:
  `<path>: Invalid value: "<type>": <error> evaluating rule: <rule>`.
- As the real server, CEL rules are skipped when schema validation found a type, required,
  enum, too-long or too-many error; one more error then says so: `<nil>: Invalid value: "null":
  some validation rules were not checked because the object was invalid; correct the existing
  errors to complete validation`.

Paths are dotted from the root, array items `[i]`, map keys dotted (`spec.nodeSelector.zone`).
Not emulated: validation ratcheting on update, CEL cost limits, formats other than date-time/date,
`uniqueItems`, `oneOf/anyOf/allOf/not`, metadata validation (the server owns metadata).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import celpy
import yaml
from celpy import celtypes
from celpy.evaluation import CELEvalError

ROOT_PATH = "<nil>"
_ROOT_KEYS = ("apiVersion", "kind", "metadata")
_NOT_CHECKED = (
    f'{ROOT_PATH}: Invalid value: "null": some validation rules were not checked because the '
    "object was invalid; correct the existing errors to complete validation"
)


# ---------------------------------------------------------------------------- public API


def apply_schema(schema: dict, obj: dict, old: dict | None = None) -> tuple[dict, list[str]]:
    """Prune unknown fields, apply defaults and validate `obj` (an update when `old` is given).

    Returns the new object and the apiserver-style error strings; never raises on bad input.
    """
    new = _prune_and_default(schema, copy.deepcopy(obj), root=True)
    errors: list[_Err] = []
    _validate(schema, new, "", errors, root=True)
    messages = [e.text for e in errors]
    if any(e.blocking for e in errors):
        messages.append(_NOT_CHECKED)
    else:
        _run_cel(schema, new, old, old is not None, "", messages, root=True)
    return new, messages


def column_value(obj: dict, json_path: str) -> Any:
    """The value at an additionalPrinterColumns JSONPath (`.spec.a[0].b`), None when absent."""
    path = json_path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    value: Any = obj
    for token in _path_tokens(path):
        if isinstance(token, int):
            if not isinstance(value, list) or not -len(value) <= token < len(value):
                return None
            value = value[token]
        else:
            if not isinstance(value, dict) or token not in value:
                return None
            value = value[token]
    return value


def load_crds(path: str | Path) -> list[dict]:
    """The CustomResourceDefinitions in a (multi-document) YAML file."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


def validate_crd_file(path: str | Path) -> list[tuple[str, dict]]:
    """(`<crd name>/<version>`, openAPIV3Schema) for every version of every CRD in the file.

    Raises ValueError naming the CRD and the problems when a schema is not usable: a version
    without schema, a node without `type`, a CEL rule that does not compile, or a `default`
    that its own schema rejects or prunes.
    """
    pairs = []
    for crd in load_crds(path):
        name = crd.get("metadata", {}).get("name", "?")
        for version in crd.get("spec", {}).get("versions", []):
            label = f"{name}/{version.get('name')}"
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if not isinstance(schema, dict):
                raise ValueError(f"{path}: {label}: no schema.openAPIV3Schema")
            problems = check_schema(schema)
            if problems:
                raise ValueError(f"{path}: {label}: " + "; ".join(problems))
            pairs.append((label, schema))
    return pairs


def check_schema(schema: dict, path: str = "") -> list[str]:
    """Problems that would make the apiserver reject this (structural) schema; [] when fine."""
    problems: list[str] = []
    where = path or "<root>"
    int_or_string = schema.get("x-kubernetes-int-or-string")
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if "type" not in schema and not int_or_string and not preserve:
        problems.append(f"{where}: type is required")
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            _program(rule["rule"])
        except Exception as exc:  # noqa: BLE001 - report any compile failure
            problems.append(f"{where}: CEL rule {rule.get('rule')!r} does not compile: {exc}")
    if "default" in schema:
        value = schema["default"]
        errs: list[_Err] = []
        _validate(schema, _prune_and_default(schema, copy.deepcopy(value)), path, errs)
        problems.extend(f"{where}: default is invalid: {e.text}" for e in errs)
    for key, sub in (schema.get("properties") or {}).items():
        problems.extend(check_schema(sub, _child(path, key)))
    if isinstance(schema.get("additionalProperties"), dict):
        problems.extend(check_schema(schema["additionalProperties"], _child(path, "*")))
    if isinstance(schema.get("items"), dict):
        problems.extend(check_schema(schema["items"], f"{path}[*]"))
    return problems


def version_schema(crd: dict, version: str) -> dict | None:
    """The openAPIV3Schema of a served version of the CRD, None when not served."""
    for v in crd.get("spec", {}).get("versions", []):
        if v.get("name") == version and v.get("served", True):
            return (v.get("schema") or {}).get("openAPIV3Schema")
    return None


def validate_resource(crd: dict, resource: dict, old: dict | None = None) -> list[str]:
    """Errors of `resource` against the CRD version named by its apiVersion (and kind)."""
    group = crd.get("spec", {}).get("group", "")
    api_version = resource.get("apiVersion", "")
    res_group, _, version = api_version.rpartition("/")
    if res_group != group:
        return [f'apiVersion: Invalid value: "{api_version}": group must be {group}']
    kind = crd.get("spec", {}).get("names", {}).get("kind")
    if resource.get("kind") != kind:
        return [f'kind: Invalid value: "{resource.get("kind")}": kind must be {kind}']
    schema = version_schema(crd, version)
    if schema is None:
        return [f'apiVersion: Invalid value: "{api_version}": version {version} is not served']
    return apply_schema(schema, resource, old)[1]


# ---------------------------------------------------------------------------- pruning, defaults


def _prune_and_default(schema: dict, value: Any, root: bool = False) -> Any:
    """Drop fields unknown to the schema, then fill absent (or null non-nullable) defaults."""
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, dict):
            return [_prune_and_default(items, v) for v in value]
        return value if schema.get("x-kubernetes-preserve-unknown-fields") else []
    if not isinstance(value, dict):
        return value
    props = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields")) or additional is True
    embedded = schema.get("x-kubernetes-embedded-resource")
    out: dict = {}
    for key, sub in value.items():
        if (root or embedded) and key in _ROOT_KEYS:
            out[key] = sub
        elif key in props:
            out[key] = _prune_and_default(props[key], sub)
        elif isinstance(additional, dict):
            out[key] = _prune_and_default(additional, sub)
        elif preserve:
            out[key] = sub
    for key, sub in props.items():
        if (root or embedded) and key in _ROOT_KEYS:
            continue
        if out.get(key, ...) is None and not sub.get("nullable"):
            del out[key]  # the apiserver drops nulls the schema does not allow
        if key not in out and "default" in sub:
            out[key] = _prune_and_default(sub, copy.deepcopy(sub["default"]))
    return out


# ---------------------------------------------------------------------------- schema validation


class _Err:
    def __init__(self, text: str, blocking: bool = False) -> None:
        self.text = text
        self.blocking = blocking


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_ok(expected: str, value: Any) -> bool:
    actual = _json_type(value)
    return actual == expected or (expected == "number" and actual == "integer")


def _name(path: str) -> str:
    return path or "."


def _validate(schema: dict, value: Any, path: str, errs: list[_Err], root: bool = False) -> None:
    where = path or ROOT_PATH

    def invalid(detail: str, bad: Any = None) -> None:
        errs.append(
            _Err(
                f"{where}: Invalid value: {_go_value(value if bad is None else bad)}: "
                f"{_name(path)} in body {detail}"
            )
        )

    def type_invalid(expected: str) -> None:
        actual = _json_type(value)
        if actual == "integer" and isinstance(value, float):
            actual = "number"
        errs.append(
            _Err(
                f'{where}: Invalid value: "{actual}": {_name(path)} in body must be of '
                f'type {expected}: "{actual}"',
                blocking=True,
            )
        )

    if value is None:
        if schema.get("nullable"):
            return
        if "type" in schema or schema.get("x-kubernetes-int-or-string"):
            type_invalid(schema.get("type") or "integer,string")
        return
    if schema.get("x-kubernetes-int-or-string"):
        if _json_type(value) not in ("integer", "string") or isinstance(value, float):
            type_invalid("integer,string")
            return
    elif "type" in schema and not _type_ok(schema["type"], value):
        type_invalid(schema["type"])
        return

    if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
        supported = ", ".join(
            _go_quote(e if isinstance(e, str) else _json_text(e)) for e in schema["enum"]
        )
        errs.append(
            _Err(
                f"{where}: Unsupported value: {_go_value(value)}: supported values: {supported}",
                blocking=True,
            )
        )

    if isinstance(value, str):
        _validate_string(schema, value, path, errs, invalid)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _validate_number(schema, value, invalid)
    elif isinstance(value, list):
        _validate_array(schema, value, path, errs, invalid)
    elif isinstance(value, dict):
        _validate_object(schema, value, path, errs, root)


def _validate_string(schema: dict, value: str, path: str, errs: list[_Err], invalid) -> None:
    where = path or ROOT_PATH
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errs.append(
            _Err(
                f"{where}: Too long: may not be more than {schema['maxLength']} bytes",
                blocking=True,
            )
        )
    if "minLength" in schema and len(value) < schema["minLength"]:
        invalid(f"should be at least {schema['minLength']} chars long")
    if "pattern" in schema:
        try:
            matched = re.search(schema["pattern"], value) is not None
        except re.error:
            matched = True  # the apiserver rejects such a CRD; nothing to check here
        if not matched:
            invalid(f"should match '{schema['pattern']}'")
    fmt = schema.get("format")
    if fmt in ("date-time", "date") and not _is_format(fmt, value):
        errs.append(
            _Err(
                f"{where}: Invalid value: {_go_quote(value)}: {_name(path)} in body "
                f"must be of type {fmt}: {_go_quote(value)}",
                blocking=True,
            )
        )


def _validate_number(schema: dict, value: float, invalid) -> None:
    if "maximum" in schema:
        limit = schema["maximum"]
        if schema.get("exclusiveMaximum") and value >= limit:
            invalid(f"should be less than {_go_float(limit)}")
        elif value > limit:
            invalid(f"should be less than or equal to {_go_float(limit)}")
    if "minimum" in schema:
        limit = schema["minimum"]
        if schema.get("exclusiveMinimum") and value <= limit:
            invalid(f"should be greater than {_go_float(limit)}")
        elif value < limit:
            invalid(f"should be greater than or equal to {_go_float(limit)}")
    factor = schema.get("multipleOf")
    if factor:
        if isinstance(value, int) and isinstance(factor, int):
            ok = value % factor == 0
        else:
            ok = (value / factor).is_integer()
        if not ok:
            invalid(f"should be a multiple of {_go_float(factor)}")


def _validate_array(schema: dict, value: list, path: str, errs: list[_Err], invalid) -> None:
    where = path or ROOT_PATH
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            _validate(items, item, f"{path}[{i}]", errs)
    if "minItems" in schema and len(value) < schema["minItems"]:
        invalid(f"should have at least {schema['minItems']} items", bad=len(value))
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errs.append(
            _Err(f"{where}: Too many: must have at most {schema['maxItems']} items", blocking=True)
        )
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen: list[Any] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = {k: item.get(k) for k in keys if k in item}
            if any(_json_equal(key, s) for s in seen):
                errs.append(_Err(f"{path}[{i}]: Duplicate value: {_go_sharp(key)}"))
            else:
                seen.append(key)
    elif list_type == "set":
        for i, item in enumerate(value):
            if any(_json_equal(item, earlier) for earlier in value[:i]):
                errs.append(_Err(f"{path}[{i}]: Duplicate value: {_go_value(item)}"))


def _validate_object(schema: dict, value: dict, path: str, errs: list[_Err], root: bool) -> None:
    props = schema.get("properties") or {}
    for key in schema.get("required") or []:
        if key not in value:
            errs.append(_Err(f"{_child(path, key)}: Required value", blocking=True))
    additional = schema.get("additionalProperties")
    for key, sub in value.items():
        if root and key == "metadata":
            if not isinstance(sub, dict):
                _validate({"type": "object"}, sub, "metadata", errs)
            continue
        if key in props:
            _validate(props[key], sub, _child(path, key), errs)
        elif isinstance(additional, dict):
            _validate(additional, sub, _child(path, key), errs)


def _is_format(fmt: str, value: str) -> bool:
    if fmt == "date":
        try:
            _dt.date.fromisoformat(value)
            return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))
        except ValueError:
            return False
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value
    )
    if not m:
        return False
    try:
        _dt.date.fromisoformat(m.group(1))
    except ValueError:
        return False
    hour, minute, second = int(m.group(2)), int(m.group(3)), int(m.group(4))
    return hour < 24 and minute < 60 and second < 61


# ---------------------------------------------------------------------------- CEL


_ENV = celpy.Environment()
_PROGRAMS: dict[str, Any] = {}


def _cel_equal(a: Any, b: Any) -> bool:
    """CEL heterogeneous equality: values of different types are unequal, numbers compare."""
    if isinstance(a, celtypes.BoolType) or isinstance(b, celtypes.BoolType):
        return type(a) is type(b) and bool(a) == bool(b)
    numeric = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)
    if isinstance(a, numeric) and isinstance(b, numeric):
        return float(a) == float(b) if isinstance(a, float) or isinstance(b, float) else a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_cel_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_cel_equal(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is None and b is None
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _eq(a: Any, b: Any) -> Any:
    for arg in (a, b):
        if isinstance(arg, CELEvalError):
            return arg  # an error operand stays an error, as in CEL
    return celtypes.BoolType(_cel_equal(a, b))


def _ne(a: Any, b: Any) -> Any:
    result = _eq(a, b)
    return result if isinstance(result, CELEvalError) else celtypes.BoolType(not result)


_FUNCTIONS = {"_==_": _eq, "_!=_": _ne}


def _program(rule: str):
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)
    return _PROGRAMS[rule]


def _to_cel(schema: dict, value: Any, root: bool = False) -> Any:
    """The CEL value Kubernetes builds for `value` typed by `schema` (number → double, etc.)."""
    if value is None:
        return None
    kind = schema.get("type")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        out = {}
        for key, sub in value.items():
            if root and key == "metadata":
                sub = sub if isinstance(sub, dict) else {}
                sub = {k: v for k, v in sub.items() if k in ("name", "generateName")}
                out[celtypes.StringType(key)] = celpy.json_to_cel(sub)
            elif key in props:
                out[celtypes.StringType(key)] = _to_cel(props[key], sub)
            elif isinstance(additional, dict):
                out[celtypes.StringType(key)] = _to_cel(additional, sub)
            else:
                out[celtypes.StringType(key)] = celpy.json_to_cel(sub)
        return celtypes.MapType(out)
    if isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return celtypes.ListType([_to_cel(items, v) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if kind == "number" and isinstance(value, (int, float)):
        return celtypes.DoubleType(float(value))
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return celtypes.IntType(int(value))
    if kind == "string" and schema.get("format") in ("date-time", "date"):
        try:
            return celtypes.TimestampType(value)
        except Exception:  # noqa: BLE001 - schema validation reports the bad format
            return celtypes.StringType(value)
    return celpy.json_to_cel(value)


def _rule_path(path: str, field_path: str | None) -> str:
    if field_path:
        for token in _path_tokens(field_path):
            path = f"{path}[{token}]" if isinstance(token, int) else _child(path, token)
    return path or ROOT_PATH


def _evaluate(rule: str, activation: dict) -> Any:
    try:
        result = _program(rule).evaluate(activation)
    except Exception as exc:  # noqa: BLE001 - celpy raises many kinds; report, never crash
        return CELEvalError(exc.args[0] if exc.args else type(exc).__name__)
    return result


def _run_rule(rule: dict, schema: dict, activation: dict, path: str, out: list[str]) -> None:
    text = str(rule.get("rule", "")).strip()
    where = _rule_path(path, rule.get("fieldPath"))
    kind = _go_quote(schema.get("type", ""))
    result = _evaluate(text, activation)
    if isinstance(result, CELEvalError) or not isinstance(result, (bool, celtypes.BoolType)):
        error = result.args[0] if isinstance(result, CELEvalError) and result.args else result
        out.append(f"{where}: Invalid value: {kind}: {error} evaluating rule: {text}")
        return
    if result:
        return
    message = ""
    if rule.get("messageExpression"):
        msg = _evaluate(str(rule["messageExpression"]), activation)
        if isinstance(msg, str):  # celpy may give a plain str from string()
            message = str(msg).strip()
    if not message:
        message = str(rule["message"]).strip() if rule.get("message") else f"failed rule: {text}"
    reason = rule.get("reason", "FieldValueInvalid")
    if reason == "FieldValueForbidden":
        out.append(f"{where}: Forbidden: {message}")
    elif reason == "FieldValueRequired":
        out.append(f"{where}: Required value: {message}")
    elif reason == "FieldValueDuplicate":
        out.append(f"{where}: Duplicate value: {kind}: {message}")
    else:
        out.append(f"{where}: Invalid value: {kind}: {message}")


def _mentions_old_self(rule: dict) -> bool:
    return bool(re.search(r"\boldSelf\b", str(rule.get("rule", ""))))


def _run_cel(
    schema: dict,
    value: Any,
    old: Any,
    has_old: bool,
    path: str,
    out: list[str],
    root: bool = False,
) -> None:
    if value is None:
        return
    rules = schema.get("x-kubernetes-validations") or []
    if rules:
        activation = {"self": _to_cel(schema, value, root)}
        if has_old and old is not None:
            activation["oldSelf"] = _to_cel(schema, old, root)
        for rule in rules:
            if _mentions_old_self(rule) and "oldSelf" not in activation:
                continue  # a transition rule runs only on update, where the old value exists
            _run_rule(rule, schema, activation, path, out)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        old_map = old if has_old and isinstance(old, dict) else {}
        for key, sub in value.items():
            if root and key in _ROOT_KEYS:
                continue
            child = props.get(key) if key in props else additional
            if isinstance(child, dict):
                _run_cel(child, sub, old_map.get(key), key in old_map, _child(path, key), out)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        keys = schema.get("x-kubernetes-list-map-keys") or []
        correlate = schema.get("x-kubernetes-list-type") == "map" and has_old
        old_items = old if correlate and isinstance(old, list) else []
        for i, item in enumerate(value):
            match = [
                o
                for o in old_items
                if isinstance(o, dict)
                and isinstance(item, dict)
                and all(_json_equal(o.get(k), item.get(k)) for k in keys)
            ]
            _run_cel(items, item, match[0] if match else None, bool(match), f"{path}[{i}]", out)


# ---------------------------------------------------------------------------- helpers


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _path_tokens(path: str) -> list[str | int]:
    tokens: list[str | int] = []
    for m in re.finditer(r"\.([^.\[\]]+)|\[(-?\d+)\]|\[['\"]([^'\"]*)['\"]\]", path):
        if m.group(1) is not None:
            tokens.append(m.group(1))
        elif m.group(2) is not None:
            tokens.append(int(m.group(2)))
        else:
            tokens.append(m.group(3))
    return tokens


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality (True is not 1, 1 is 1.0)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _go_quote(s: str) -> str:
    """Go's %q for a string (close enough: JSON escaping)."""
    return json.dumps(s, ensure_ascii=False)


def _go_float(f: float) -> str:
    """Go's %v for a float64 (shortest digits; exponent form when exp < -4 or >= 6, as strconv)."""
    f = float(f)
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    if math.isnan(f):
        return "NaN"
    if f == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(f)).normalize().as_tuple()
    text = "".join(map(str, digits))
    exp = len(digits) + exponent - 1
    neg = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{neg}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if exp < 0:
        return f"{neg}0.{'0' * (-exp - 1)}{text}"
    if len(text) <= exp + 1:
        return f"{neg}{text}{'0' * (exp + 1 - len(text))}"
    return f"{neg}{text[: exp + 1]}.{text[exp + 1 :]}"


def _go_value(value: Any) -> str:
    """How field.Error prints a bad value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return _go_quote(value)
    return _go_sharp(value)


def _go_sharp(value: Any) -> str:
    """Go's %#v of a decoded JSON value (maps with sorted keys)."""
    if isinstance(value, dict):
        inner = ", ".join(f"{_go_quote(k)}:{_go_sharp(value[k])}" for k in sorted(value))
        return f"map[string]interface {{}}{{{inner}}}"
    if isinstance(value, list):
        return f"[]interface {{}}{{{', '.join(_go_sharp(v) for v in value)}}}"
    if value is None:
        return "interface {}(nil)"
    return _go_value(value)
