"""Text renderings of status, list and dump reports (the JSON forms are the reports)."""

from __future__ import annotations

import time
from typing import Any

from loaderd.errors import plural


def _ts(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _prog_line(p: dict[str, Any]) -> str:
    facts = "" if p["facts"] == "kernel" else f" [{p['facts']}: {p.get('note')}]"
    extra = (f" loaded {_ts(p['loaded_at'])} xlated {p['bytes_xlated']}B jited "
             f"{p['bytes_jited']}B memlock {p['bytes_memlock']}B"
             if p["facts"] == "kernel" else "")
    if "run_cnt" in p:
        extra += f" run_cnt {p['run_cnt']} run_time_ns {p['run_time_ns']}"
    deg = f" DEGRADED ({p['degraded']})" if p.get("degraded") else ""
    return (f"  prog {p['name']:<20} id {p.get('id', '-'):<6} {p.get('type', '-'):<15} tag "
            f"{p.get('tag', '-')}{extra}{deg}{facts}")


def _map_line(m: dict[str, Any]) -> str:
    if m["facts"] != "kernel":
        return f"  map  {m['name']:<20} id {m.get('id', '-'):<6} [{m['facts']}: {m.get('note')}]"
    frozen = " frozen" if m["frozen"] else ""
    full = ""
    if "entries" in m:
        full = f" {m['entries']}/{m['max_entries']} entries ({m['fill']:.0%} full)"
    elif "bytes_pending" in m:
        full = f" {m['bytes_pending']} bytes unread ({m['fill']:.0%} full)"
    return (f"  map  {m['name']:<20} id {m['id']:<6} {m['type']:<15} key {m['bytes_key']}B "
            f"value {m['bytes_value']}B max_entries {m['max_entries']} flags {m['flags']:#x}"
            f"{frozen}{full}")


def _link_line(lk: dict[str, Any]) -> str:
    where = lk.get("target") or "-"
    if lk["facts"] != "kernel":
        return f"  link {lk['program']:<20} id {lk.get('id', '-'):<6} -> {where} " \
               f"[{lk['facts']}: {lk.get('note')}]"
    return (f"  link {lk['program']:<20} id {lk['id']:<6} {lk['type']:<15} prog_id "
            f"{lk['prog_id']} -> {where}")


def signature_text(sig: dict[str, Any] | None) -> str:
    """`signed by PRINCIPAL (ssh-ed25519 SHA256:...)`, `UNSIGNED`, or "" (not recorded)."""
    if sig is None:
        return ""
    if sig["status"] == "verified":
        return f"signed by {sig['principal']} ({sig['key_type']} {sig['fingerprint']})"
    if sig["status"] == "unsigned":
        return "UNSIGNED"
    return f"signature intact, signer not checked ({sig['fingerprint']})"


def render_status(report: dict[str, Any]) -> str:
    head = report["manifest"]
    if head["readable"]:
        lines = [f"manifest {head['path']}: {head.get('status')} (txid {head.get('txid') or '-'}, "
                 f"written {_ts(head.get('written_at'))}), {plural(len(report['specs']), 'spec')}"]
    else:
        lines = [f"manifest: {head.get('note')}"]
    if "headers" in report:
        lines.append(f"headers: {report['headers']['state']}: {report['headers']['detail']}")
    if head.get("status") == "disabled":
        lines.append("kill switch pulled: nothing is loaded until `loaderd enable` (then "
                     "`systemctl reload loaderd`)")
    elif head.get("interrupted") and head.get("status") != "pending":
        kept = "the set below stays applied" if report["specs"] else "nothing is applied"
        lines.append(f"last apply INTERRUPTED at {_ts(head['interrupted'])} (killed before it "
                     f"finished; {kept}): run `systemctl reload loaderd` (or `loaderd apply`)")
    elif head.get("refused"):
        r = head["refused"]
        more = f" (and {r['errors'] - 1} more)" if r["errors"] > 1 else ""
        kept = "the set below stays" if report["specs"] else "nothing is applied"
        lines.append(f"last apply REFUSED at {_ts(r['at'])}: {r['reason']}{more}; what "
                     f"programs_dir says is not what is applied ({kept})")
    if head.get("rollback") and head.get("status") != "disabled":
        lines.append(head["rollback"]["sentence"])
    if head.get("status") == "pending":
        lines.append("a commit was interrupted (pending): the next `loaderd apply` (or "
                     "`systemctl reload loaderd`) rolls it forward")
    for s in report["specs"]:
        if s["drift"] is None:
            state_text = "drift unknown (no manifest)"
        elif s["drift"]:
            state_text = "DRIFT: " + "; ".join(s["drift"])
        else:
            state_text = "ok" + (" (partially checked)" if s["unchecked"] else "")
        deg = "  DEGRADED" if s["degraded"] else ""
        sha = f"  sha256 {s['sha256'][:12]}" if s["sha256"] else ""
        signed = signature_text(s.get("signature"))
        lines.append(f"{s['spec']}: {state_text}{deg}{sha}" + (f"  {signed}" if signed else ""))
        lines += [_prog_line(p) for p in s["programs"]]
        lines += [_map_line(m) for m in s["maps"]]
        lines += [_link_line(lk) for lk in s["links"]]
    ev = head.get("events")
    if ev and ev["maps"]:
        lines.append(f"events (resident pid {ev['pid']}, since it started, as of "
                     f"{_ts(ev['at'])}):")
        lines += [f"  {m['spec']}/{m['map']}: {m['read']} read, {m['dropped']} dropped (rate "
                  f"limit), {m['lost']} lost (kernel), {m['backlog']} stale backlog"
                  for m in ev["maps"]]
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def listing(report: dict[str, Any]) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"programs": [], "maps": [], "links": []}
    for s in report["specs"]:
        for kind in rows:
            rows[kind] += s[kind]
    specs = [{"spec": s["spec"], "sha256": s["sha256"], "signature": s.get("signature")}
             for s in report["specs"]]
    return {**rows, "specs": specs, "notes": report["notes"]}


