#!/usr/bin/env bash
# Install actrix as a systemd service on a Linux edge node.
#
#   sudo scripts/install.sh                        build, install, create the user, enable
#   scripts/install.sh --no-build --destdir /tmp/x stage into a directory (packaging, tests)
#
# It installs:
#   /usr/local/bin/actrix                  the binary (built with cargo build --release -p actrix)
#   /etc/actrix/actrix.toml                from relay/actrix.example.toml, with node.data_dir =
#                                          /var/lib/actrix and ks.shared_key_file pointing at
#                                          /etc/actrix/shared_key (an existing file is kept)
#   /etc/actrix/actrix.example.toml        the documented example of this version (reference)
#   /etc/actrix/shared_key                 a fresh random key, 0600 actrix (kept if present)
#   /var/lib/actrix                        the data directory, 0750 actrix
#   /etc/systemd/system/actrix.service     the hardened unit (from scripts/actrix.service)
#   /etc/sysctl.d/60-actrix.conf           the sysctl drop-in `actrix tune` plans for this host
# On a real install (no DESTDIR) it also creates the system user and group `actrix`, applies
# the sysctls (sysctl --system) and, when systemd runs, reloads it and enables the service.
# It does not start the service: edit /etc/actrix/actrix.toml first (listen and relay
# addresses), then `systemctl start actrix`.
#
# Idempotent: run it again to upgrade the binary and the unit; configuration, key and data
# are kept. scripts/uninstall.sh reverses it.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install.sh [options]
  --no-build       do not build; install target/release/actrix (or $ACTRIX_BIN) as it is
  --bin PATH       install this binary (same as ACTRIX_BIN=PATH; implies --no-build)
  --destdir DIR    stage everything under DIR (same as DESTDIR=DIR; implies --no-user and
                   touches neither systemd nor sysctls)
  --no-user        do not create the actrix user and group
  --no-enable      do not reload systemd nor enable the service
  -h, --help       this text
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DESTDIR=${DESTDIR:-}
ACTRIX_BIN=${ACTRIX_BIN:-}
BUILD=1
CREATE_USER=1
ENABLE=1

while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --bin) [ $# -ge 2 ] || { usage >&2; exit 2; }; ACTRIX_BIN=$2; shift ;;
    --bin=*) ACTRIX_BIN=${1#--bin=} ;;
    --destdir) [ $# -ge 2 ] || { usage >&2; exit 2; }; DESTDIR=$2; shift ;;
    --destdir=*) DESTDIR=${1#--destdir=} ;;
    --no-user) CREATE_USER=0 ;;
    --no-enable) ENABLE=0 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install: unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

SVC_USER=actrix
SVC_GROUP=actrix
BINDIR=/usr/local/bin
CONFDIR=/etc/actrix
DATADIR=/var/lib/actrix
UNIT=/etc/systemd/system/actrix.service
SYSCTL_FILE=/etc/sysctl.d/60-actrix.conf
EXAMPLE=$REPO/relay/actrix.example.toml
UNIT_TEMPLATE=$REPO/scripts/actrix.service

say() { printf 'install: %s\n' "$*"; }
warn() { printf 'install: warning: %s\n' "$*" >&2; }
die() { printf 'install: error: %s\n' "$*" >&2; exit 1; }

if [ -n "$DESTDIR" ]; then
  mkdir -p "$DESTDIR"
  DESTDIR=$(cd "$DESTDIR" && pwd)
  [ "$DESTDIR" != / ] || DESTDIR=
fi
if [ -n "$DESTDIR" ]; then
  CREATE_USER=0
  ENABLE=0
  REAL=0
else
  REAL=1
  [ "$(id -u)" -eq 0 ] || die "a real install needs root (or use --destdir DIR)"
fi
[ -f "$EXAMPLE" ] || die "missing $EXAMPLE"
[ -f "$UNIT_TEMPLATE" ] || die "missing $UNIT_TEMPLATE"

# ------------------------------------------------------------------------------ helpers

# put_file SRC DEST MODE: copy SRC to DEST (atomically) with MODE; say what changed.
put_file() {
  local src=$1 dest=$2 mode=$3 tmp
  mkdir -p "$(dirname "$dest")"
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    chmod "$mode" "$dest"
    say "unchanged $dest"
    return
  fi
  local verb=installed
  [ -e "$dest" ] && verb=updated
  tmp=$(mktemp "$dest.XXXXXX")
  cat "$src" >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
  say "$verb $dest"
}

