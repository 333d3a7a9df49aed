#!/usr/bin/env bash
# Reverse scripts/install.sh: stop and disable the service, remove the binary, the unit (and
# the limits drop-in `actrix tune --apply` may have written) and the sysctl drop-in.
# /etc/actrix (configuration, shared key) and /var/lib/actrix (keys, databases) are kept
# unless --purge, which also deletes the actrix user and group. Idempotent.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: uninstall.sh [options]
  --purge          also delete /etc/actrix, /var/lib/actrix and the actrix user and group
  --destdir DIR    remove what install.sh --destdir DIR staged (same as DESTDIR=DIR)
  --no-user        keep the actrix user and group even with --purge
  -h, --help       this text
EOF
}

DESTDIR=${DESTDIR:-}
PURGE=0
REMOVE_USER=1
while [ $# -gt 0 ]; do
  case "$1" in
    --purge) PURGE=1 ;;
    --destdir) [ $# -ge 2 ] || { usage >&2; exit 2; }; DESTDIR=$2; shift ;;
    --destdir=*) DESTDIR=${1#--destdir=} ;;
    --no-user) REMOVE_USER=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "uninstall: unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

SVC_USER=actrix
SVC_GROUP=actrix
BINDIR=/usr/local/bin
CONFDIR=/etc/actrix
DATADIR=/var/lib/actrix
UNIT=/etc/systemd/system/actrix.service
UNIT_DROPIN_DIR=/etc/systemd/system/actrix.service.d
LIMITS_DROPIN=$UNIT_DROPIN_DIR/60-actrix-limits.conf
WANTS_LINK=/etc/systemd/system/multi-user.target.wants/actrix.service
SYSCTL_FILE=/etc/sysctl.d/60-actrix.conf

say() { printf 'uninstall: %s\n' "$*"; }
warn() { printf 'uninstall: warning: %s\n' "$*" >&2; }
die() { printf 'uninstall: error: %s\n' "$*" >&2; exit 1; }

if [ -n "$DESTDIR" ]; then
  [ -d "$DESTDIR" ] || { say "nothing staged at $DESTDIR"; exit 0; }
  DESTDIR=$(cd "$DESTDIR" && pwd)
  [ "$DESTDIR" != / ] || DESTDIR=
fi
REAL=0
if [ -z "$DESTDIR" ]; then
  REAL=1
  REMOVE_USER=$((REMOVE_USER && PURGE))
  [ "$(id -u)" -eq 0 ] || die "a real uninstall needs root (or use --destdir DIR)"
else
  REMOVE_USER=0
fi

rm_file() {
  if [ -e "$1" ] || [ -L "$1" ]; then
    rm -f "$1"
    say "removed $1"
  fi
}
rm_tree() {
  if [ -e "$1" ]; then
    rm -rf "$1"
    say "removed $1"
  fi
}

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

if [ "$REAL" -eq 1 ] && systemd_running; then
  if systemctl is-active --quiet actrix.service 2>/dev/null; then
    say "stopping actrix.service (it drains allocations first)"
    systemctl stop actrix.service || warn "systemctl stop actrix failed"
  fi
  if systemctl is-enabled --quiet actrix.service 2>/dev/null; then
    systemctl disable actrix.service >/dev/null 2>&1 || warn "systemctl disable actrix failed"
    say "disabled actrix.service"
  fi
fi

rm_file "$DESTDIR$WANTS_LINK"
rm_file "$DESTDIR$UNIT"
rm_file "$DESTDIR$LIMITS_DROPIN"
if [ -d "$DESTDIR$UNIT_DROPIN_DIR" ]; then
  if rmdir "$DESTDIR$UNIT_DROPIN_DIR" 2>/dev/null; then
    say "removed $DESTDIR$UNIT_DROPIN_DIR"
  else
    say "kept $DESTDIR$UNIT_DROPIN_DIR (it holds other drop-ins)"
  fi
fi
rm_file "$DESTDIR$BINDIR/actrix"
sysctl_removed=0
if [ -e "$DESTDIR$SYSCTL_FILE" ]; then
  rm_file "$DESTDIR$SYSCTL_FILE"
  sysctl_removed=1
fi

if [ "$REAL" -eq 1 ] && systemd_running; then
  systemctl daemon-reload
  systemctl reset-failed actrix.service >/dev/null 2>&1 || true
  say "systemd reloaded"
fi
if [ "$REAL" -eq 1 ] && [ "$sysctl_removed" -eq 1 ]; then
  say "the running kernel keeps the tuned sysctl values until reboot (or sysctl --system after restoring them)"
fi

if [ "$PURGE" -eq 1 ]; then
  rm_tree "$DESTDIR$CONFDIR"
  rm_tree "$DESTDIR$DATADIR"
  if [ "$REMOVE_USER" -eq 1 ]; then
    if getent passwd "$SVC_USER" >/dev/null 2>&1; then
      if userdel "$SVC_USER"; then say "deleted user $SVC_USER"; else warn "userdel $SVC_USER failed"; fi
    fi
    if getent group "$SVC_GROUP" >/dev/null 2>&1; then
      if groupdel "$SVC_GROUP"; then say "deleted group $SVC_GROUP"; else warn "groupdel $SVC_GROUP failed"; fi
    fi
  fi
else
  for d in "$DESTDIR$CONFDIR" "$DESTDIR$DATADIR"; do
    if [ -e "$d" ]; then say "kept $d (--purge deletes it)"; fi
  done
fi

# Remove directories the staged install created and left empty.
if [ -n "$DESTDIR" ]; then
  for d in usr/local/bin usr/local usr etc/systemd/system/multi-user.target.wants \
    etc/systemd/system etc/systemd etc/sysctl.d etc var/lib var; do
    rmdir "$DESTDIR/$d" 2>/dev/null || true
  done
fi
say "done."
