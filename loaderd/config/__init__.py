"""Configuration as input: the trust walk (owner, mode, links, every ancestor), safe YAML,
JSON Schema, semantic and C-source checks, then typed `Spec` and `Settings` (model).

May import: policy, privileges, layout, model, sanitize, errors. Not bpf, store or audit: reading a
config file never touches the kernel, the state directory or the journal."""
