"""A ring's records decoded and sanitized in one pass, compiled once per layout.

`Records(layout, sanitizer, enums)(record)` is `sanitizer(decode(record, layout,
sanitizer.rules.ip_fields, enums))`, the reference semantics (layout.decode, then the
Sanitizer), without building the intermediate values: one struct unpack for every field, and
per field a cleaner chosen once from the facts that decide it — the field's name (keep, drop,
redact, pseudonymize, ip_fields all match by name) and its kind. An array, an address-named
field that is not a u32 and an IPv6 address take the reference path for that field; a record
shorter than its layout takes it for the whole record. tests/unit/test_event_records.py holds
both to the same output over a large varied corpus (every type and kind, every rule).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from loaderd.layout import Field, _cstring, decode, field_value, layout_end
from loaderd.model import FieldKind
from loaderd.sanitize import REDACTED, Sanitizer, _norm

Cleaner = Callable[[Any], Any]  # one unpacked item -> its sanitized value

_CODES = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q",
          "s8": "b", "s16": "h", "s32": "i", "s64": "q"}


def _journal_key(name: str) -> str:
    return f"event_{name.lstrip('_')}"


class Records:
    """Callable: one record's bytes -> the sanitized fields, as the reference gives them."""

    def __init__(self, layout: tuple[Field, ...], sanitizer: Sanitizer,
                 enums: Mapping[str, Mapping[int, str]] | None = None) -> None:
        self.layout = layout
        self.sanitizer = sanitizer
        self.enums = enums
        self.end = layout_end(layout)
        fmt = ["<"]
        at = 0
        names: list[str] = []  # the unpacked items' fields, in order
        self.plan: list[tuple[str, Cleaner, int]] = []  # (key, cleaner, item) of those shown
        for f in layout:
            if f.offset > at:
                fmt.append(f"{f.offset - at}x")
            at = f.offset + f.total
            if f.hidden:
                fmt.append(f"{f.total}x")
                continue
            code, cleaner = self._compile(f)
            fmt.append(code)
            if self._shown(f.name):
                self.plan.append((f.name, cleaner, len(names)))
            names.append(f.name)
        self.unpack = struct.Struct("".join(fmt)).unpack_from
        # the bytes past the layout, which the reference decodes as one opaque (hex) value
        rest = Field("_rest", self.end, 1, "bytes", FieldKind.HEX)
        self.rest: Cleaner | None = self._compile(rest)[1] if self._shown("_rest") else None
        self.keys = {n: _journal_key(n) for n in (*names, "_rest", "_short")}
        if "rest" in names:  # a field's own journal name is not the trailing bytes'
            self.keys["_rest"] = "event__rest"

    def _shown(self, name: str) -> bool:
        rules = self.sanitizer.rules
        norm = _norm(name)
        return (rules.keep is None or norm in rules.keep) and norm not in rules.drop

    def _compile(self, f: Field) -> tuple[str, Cleaner]:
        """The struct code of one field and how its unpacked item becomes the sanitized value:
        the reference's decode (layout.field_value) and Sanitizer._value, specialised."""
        s = self.sanitizer
        rules = s.rules
        norm = _norm(f.name)
        kind = f.kind
        # a u32 named as an address: decode reads it in network order (bytes, then IPv4Address)
        ip_int = (kind is FieldKind.INT and f.count == 1 and f.size == 4
                  and f.name.lower() in rules.ip_fields)
        number = f.count == 1 and kind in (FieldKind.INT, FieldKind.ENUM) and not ip_int
        code = _CODES[f.type] if number else f"{f.total}s"
        decoded: Cleaner  # the item -> what layout.decode gives for the field
        if kind is FieldKind.ENUM:
            table = dict(f.table) if f.table else None
            enums = self.enums
            name = f.enum or ""

            def decoded(v: Any) -> Any:
                return (table if table is not None else (enums or {}).get(name, {})).get(v, v)
        elif number:
            def decoded(v: Any) -> Any:
                return v
        else:
            addresses = rules.ip_fields

            def decoded(raw: Any) -> Any:
                return field_value(f, raw, addresses, self.enums)
        value = s._value

        def reference(item: Any) -> Any:
            return value(decoded(item), norm)
        if f.count != 1:  # a list: the rules apply per item
            return code, reference
        if norm in rules.redact:
            return code, lambda _item: REDACTED
        if norm in rules.pseudonymize:
            pseudonym = s.pseudonym
            if number and kind is FieldKind.INT:  # the item is the int itself, never None
                return code, pseudonym

            def pseudonymized(item: Any) -> Any:
                got = decoded(item)
                return pseudonym(got) if got is not None else value(got, norm)
            return code, pseudonymized
        if norm in rules.ip_fields and not ip_int:
            return code, reference
        # a name no rule singles out: the kind decides
        text = s.text
        if ip_int or kind is FieldKind.IPV4:
            mask4 = s.mask4
            return code, lambda raw: mask4(int.from_bytes(raw, "big"))
        if kind is FieldKind.INT:
            return code, decoded
        if kind is FieldKind.ENUM:
            def label(v: int) -> Any:  # BTF and inline labels are str; anything else: _value
                got = decoded(v)
                return (text(got) if type(got) is str else got if type(got) is int
                        else value(got, norm))
            return code, label
        if kind is FieldKind.STRING:
            return code, lambda raw: text(_cstring(raw))
        if kind is FieldKind.PATH or kind is FieldKind.COMM:
            return code, lambda raw: text(_cstring(raw), addresses=False)
        if kind is FieldKind.HEX:
            return code, bytes.hex
        return code, reference  # IPV6: ipaddress formats it

    def __call__(self, record: bytes) -> dict[str, Any]:
        size = len(record)
        if size < self.end:  # cut short: the reference's `_short`
            return self.reference(record)
        items = self.unpack(record)
        out = {name: clean(items[i]) for name, clean, i in self.plan}
        if size > self.end and self.rest is not None:
            out["_rest"] = self.rest(record[self.end:])
        return out

    def journal_keys(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """The fields as the journal entry names them: `event_<name>`, leading "_" dropped."""
        keys = self.keys
        return {keys[k] if k in keys else _journal_key(k): v for k, v in fields.items()}

    def reference(self, record: bytes) -> dict[str, Any]:
        """What __call__ computes, the reference way."""
        s = self.sanitizer
        result: dict[str, Any] = s(decode(record, self.layout, s.rules.ip_fields, self.enums))
        return result

