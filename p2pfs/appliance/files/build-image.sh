#!/usr/bin/env bash
# Build the p2pfs appliance image (docs/appliance.md). Driven by `p2pfs appliance build`
# (p2pfs/appliance_image.py), which caches each stage under a hash of its inputs.
#
#   build-image.sh base  ROOT MIRROR            debootstrap Debian 12 into ROOT (no p2pfs;
#                                               debootstrap.sh, cached apart from the rest)
#   build-image.sh image BASE WHEELS OUT SIZE   copy BASE, install p2pfs from WHEELS and this
#                                               folder's units, write a bootable raw disk OUT
#                                               of SIZE (MBR: FAT boot partition with syslinux,
#                                               ext4 root labelled p2pfs-root) and OUT.vmlinuz,
#                                               OUT.initrd for direct kernel boot
#
# Nothing is mounted outside a private mount namespace (the chroot's /proc, /dev, /sys
# vanish with it) and the disk is written without loop devices (mkfs.ext4 -d, mtools).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

in_chroot() {
  local root=$1
  shift
  unshare --mount --propagation private -- sh -c '
    set -e
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount -t sysfs sys "$root/sys"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
      DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"
  ' sh "$root" "$@"
}

stage_image() {
  local base=$1 wheels=$2 out=$3 size=$4
  WORK=$(mktemp -d "${out}.work.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  local work=$WORK
  local root=$work/root
  cp -a "$base" "$root"

  # p2pfs: a venv from wheels built on the build machine (same Debian, same Python minor).
  cp -r "$wheels" "$root/tmp/wheels"
  in_chroot "$root" python3 -m venv /opt/p2pfs
  in_chroot "$root" /opt/p2pfs/bin/pip install -q --no-index --find-links /tmp/wheels p2pfs
  rm -rf "$root/tmp/wheels"
  ln -sf /opt/p2pfs/bin/p2pfs "$root/usr/local/bin/p2pfs"

  # Units, firewall, network, Samba template.
  install -m 0644 "$HERE"/units/*.service "$root/etc/systemd/system/"
  install -d -m 0755 "$root/etc/p2pfs" "$root/srv/p2pfs"
  install -m 0644 "$HERE/smb.conf" "$HERE/nftables.conf" "$root/etc/p2pfs/"
  sed -e 's/@LINK_PORT@/7421/g' "$HERE/nftables.conf" >"$root/etc/nftables.conf"
  install -m 0644 "$HERE/network/"*.network "$root/etc/systemd/network/"
  printf 'net.ipv4.ip_nonlocal_bind = 1\n' >"$root/etc/sysctl.d/60-p2pfs.conf"
  echo p2pfs-appliance >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tp2pfs-appliance\n' >"$root/etc/hosts"
  printf 'LABEL=p2pfs-root / ext4 defaults,errors=remount-ro 0 1\n' >"$root/etc/fstab"
  cat >"$root/etc/issue" <<'EOF'
p2pfs appliance \n (\l): no password logins. Status: see the lines above.

EOF
  in_chroot "$root" sh -c '
    set -e
    usermod -p "!" root
    systemctl enable systemd-networkd.service nftables.service \
      p2pfs-firstboot.service p2pfs.service p2pfs-smbd.service
    systemctl disable smbd.service nmbd.service samba-ad-dc.service 2>/dev/null || true
    systemctl mask nmbd.service samba-ad-dc.service smbd.service
    systemctl mask systemd-networkd-wait-online.service
    systemctl set-default multi-user.target
  '
  rm -f "$root/etc/machine-id" && touch "$root/etc/machine-id"
  rm -f "$root/etc/samba/smb.conf"

  # Kernel and initrd, for the boot partition and for direct kernel boot.
  local kernel initrd
  kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
  initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
  cp "$kernel" "$out.vmlinuz"
  cp "$initrd" "$out.initrd"

  # The disk: MBR, p1 FAT32 boot (syslinux) 1 MiB..257 MiB, p2 ext4 root.
  local boot_mib=256 total_mib
  total_mib=$(($(numfmt --from=iec "$size") / 1048576))
  local root_mib=$((total_mib - boot_mib - 1))
  rm -f "$work/boot.img"
  mkfs.vfat -F 32 -n P2PFS-BOOT -C "$work/boot.img" $((boot_mib * 1024)) >/dev/null
  cat >"$work/syslinux.cfg" <<'EOF'
DEFAULT p2pfs
PROMPT 0
TIMEOUT 0
SERIAL 0 115200
LABEL p2pfs
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=p2pfs-root ro net.ifnames=0 console=tty0 console=ttyS0,115200
EOF
  syslinux --install "$work/boot.img"
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$kernel" ::/vmlinuz
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$initrd" ::/initrd.img
  MTOOLS_SKIP_CHECK=1 mcopy -i "$work/boot.img" "$work/syslinux.cfg" ::/syslinux.cfg
  mkfs.ext4 -q -L p2pfs-root -d "$root" "$work/root.img" "${root_mib}M"

  rm -f "$out"
  truncate -s "${total_mib}M" "$out"
  printf 'label: dos\nstart=2048, size=%d, type=c, bootable\nstart=%d, type=83\n' \
    $((boot_mib * 2048)) $(((boot_mib + 1) * 2048)) | sfdisk -q "$out"
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$out" bs=440 count=1 conv=notrunc status=none
  dd if="$work/boot.img" of="$out" bs=1M seek=1 conv=notrunc,sparse status=none
  dd if="$work/root.img" of="$out" bs=1M seek=$((boot_mib + 1)) conv=notrunc,sparse status=none
}

case "${1:-}" in
  base) exec "$HERE/debootstrap.sh" "$2" "$3" ;;
  image) stage_image "$2" "$3" "$4" "$5" ;;
  *) echo "usage: $0 base ROOT MIRROR | image BASE WHEELS OUT SIZE" >&2; exit 2 ;;
esac
