#!/bin/sh
# Build the CO-RE example objects: build.sh OUTDIR [NAME.bpf.c...] (default: every *.bpf.c here).
# Needs clang (-target bpf), bpftool (vmlinux.h from the running kernel's BTF), libbpf's headers
# and llvm-strip (Debian: clang llvm bpftool libbpf-dev). The objects need none of these where
# they load. DWARF is stripped (-g keeps .BTF and .BTF.ext, which CO-RE needs): ~25 KB, not 640.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUTDIR [NAME.bpf.c...]}
shift
mkdir -p "$out"
[ -s "$out/vmlinux.h" ] || bpftool btf dump file /sys/kernel/btf/vmlinux format c > "$out/vmlinux.h"
[ $# -gt 0 ] || set -- "$here"/*.bpf.c
for src in "$@"; do
  name=$(basename "$src" .c)
  clang -target bpf -g -O2 -D__TARGET_ARCH_x86 -I"$out" -c "$src" -o "$out/$name.o.tmp"
  llvm-strip -g -o "$out/$name.o" "$out/$name.o.tmp"
  rm -f "$out/$name.o.tmp"
  echo "$out/$name.o"
done
