"""loaderd: load eBPF programs from declarative YAML specs, with policy, pins and an audit trail."""

__version__ = "0.1.0"
