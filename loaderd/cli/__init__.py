"""The two command lines: `loaderd` (apply, check, run, status, ...) and `loaderctl` (read-mostly
tooling), their `common` flags and error output, and `render` (text forms of reports).

May import anything; nothing imports cli."""
