"""The state directory: `statedir` (atomic writes, the writers' lock, generations) and the
manifest of what is applied. State is written by the service user and read by the unprivileged
resident: everything read back is untrusted input.

May import: model, errors."""