# toml_get SECTION KEY FILE: the raw value of KEY in [SECTION] (quotes removed), or nothing.
toml_get() {
  awk -v want="$1" -v key="$2" '
    /^[ \t]*\[/ { s = $0; sub(/^[ \t]*\[[ \t]*/, "", s); sub(/[ \t]*\].*$/, "", s); sec = s; next }
    sec == want && $0 ~ "^[ \t]*" key "[ \t]*=" {
      v = $0; sub(/^[^=]*=[ \t]*/, "", v); sub(/[ \t]+#.*$/, "", v); gsub(/"/, "", v)
      print v; exit
    }' "$3"
}

# render_config EXAMPLE: the example with node.data_dir and ks.shared_key_file set.
render_config() {
  awk -v datadir="$DATADIR" -v keyfile="$CONFDIR/shared_key" '
    { line[NR] = $0 }
    /^[ \t]*\[/ {
      s = $0; sub(/^[ \t]*\[[ \t]*/, "", s); sub(/[ \t]*\].*$/, "", s); sec = s; head[sec] = NR
    }
    sec == "node" && !dd && $0 ~ /^[ \t]*#?[ \t]*data_dir[ \t]*=/ { dd = NR }
    sec == "ks" && !kf && $0 ~ /^[ \t]*#?[ \t]*shared_key_file[ \t]*=/ { kf = NR }
    END {
      ddl = "data_dir = \"" datadir "\""
      kfl = "shared_key_file = \"" keyfile "\""
      print "# Written by scripts/install.sh from relay/actrix.example.toml; edit freely, reinstalling keeps it."
      for (i = 1; i <= NR; i++) {
        if (i == dd) { print ddl; continue }
        if (i == kf) { print kfl; continue }
        print line[i]
        if (!dd && ("node" in head) && i == head["node"]) print ddl
        if (!kf && ("ks" in head) && i == head["ks"]) print kfl
      }
      if (!("node" in head)) { print ""; print "[node]"; print ddl }
      if (!("ks" in head)) { print ""; print "[ks]"; print kfl }
    }' "$1"
}

# The sysctl drop-in body from `actrix tune` (dry run) output on stdin.
extract_sysctl() {
  awk -v marker="# would write $SYSCTL_FILE:" '
    $0 == marker { on = 1; next }
    on && ($0 ~ /^# would write \// || $0 ~ /^[0-9]+ difference\(s\) from the plan:$/ ||
           $0 == "the host matches the plan" || $0 ~ /^dry run:/) { on = 0 }
    on {
      if ($0 == "") { blanks++; next }
      for (; blanks > 0; blanks--) print ""
      print
    }'
}

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

# ------------------------------------------------------------------------------ binary

if [ -z "$ACTRIX_BIN" ]; then
  ACTRIX_BIN=$REPO/target/release/actrix
  if [ "$BUILD" -eq 1 ]; then
    cargo_cmd=(cargo)
    if ! command -v cargo >/dev/null 2>&1; then
      for c in "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ${SUDO_USER:+"$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo"}; do
        if [ -x "$c" ]; then cargo_cmd=("$c"); break; fi
      done
    fi
    if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
      # Build as the invoking user, so target/ does not become root's.
      cargo_cmd=(sudo -u "$SUDO_USER" -H "${cargo_cmd[@]}")
    fi
    say "building: ${cargo_cmd[*]} build --release -p actrix"
    (cd "$REPO" && "${cargo_cmd[@]}" build --release -p actrix)
  fi
fi
[ -x "$ACTRIX_BIN" ] || die "no executable at $ACTRIX_BIN (build it with cargo build --release -p actrix, or pass --bin)"
"$ACTRIX_BIN" --version >/dev/null 2>&1 || die "$ACTRIX_BIN --version failed"
say "binary $ACTRIX_BIN ($("$ACTRIX_BIN" --version))"

# ------------------------------------------------------------------------------ user

have_user() { getent passwd "$SVC_USER" >/dev/null 2>&1; }
if [ "$CREATE_USER" -eq 1 ]; then
  if have_user; then
    say "user $SVC_USER exists"
  else
    nologin=/usr/sbin/nologin
    [ -x "$nologin" ] || nologin=/sbin/nologin
    [ -x "$nologin" ] || nologin=/bin/false
    group_opt=(--user-group)
    if getent group "$SVC_GROUP" >/dev/null 2>&1; then group_opt=(--gid "$SVC_GROUP"); fi
    useradd --system "${group_opt[@]}" --home-dir "$DATADIR" --no-create-home \
      --shell "$nologin" --comment "actrix relay appliance" "$SVC_USER"
    say "created system user and group $SVC_USER"
  fi
fi
# Ownership is set on a real install when the user exists; a staged tree (DESTDIR) is left to
# the packager.
OWN=0
if [ "$REAL" -eq 1 ] && have_user; then OWN=1; fi
own() { if [ "$OWN" -eq 1 ]; then chown "$1" "$2"; fi; }

# ------------------------------------------------------------------------------ files

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

put_file "$ACTRIX_BIN" "$DESTDIR$BINDIR/actrix" 0755
BIN=$DESTDIR$BINDIR/actrix

mkdir -p "$DESTDIR$CONFDIR"
chmod 0750 "$DESTDIR$CONFDIR"
own "root:$SVC_GROUP" "$DESTDIR$CONFDIR"

put_file "$EXAMPLE" "$DESTDIR$CONFDIR/actrix.example.toml" 0644

CONF=$DESTDIR$CONFDIR/actrix.toml
if [ -e "$CONF" ]; then
  say "kept existing $CONF"
  if ! out=$("$BIN" check -c "$CONF" 2>&1); then
    warn "your $CONF does not validate; the service will not start until it does:"
    printf '%s\n' "$out" >&2
  fi
else
  render_config "$EXAMPLE" >"$work/actrix.toml"
  if ! out=$("$BIN" check -c "$work/actrix.toml" 2>&1); then
    printf '%s\n' "$out" >&2
    die "the configuration made from $EXAMPLE does not validate"
  fi
  put_file "$work/actrix.toml" "$CONF" 0640
fi
own "root:$SVC_GROUP" "$CONF"

KEY=$DESTDIR$CONFDIR/shared_key
if [ -s "$KEY" ]; then
  say "kept existing $KEY"
else
  # 64 hex characters: long enough, and never a placeholder-looking word.
  (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$KEY.tmp" && mv -f "$KEY.tmp" "$KEY")
  say "generated $KEY"
fi
chmod 0600 "$KEY"
own "$SVC_USER:$SVC_GROUP" "$KEY"

mkdir -p "$DESTDIR$DATADIR"
chmod 0750 "$DESTDIR$DATADIR"
own "$SVC_USER:$SVC_GROUP" "$DESTDIR$DATADIR"
say "data directory $DESTDIR$DATADIR (0750)"

# The unit, with the stop timeout = drain grace + 10 s.
grace=$(toml_get turn shutdown_grace_secs "$CONF")
case "$grace" in '' | *[!0-9]*) grace=30 ;; esac
sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@DATADIR@|$DATADIR|g" \
  -e "s|@USER@|$SVC_USER|g" -e "s|@GROUP@|$SVC_GROUP|g" \
  -e "s|@TIMEOUT_STOP_SEC@|$((grace + 10))s|g" "$UNIT_TEMPLATE" >"$work/actrix.service"
if grep -q '@[A-Z_]*@' "$work/actrix.service"; then die "unit template has an unknown placeholder"; fi
put_file "$work/actrix.service" "$DESTDIR$UNIT" 0644

# The sysctl drop-in `actrix tune` plans for this host (a dry run: it changes nothing).
tune_args=(tune --root /)
ports=$(toml_get turn relay_port_range "$CONF")
case "$ports" in [0-9]*-[0-9]*) tune_args+=(--relay-ports "$ports") ;; esac
listen=$(toml_get stun listen "$CONF" | tr -d '[] ' | cut -d, -f1)
listen_ip=${listen%:*}
case "$listen_ip" in
  '' | 127.* | ::1 | 0.0.0.0 | ::) ;; # loopback or wildcard: tune uses the default-route NIC
  *[!0-9.]*) ;;                       # not a plain IPv4 address
  *) tune_args+=(--listen "$listen_ip") ;;
