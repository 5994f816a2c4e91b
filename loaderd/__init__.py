"""loaderd: load eBPF programs from declarative YAML specs, with policy, pins and an audit trail.

Layers, top may import below, never the other way (tests/unit/test_layers.py enforces it;
siblings on one line do not import each other):

    cli
    apply | runtime | reports
    stage | observe
    config | bpf | store | audit
    layout | policy | privileges | sandbox
    model
    sanitize
    errors | faults

The pipeline: config (file -> Spec) -> policy -> stage (BCC compile, load, pin in staging) ->
apply (attach, commit) -> store (manifest) -> observe (status, drift) -> runtime (the resident).
docs/architecture.md draws it.
"""

__version__ = "0.1.0"
