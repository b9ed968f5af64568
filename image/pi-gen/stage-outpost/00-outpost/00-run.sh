#!/bin/bash -e
# Installs outpost into a Raspberry Pi OS Lite image: the .deb (copied to files/ by the README's
# steps), journald limits for an SD card, and, with OUTPOST_READONLY_ROOT=1 in pi-gen's config,
# a read-only root with overlayroot (recurse=0).
install -m 644 files/outpost.deb "${ROOTFS_DIR}/tmp/outpost.deb"
install -D -m 644 files/60-sd-card.conf "${ROOTFS_DIR}/etc/systemd/journald.conf.d/60-sd-card.conf"
on_chroot <<'CHROOT'
dpkg -i /tmp/outpost.deb
rm -f /tmp/outpost.deb
systemctl enable outpost.service
CHROOT
if [ "${OUTPOST_READONLY_ROOT:-0}" = 1 ]; then
	on_chroot <<'CHROOT'
apt-get install -y --no-install-recommends overlayroot
echo 'overlayroot="tmpfs:recurse=0"' > /etc/overlayroot.local.conf
CHROOT
fi
