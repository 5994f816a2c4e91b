#!/bin/sh
# Build the loaderd .deb from the Debian source package in debian/ (debhelper, dh-python).
#   packaging/build-deb.sh [OUTDIR]        (default OUTDIR: ./dist)
# Builds in a temporary copy of the tree (the work tree is never touched), with
# SOURCE_DATE_EPOCH from debian/changelog: two builds of one tree are bit-identical.
# Prints the path of the built package on the last line of stdout; everything else goes to
# stderr. Needs: dpkg-dev, debhelper, dh-python, pybuild-plugin-pyproject (scripts/setup-host.sh).
set -eu
# Debian's python3 and tools only: a pyenv/venv python earlier in PATH has none of pybuild's
# modules, and the environment must not leak into the package.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
outdir=${1:-$top/dist}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

cd "$top"
version=$(dpkg-parsechangelog -S Version)
SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -S Timestamp)
export SOURCE_DATE_EPOCH

stage=$(mktemp -d "${TMPDIR:-/tmp}/loaderd-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT INT TERM
src=$stage/loaderd-$version
mkdir "$src"
# The tracked files as they are in the work tree (edits included), nothing untracked: no
# .venv, caches or old dist/ in the build. Outside git (a release tarball) everything is copied.
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard \
        | (cd "$top" && xargs -0 -r sh -c \
            'for f; do if [ -e "$f" ] || [ -L "$f" ]; then printf "%s\0" "$f"; fi; done' sh) \
        | (cd "$top" && tar --null -T - -cf -) | (cd "$src" && tar xf -)
else
    (cd "$top" && tar --exclude=./.venv --exclude=./dist --exclude=./.git -cf - .) \
        | (cd "$src" && tar xf -)
fi

(cd "$src" && dpkg-buildpackage -us -uc -b >&2)

arch=$(sed -n 's/^Architecture: //p' "$src/debian/control" | head -n 1)
deb=loaderd_${version}_${arch}.deb
cp "$stage/$deb" "$outdir/$deb"
echo "$outdir/$deb"
