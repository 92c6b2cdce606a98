#!/usr/bin/env bash
# The appliance's base: Debian 12 minbase with a kernel, systemd, Python, FUSE, Samba and
# nftables, straight from a Debian mirror (no p2pfs yet). build-image.sh base ROOT MIRROR
# runs this; `p2pfs appliance build` caches its result under a hash of this file.
set -euo pipefail
root=$1 mirror=$2
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,linux-image-amd64,initramfs-tools,python3,python3-venv,fuse3,samba,nftables,iproute2,procps
SUITE=bookworm


rm -rf "$root"
mkdir -p "$root"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
# Documentation and translations: nobody reads them on an appliance.
rm -rf "$root/usr/share/doc/"* "$root/usr/share/man/"* "$root/usr/share/info/"*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