def render_list(rows: dict[str, Any]) -> str:
    lines = [f"{'KIND':<5} {'SPEC/NAME':<36} {'ID':>6}  {'TYPE':<15} {'TAG/TARGET':<36} FACTS"]
    for p in rows["programs"]:
        deg = " DEGRADED" if p.get("degraded") else ""
        drift = " DRIFT" if p.get("drift") else ""
        lines.append(f"{'prog':<5} {p['spec'] + '/' + p['name']:<36} {p.get('id', '-'):>6}  "
                     f"{p.get('type', '-'):<15} {p.get('tag', '-'):<36} {p['facts']}"
                     f"{deg}{drift}")
    for m in rows["maps"]:
        frozen = " frozen" if m.get("frozen") else ""
        drift = " DRIFT" if m.get("drift") else ""
        lines.append(f"{'map':<5} {m['spec'] + '/' + m['name']:<36} {m.get('id', '-'):>6}  "
                     f"{m.get('type', '-'):<15} {'':<36} {m['facts']}{frozen}{drift}")
    for lk in rows["links"]:
        drift = " DRIFT" if lk.get("drift") else ""
        lines.append(f"{'link':<5} {lk['spec'] + '/' + lk['program']:<36} "
                     f"{lk.get('id', '-'):>6}  {lk.get('type', '-'):<15} "
                     f"{lk.get('target') or '-':<36} {lk['facts']}{drift}")
    for sp in rows.get("specs", []):
        signed = signature_text(sp["signature"]) or "signature not recorded"
        lines.append(f"{'spec':<5} {sp['spec']:<36} {'-':>6}  {'-':<15} "
                     f"{(sp['sha256'] or '-')[:36]:<36} {signed}")
    lines += [f"note: {n}" for n in rows["notes"]]
    return "\n".join(lines)


def render_dump(d: dict[str, Any]) -> str:
    types = d["types"]
    lines = [f"# {d['spec']}/{d['map']}: {d['type']} id {d['id']}, "
             f"{plural(len(d['entries']), 'entry', 'entries')}, "
             f"key {types['key'] or 'raw'} value {types['value'] or 'raw'}"
             + (", frozen" if d["frozen"] else "")
             + (", sanitized" if d["sanitized"] else ", RAW (unsanitized)")]

    def fmt(v: Any) -> str:
        if isinstance(v, dict):  # a struct: its fields in order
            return "{" + ", ".join(f"{k}={fmt(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return v.hex() if isinstance(v, bytes) else str(v)

    if "histogram" in d:
        lines += render_histogram(d["histogram"])
    else:
        for e in d["entries"]:
            lines.append(f"{fmt(e['key'])}: {fmt(e['value'] if 'value' in e else e['values'])}")
    lines += [f"# note: {n}" for n in d["notes"]]
    return "\n".join(lines)


STARS_MAX = 40  # BCC's table.stars_max


def _stars(val: int, val_max: int, width: int) -> str:
    """BCC's _stars: `width` stars for the largest count, `+` when a count exceeds it."""
    n = 0 if val_max == 0 else min(width, width * val // val_max)
    text = "*" * n
    return text[:-1] + "+" if val > val_max else text


def render_histogram(h: dict[str, Any]) -> list[str]:
    """Text like BCC's print_log2_hist / print_linear_hist (the same columns and stars)."""
    buckets = h["buckets"]
    val_max = max((b["count"] for b in buckets), default=0)
    if h["kind"] == "linear":
        out = [f"     {h['unit']:<13} : count     distribution"]
        for b in buckets:
            low = b["low"]
            out.append(f"        {low:<10d} : {b['count']:<8d} |"
                       f"{_stars(b['count'], val_max, STARS_MAX):<{STARS_MAX}}|")
        return out
    wide = len(buckets) > 32
    stars = STARS_MAX // 2 if wide else STARS_MAX
    out = [(f"               {h['unit']:<29} : count     distribution" if wide else
            f"     {h['unit']:<19} : count     distribution")] if buckets else []
    for b in buckets:
        lo, hi = (f"{b['low']:20d}", f"{b['high']:<20d}") if wide else (
            f"{b['low']:10d}", f"{b['high']:<10d}")
        out.append(f"{lo} -> {hi} : {b['count']:<8d} |"
                   f"{_stars(b['count'], val_max, stars):<{stars}}|")
    return out