esac
if tune_out=$("$BIN" "${tune_args[@]}" 2>&1); then
  printf '%s\n' "$tune_out" | extract_sysctl >"$work/60-actrix.conf"
  if head -n1 "$work/60-actrix.conf" | grep -q "^# $SYSCTL_FILE" &&
    grep -Eq '^[a-z0-9_.]+ = ' "$work/60-actrix.conf"; then
    put_file "$work/60-actrix.conf" "$DESTDIR$SYSCTL_FILE" 0644
    if [ "$REAL" -eq 1 ]; then
      if sysctl --system >/dev/null 2>"$work/sysctl.err"; then
        say "applied sysctls (sysctl --system)"
      else
        warn "sysctl --system reported problems (containers refuse some keys):"
        cat "$work/sysctl.err" >&2
      fi
    fi
  else
    warn "could not find the sysctl drop-in in the output of actrix ${tune_args[*]}; skipped $SYSCTL_FILE"
  fi
else
  warn "actrix ${tune_args[*]} failed; skipped $SYSCTL_FILE:"
  printf '%s\n' "$tune_out" >&2
fi

# ------------------------------------------------------------------------------ systemd

if [ "$ENABLE" -eq 1 ]; then
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable actrix.service >/dev/null 2>&1 || die "systemctl enable actrix failed"
    if systemctl is-active --quiet actrix.service; then
      say "systemd reloaded; actrix.service is running the old binary: systemctl restart actrix (it drains first)"
    else
      say "systemd reloaded; actrix.service enabled (not started)"
    fi
  else
    say "systemd is not running here: run 'systemctl daemon-reload && systemctl enable actrix' on boot"
  fi
fi

say "done."
if [ "$REAL" -eq 1 ]; then
  cat <<EOF
next steps:
  1. edit $CONFDIR/actrix.toml: stun.listen, turn.relay_addresses (and advertised_addresses
     behind 1:1 NAT), users or rest_secrets, http.listen; check it with
     actrix check -c $CONFDIR/actrix.toml
  2. actrix tune   (core pinning and IRQ affinity for this host; --apply to change it)
  3. systemctl start actrix && journalctl -u actrix -f
EOF
else
  if [ "$CREATE_USER" -eq 0 ] && [ -n "$DESTDIR" ]; then
    say "staged under $DESTDIR; on the target, create user $SVC_USER and chown $DATADIR and $CONFDIR/shared_key to it"
  fi
fi
