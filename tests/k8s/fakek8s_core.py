"""Plain helpers of the fake Kubernetes API server: API errors as `Status` documents, schema validation,
label selectors, quantities and timestamps. No I/O here: each rule reads easily beside the real one."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
from decimal import Decimal, InvalidOperation
from typing import Any

import kubernetes_validate

KUBERNETES_VERSION = "1.32"
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the alphabet of the real apiserver's generateName suffixes
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ApiError(Exception):
    """An error the API server answers with a `Status` document (the client raises ApiException from it)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            doc["details"] = self.details
        return doc


def not_found(resource: str, group: str, name: str) -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(
        404, "NotFound", f'{qualified} "{name}" not found', {"name": name, "group": group, "kind": resource}
    )


def already_exists(resource: str, group: str, name: str) -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified} "{name}" already exists',
        {"name": name, "group": group, "kind": resource},
    )


def invalid(kind: str, group: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid, worded like the real server: `Job.batch "x" is invalid: field: message`."""
    qualified = f"{kind}.{group}" if group else kind
    text = "; ".join(f"{field}: {message}" for field, message in causes)
    return ApiError(
        422,
        "Invalid",
        f'{qualified} "{name}" is invalid: {text}',
        {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "message": message, "field": field}
                for field, message in causes
            ],
        },
    )


def report_failure(task: asyncio.Task[Any]) -> None:
    """Done callback of the fake's tasks: a crash goes to the loop's exception handler (FakeKubernetes.stop
    raises it) instead of leaving a Job waiting forever for a pod nobody runs."""
    if not task.cancelled() and task.exception() is not None:
        task.get_loop().call_exception_handler(
            {"message": f"fakek8s task {task.get_name()} failed", "exception": task.exception()}
        )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def validate_body(body: dict[str, Any], kind: str, group: str, field_validation: str) -> list[str]:
    """Validate against the real 1.32 schema (kubernetes-validate, strict). Returns the warnings to send.

    The real server decodes first: a wrong JSON type or (with fieldValidation=Strict) an unknown field is a
    400 decoding error; what decodes but breaks a rule (required, enum, minimum, pattern) is 422 Invalid.
    With fieldValidation Warn/Ignore unknown fields are dropped (Warn also answers with a Warning header)."""
    name = str(
        (body.get("metadata") or {}).get("name") or (body.get("metadata") or {}).get("generateName", "")
    )
    if field_validation not in ("Strict", "Warn", "Ignore"):
        raise bad_request(
            f'fieldValidation: Unsupported value: "{field_validation}": supported values: '
            '"Ignore", "Strict", "Warn"'
        )
    warnings: list[str] = []
    for _ in range(200):  # each round drops one object's unknown fields; bodies are far smaller than this
        try:
            kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
            return warnings
        except kubernetes_validate.ValidationError as exc:
            field = _field_path(list(exc.path))
            if exc.validator == "additionalProperties" and isinstance(exc.instance, dict):
                known = set((exc.schema or {}).get("properties", {}))
                unknown = [k for k in exc.instance if k not in known]
                if field_validation == "Strict":
                    path = f"{field}." if field else ""
                    raise bad_request(f'strict decoding error: unknown field "{path}{unknown[0]}"') from exc
                for key in unknown:
                    del exc.instance[key]
                    if field_validation == "Warn":
                        warnings.append(f'unknown field "{field + "." if field else ""}{key}"')
                continue
            if exc.validator == "type":
                raise bad_request(
                    f'{kind} in version "{_version(body)}" cannot be handled as a {kind}: '
                    f"{field}: {exc.message}"
                ) from exc
            raise invalid(kind, group, name, [(field, exc.message)]) from exc
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise bad_request(exc.message) from exc
    raise bad_request("too many unknown fields")


def _version(body: dict[str, Any]) -> str:
    return str(body.get("apiVersion", "")).rsplit("/", 1)[-1]


def _field_path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def check_name(kind: str, group: str, name: str) -> None:
    """metadata.name must be a DNS-1123 subdomain (the rule of Jobs, Pods, Secrets, PVCs, policies)."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise invalid(
            kind,
            group,
            name,
            [
                (
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                    "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                    "character",
                )
            ],
        )


def generated_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_docker_time(value: str) -> str:
    """Docker's nanosecond RFC 3339 time -> the second-precision form Kubernetes writes."""
    return value[:19] + "Z" if value and not value.startswith("0001") else now()


# --- label selectors -------------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def selector_matches(selector: str | None, labels: dict[str, str]) -> bool:
    """The labelSelector query grammar: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`."""
    if not selector:
        return True
    return all(_term_matches(term.strip(), labels) for term in _split_selector(selector))


def _term_matches(term: str, labels: dict[str, str]) -> bool:
    set_match = _SET_RE.match(term)
    if set_match:
        key, op, values = set_match.groups()
        allowed = {v.strip() for v in values.split(",")}
        return (labels.get(key) in allowed) if op == "in" else (labels.get(key) not in allowed)
    if "!=" in term:
        key, value = (s.strip() for s in term.split("!=", 1))
        return labels.get(key) != value
    if "=" in term:
        key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
        return labels.get(key) == value
    if term.startswith("!"):
        return term[1:].strip() not in labels
    if not re.match(r"^[A-Za-z0-9./_-]+$", term):
        raise bad_request(f'unable to parse requirement: invalid label selector term "{term}"')
    return term in labels


def check_selector(selector: str | None) -> None:
    selector_matches(selector, {})


# --- quantities ------------------------------------------------------------------------------------------

_SUFFIX: dict[str, Decimal | int] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


def quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (`64Mi`, `500m`, `1e9`) as a number."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ValueError(f"quantities must match the regular expression: {value!r}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation as exc:
        raise ValueError(f"not a quantity: {value!r}") from exc
    return number * Decimal(_SUFFIX[match.group(2) or ""])
