#!/usr/bin/env bash
# System packages xwam needs on Debian/Ubuntu: open3d's libusb, Mesa EGL/OSMesa for offscreen
# MuJoCo rendering, ffmpeg libraries for PyAV-independent tooling. Idempotent; needs root (or sudo).
set -euo pipefail
PKGS="libusb-1.0-0 libegl1 libegl-mesa0 libgl1 libgles2 libosmesa6 libglib2.0-0 libgomp1"
missing=""
for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -z "$missing" ]; then echo "system packages: all present"; exit 0; fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
echo "system packages: installed$missing"
