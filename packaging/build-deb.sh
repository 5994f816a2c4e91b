#!/bin/sh
# Build loaderd_<version>_amd64.deb with plain dpkg-deb (no debhelper).
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: ./dist)
# Prints the path of the built package on stdout. Needs: dpkg-deb, python3.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
outdir=${1:-$top/dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/pyproject.toml")
[ -n "$version" ] || { echo "build-deb: no version in pyproject.toml" >&2; exit 1; }

stage=$(mktemp -d "${TMPDIR:-/tmp}/loaderd-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT INT TERM
root=$stage/root
umask 022

inst() { # inst MODE SRC DEST: copy one file, creating parents
    mkdir -p "$root$(dirname "$3")"
    install -m "$1" "$2" "$root$3"
}

# Python package: sources and package data only (no caches, no tests).
pydest=/usr/lib/python3/dist-packages/loaderd
(cd "$top/loaderd" && find . -type f \( -name '*.py' -o -name '*.json' -o -name '*.catalog' \) \
    ! -path '*/__pycache__/*' | sort) | while read -r f; do
    inst 0644 "$top/loaderd/$f" "$pydest/${f#./}"
done

# Entry points. -I: isolated mode, so a root shell's PYTHONPATH/PYTHONHOME/user site can never
# inject code into a tool that runs with BPF capabilities.
for tool in loaderd:cli.loaderd loaderctl:cli.loaderctl; do
    name=${tool%%:*}; mod=${tool#*:}
    mkdir -p "$root/usr/bin"
    cat > "$root/usr/bin/$name" <<EOF
#!/usr/bin/python3 -I
import sys

from loaderd.$mod import main

sys.exit(main())
EOF
    chmod 0755 "$root/usr/bin/$name"
done

# systemd integration.
for u in "$top"/units/*.service "$top"/units/*.timer; do
    [ -f "$u" ] && inst 0644 "$u" "/usr/lib/systemd/system/$(basename "$u")"
done
inst 0644 "$top/units/loaderd.sysusers" /usr/lib/sysusers.d/loaderd.conf
inst 0644 "$top/units/loaderd.tmpfiles" /usr/lib/tmpfiles.d/loaderd.conf
inst 0644 "$top/loaderd/audit/catalog/loaderd.catalog" /usr/lib/systemd/catalog/loaderd.catalog
# Audit shipping (docs/fleet.md): disabled until the operator enables the timer.
ju=$top/deploy/journal-upload
inst 0755 "$ju/loaderd-journal-upload" /usr/lib/loaderd/journal-upload
inst 0644 "$ju/loaderd-journal-upload.service" /usr/lib/systemd/system/loaderd-journal-upload.service
inst 0644 "$ju/loaderd-journal-upload.timer" /usr/lib/systemd/system/loaderd-journal-upload.timer
inst 0644 "$ju/loaderd-journal-upload.default" /usr/share/doc/loaderd/examples/journal-upload/loaderd-journal-upload.default

# Configuration: the daemon settings are a conffile; example specs are documentation, not
# active (a package should not start loading kernel programs on its own).
inst 0644 "$top/configs/loaderd.yaml" /etc/loaderd/loaderd.yaml
mkdir -p "$root/etc/loaderd/programs.d"
doc=/usr/share/doc/loaderd
for f in "$top"/configs/programs.d/*; do
    [ -f "$f" ] && inst 0644 "$f" "$doc/examples/programs.d/$(basename "$f")"
done
for f in "$top"/configs/objects/*; do   # CO-RE example: source, spec and build script
    [ -f "$f" ] && inst 0644 "$f" "$doc/examples/objects/$(basename "$f")"
done
[ -f "$top/README.md" ] && inst 0644 "$top/README.md" "$doc/README.md"
for f in "$top"/docs/*.md; do
    [ -f "$f" ] && inst 0644 "$f" "$doc/$(basename "$f")"
done
inst 0644 "$top/units/README.md" "$doc/hardening.md"

# Maintainer scripts and metadata.
mkdir -p "$root/DEBIAN"
for s in postinst prerm postrm; do
    install -m 0755 "$here/debian/$s" "$root/DEBIAN/$s"
done
printf '/etc/loaderd/loaderd.yaml\n' > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" "$here/debian/control.in" \
    > "$root/DEBIAN/control"

mkdir -p "$outdir"
deb=$outdir/loaderd_${version}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "$deb"
