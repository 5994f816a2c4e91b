"""Changing what is applied: `applier` orchestrates parse -> policy -> adopt or stage -> attach ->
commit, crash-safe and one writer at a time; kill switch and rollback.

May import: stage, observe and below. Not runtime, reports or cli."""
