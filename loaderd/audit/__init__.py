"""The audit trail: `log` emits one structured event per decision (journald fields, MESSAGE_IDs,
JSON lines without a journal socket); `spool` keeps the entries journald did not take (it was
stopped) for the resident to replay; `catalog/` is the journal catalog of those events.

May import: errors only (every layer above emits events)."""
