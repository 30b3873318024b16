#!/usr/bin/env bash
# Build Bulkhead's guest kernel (vmlinux) from Debian's linux-source-6.1,
# with the project's patches and Kconfig fragment, into a content-addressed
# cache (vmlinux and bzImage side by side).  The last line of stdout is
# the absolute path of vmlinux:
#     K=$(kernel-config/build.sh | tail -1)
# Environment: BULKHEAD_CACHE (default ~/.cache/bulkhead), JOBS (default nproc).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment=$here/bulkhead.config
tarball=/usr/src/linux-source-6.1.tar.xz
cache=${BULKHEAD_CACHE:-$HOME/.cache/bulkhead}
jobs=${JOBS:-$(nproc)}

log() { echo "build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -r $tarball ]] || die "$tarball missing (apt-get install linux-source-6.1)"
[[ -r $fragment ]] || die "$fragment missing"
pkgver=$(dpkg-query -W -f='${Version}' linux-source-6.1) \
    || die "linux-source-6.1 is not installed"

shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob

# Cache key: the fragment, every patch (name and content, in order), this
# script, and the source package version.
key=$(
    {
        printf 'fragment\0'; cat "$fragment"
        for p in "${patches[@]}"; do printf '\0patch %s\0' "$(basename "$p")"; cat "$p"; done
        printf '\0build.sh\0'; cat "${BASH_SOURCE[0]}"
        printf '\0linux-source-6.1 %s\0' "$pkgver"
    } | sha256sum | cut -c1-16
)
dest=$cache/kernel-$key

if [[ -f $dest/vmlinux ]]; then
    log "cached: $dest/vmlinux"
    echo "$dest/vmlinux"
    exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-$key.XXXXXX")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
start=$(date +%s)

log "extracting $tarball (linux-source-6.1 $pkgver) into $work"
tar -xf "$tarball" -C "$work"
src=$work/linux-source-6.1
[[ -d $src ]] || die "unexpected tarball layout"

for p in "${patches[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$src" -p1 -N --batch --no-backup-if-mismatch < "$p" >&2 \
        || die "patch $(basename "$p") does not apply"
done

log "configuring: tinyconfig + $(basename "$fragment")"
make -C "$src" -s tinyconfig >&2
(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$fragment") >&2
make -C "$src" -s olddefconfig >&2

# Every option the fragment sets must survive olddefconfig; every option it
# disables must stay disabled.
missing=()
while IFS= read -r line; do
    grep -qxF -- "$line" "$src/.config" || missing+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$src/.config" || echo absent))")
done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$fragment")
while IFS= read -r opt; do
    if grep -qE "^$opt=" "$src/.config"; then missing+=("# $opt is not set (got: $(grep -E "^$opt=" "$src/.config"))"); fi
done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$fragment")
if ((${#missing[@]})); then
    log "options of $(basename "$fragment") not honoured by Kconfig:"
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

# bzImage as well, so the VMM's bzImage path is tested on the same kernel.
log "building vmlinux and bzImage with -j$jobs"
make -C "$src" -j"$jobs" vmlinux bzImage >&2

stage=$work/out
mkdir -p "$stage"
cp "$src/vmlinux" "$stage/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$stage/bzImage"
cp "$src/.config" "$stage/config"
cp "$src/System.map" "$stage/System.map"
# Atomic install: the directory appears complete or not at all.
if ! mv -T "$stage" "$dest" 2>/dev/null; then
    [[ -f $dest/vmlinux ]] || die "could not install into $dest"
    log "another build installed $dest first"
fi

end=$(date +%s)
log "built in $((end - start)) s; vmlinux $(stat -c %s "$dest/vmlinux") bytes"
echo "$dest/vmlinux"
