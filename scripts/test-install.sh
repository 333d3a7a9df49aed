#!/usr/bin/env bash
# Test scripts/install.sh and scripts/uninstall.sh in a temporary DESTDIR with an already
# built binary: every file and mode, the configuration validates (`actrix check`), the staged
# binary starts on the staged configuration and key and stops cleanly, the unit passes
# `systemd-analyze verify`, reinstalling is idempotent and keeps the operator's files, and
# uninstalling (then purging) removes everything. Exits non-zero on any failure.
#
#   scripts/test-install.sh [BINARY]     (default: $ACTRIX_BIN, else target/release/actrix)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN_SRC=${1:-${ACTRIX_BIN:-$REPO/target/release/actrix}}
[ -x "$BIN_SRC" ] || { echo "test-install: no binary at $BIN_SRC (cargo build --release -p actrix)" >&2; exit 1; }

FAILS=0
pass() { printf '  ok   %s\n' "$*"; }
fail() { printf '  FAIL %s\n' "$*"; FAILS=$((FAILS + 1)); }
check() { # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
mode_is() { [ "$(stat -c %a "$1" 2>/dev/null)" = "$2" ]; }
check_mode() { # check_mode PATH MODE KIND(f|d)
  if [ "$3" = d ] && [ ! -d "$1" ]; then fail "$1 is a directory"; return; fi
  if [ "$3" = f ] && [ ! -f "$1" ]; then fail "$1 is a file"; return; fi
  if mode_is "$1" "$2"; then pass "$1 mode $2"; else fail "$1 mode $2 (is $(stat -c %a "$1"))"; fi
}

D=$(mktemp -d /tmp/actrix-install-test.XXXXXX)
LOG=$D.log
PID=
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then kill -KILL "$PID" 2>/dev/null || true; fi
  rm -rf "$D" "$D.run" "$LOG"
}
trap cleanup EXIT

install_sh() { "$REPO/scripts/install.sh" --no-build --bin "$BIN_SRC" --destdir "$D"; }
uninstall_sh() { "$REPO/scripts/uninstall.sh" --destdir "$D" "$@"; }

echo "== shellcheck"
if command -v shellcheck >/dev/null 2>&1; then
  check "shellcheck install.sh uninstall.sh test-install.sh" \
    shellcheck "$REPO/scripts/install.sh" "$REPO/scripts/uninstall.sh" "$REPO/scripts/test-install.sh"
else
  echo "  skip shellcheck is not installed"
fi

echo "== install into $D"
if install_sh >"$LOG" 2>&1; then
  pass "install.sh exits 0"
else
  fail "install.sh exits 0"
  cat "$LOG"
  echo "test-install: the install failed; nothing else to check"
  exit 1
fi

BIN=$D/usr/local/bin/actrix
CONF=$D/etc/actrix/actrix.toml
KEY=$D/etc/actrix/shared_key
UNIT=$D/etc/systemd/system/actrix.service
SYSCTL=$D/etc/sysctl.d/60-actrix.conf

check_mode "$BIN" 755 f
check "installed binary is the one given" cmp -s "$BIN" "$BIN_SRC"
check_mode "$D/etc/actrix" 750 d
check_mode "$CONF" 640 f
check_mode "$D/etc/actrix/actrix.example.toml" 644 f
check "example copy equals relay/actrix.example.toml" cmp -s "$D/etc/actrix/actrix.example.toml" "$REPO/relay/actrix.example.toml"
check_mode "$KEY" 600 f
check "shared key is 64 hex characters" grep -Eqx '[0-9a-f]{64}' "$KEY"
check_mode "$D/var/lib/actrix" 750 d
check "data directory is empty" test -z "$(ls -A "$D/var/lib/actrix")"
check_mode "$UNIT" 644 f
check_mode "$SYSCTL" 644 f

# toml_get SECTION KEY FILE
toml_get() {
  awk -v want="$1" -v key="$2" '
    /^[ \t]*\[/ { s = $0; sub(/^[ \t]*\[[ \t]*/, "", s); sub(/[ \t]*\].*$/, "", s); sec = s; next }
    sec == want && $0 ~ "^[ \t]*" key "[ \t]*=" { v = $0; sub(/^[^=]*=[ \t]*/, "", v); print v; exit }' "$3"
}
check "config: node.data_dir = /var/lib/actrix" test "$(toml_get node data_dir "$CONF")" = '"/var/lib/actrix"'
check "config: ks.shared_key_file = /etc/actrix/shared_key" test "$(toml_get ks shared_key_file "$CONF")" = '"/etc/actrix/shared_key"'
check "config: otherwise the example" diff -q <(grep -v -e '^data_dir' -e '^shared_key_file' -e '^# shared_key_file' -e '^# Written by' "$CONF") \
  <(grep -v -e '^data_dir' -e '^shared_key_file' -e '^# shared_key_file' "$REPO/relay/actrix.example.toml")

echo "== actrix check on the installed configuration"
if out=$("$BIN" check -c "$CONF" 2>&1); then pass "actrix check: $out"; else fail "actrix check"; printf '%s\n' "$out"; fi

echo "== unit"
for line in \
  "Type=simple" \
  "User=actrix" \
  "Group=actrix" \
  "ExecStartPre=/usr/local/bin/actrix check -c /etc/actrix/actrix.toml" \
  "ExecStart=/usr/local/bin/actrix run -c /etc/actrix/actrix.toml" \
  "ExecReload=/bin/kill -HUP \$MAINPID" \
  "Restart=on-failure" \
  "KillSignal=SIGTERM" \
  "TimeoutStopSec=40s" \
  "NoNewPrivileges=yes" \
  "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN CAP_SYS_NICE" \
  "AmbientCapabilities=CAP_NET_BIND_SERVICE" \
  "ProtectSystem=strict" \
  "ProtectHome=yes" \
  "PrivateTmp=yes" \
  "ReadWritePaths=/var/lib/actrix" \
  "LimitNOFILE=1048576" \
  "LimitMEMLOCK=infinity" \
  "WantedBy=multi-user.target"; do
  check "unit has $line" grep -qxF "$line" "$UNIT"
done
check "unit has no placeholder left" test -z "$(grep -o '@[A-Z_]*@' "$UNIT" || true)"
if command -v systemd-analyze >/dev/null 2>&1; then
  # Verify a copy whose binary path points into DESTDIR (verify checks that it exists).
  mkdir -p "$D.run"
  sed "s|/usr/local/bin/actrix|$BIN|g" "$UNIT" >"$D.run/actrix.service"
  if out=$(cd "$D.run" && systemd-analyze verify "$D.run/actrix.service" 2>&1) && [ -z "$out" ]; then
    pass "systemd-analyze verify: clean"
  else
    fail "systemd-analyze verify"
    printf '%s\n' "$out"
  fi
  if exposure=$(systemd-analyze security --offline=true "$UNIT" 2>/dev/null | grep -o 'Overall exposure level.*'); then
    pass "systemd-analyze security: $exposure"
  fi
else
  echo "  skip systemd-analyze is not installed"
fi

echo "== sysctl drop-in"
check "starts with the header actrix tune writes" grep -q '^# /etc/sysctl.d/60-actrix.conf, written by .actrix tune.' "$SYSCTL"
nkeys=0
while IFS= read -r l; do
  case "$l" in '' | '#'*) continue ;; esac
  key=${l%% = *}
  if [ "$key" = "$l" ] || [ ! -e "/proc/sys/${key//./\/}" ]; then
    fail "sysctl line is a known 'key = value': $l"
  fi
  nkeys=$((nkeys + 1))
done <"$SYSCTL"
check "sysctl drop-in has settings ($nkeys)" test "$nkeys" -gt 0

echo "== the staged binary runs on the staged configuration and key"
# The same file with paths moved into DESTDIR, loopback ports and no pinning.
toml_set() { # toml_set SECTION KEY VALUE FILE
  awk -v want="$1" -v key="$2" -v val="$3" '
    /^[ \t]*\[/ { s = $0; sub(/^[ \t]*\[[ \t]*/, "", s); sub(/[ \t]*\].*$/, "", s); sec = s }
    sec == want && !done && $0 ~ "^[ \t]*" key "[ \t]*=" { print key " = " val; done = 1; next }
    { print }' "$4" >"$4.new" && mv "$4.new" "$4"
}
ready=0
for attempt in 1 2 3 4 5; do
  stun_port=$((20000 + RANDOM % 10000))
  http_port=$((20000 + RANDOM % 10000))
  [ "$stun_port" != "$http_port" ] || continue
  RUNCONF=$D.run/actrix.toml
  mkdir -p "$D.run"
  cp "$CONF" "$RUNCONF"
  toml_set node data_dir "\"$D/var/lib/actrix\"" "$RUNCONF"
  toml_set ks shared_key_file "\"$KEY\"" "$RUNCONF"
  toml_set stun listen "[\"127.0.0.1:$stun_port\"]" "$RUNCONF"
  toml_set http listen "\"127.0.0.1:$http_port\"" "$RUNCONF"
  toml_set cores pin false "$RUNCONF"
  toml_set turn shutdown_grace_secs 2 "$RUNCONF"
  "$BIN" run -c "$RUNCONF" >"$D.run/stdout" 2>"$D.run/stderr" </dev/null &
  PID=$!
  for _ in $(seq 1 200); do
    if grep -q "actrix ready" "$D.run/stderr"; then ready=1; break; fi
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  [ "$ready" -eq 1 ] && break
  kill -KILL "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PID=
  grep -qi "in use" "$D.run/stderr" || break
done
if [ "$ready" -eq 1 ]; then
  pass "actrix run is ready (attempt $attempt)"
  check "it loaded the staged shared key" grep -q "shared key loaded from $KEY" "$D.run/stderr"
  check "it wrote no shared key of its own" test ! -e "$D/var/lib/actrix/shared_key"
  if command -v curl >/dev/null 2>&1; then
    check "GET /healthz answers" curl -fsS -o /dev/null "http://127.0.0.1:$http_port/healthz"
  fi
  if [ -e "$D/var/lib/actrix/kek" ]; then check_mode "$D/var/lib/actrix/kek" 600 f; fi
  if grep -q '^ExecReload=.*-HUP' "$UNIT"; then
    # systemctl reload sends SIGHUP: it must not stop the appliance.
    kill -HUP "$PID"
    sleep 1
    check "SIGHUP (ExecReload) leaves it running" kill -0 "$PID"
  fi
  kill -TERM "$PID" 2>/dev/null || true
  rc=0
  for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$PID" 2>/dev/null; then
    fail "actrix stops within 10 s of SIGTERM"
    kill -KILL "$PID" 2>/dev/null || true
  fi
  wait "$PID" || rc=$?
  PID=
  check "actrix exits 0 after SIGTERM (rc $rc)" test "$rc" -eq 0
else
  fail "actrix run on the staged configuration"
  cat "$D.run/stderr"
fi
rm -rf "$D.run"
rm -f "$D/var/lib/actrix/"* 2>/dev/null || true

echo "== reinstall is idempotent and keeps the operator's files"
key_before=$(cat "$KEY")
echo "# operator edit" >>"$CONF"
conf_before=$(cat "$CONF")
if install_sh >"$LOG" 2>&1; then pass "second install.sh exits 0"; else fail "second install.sh exits 0"; cat "$LOG"; fi
check "it kept the configuration" test "$(cat "$CONF")" = "$conf_before"
check "it kept the shared key" test "$(cat "$KEY")" = "$key_before"
check "it reports the binary unchanged" grep -q "unchanged $BIN" "$LOG"
check "it reports the unit unchanged" grep -q "unchanged $UNIT" "$LOG"
check "it reports the kept configuration" grep -q "kept existing $CONF" "$LOG"
check_mode "$KEY" 600 f
check_mode "$CONF" 640 f

echo "== uninstall (keeps configuration and data)"
mkdir -p "$D/etc/systemd/system/actrix.service.d"
echo "[Service]" >"$D/etc/systemd/system/actrix.service.d/60-actrix-limits.conf"
if uninstall_sh >"$LOG" 2>&1; then pass "uninstall.sh exits 0"; else fail "uninstall.sh exits 0"; cat "$LOG"; fi
for f in "$BIN" "$UNIT" "$SYSCTL" "$D/etc/systemd/system/actrix.service.d"; do
  check "removed $f" test ! -e "$f"
done
check "kept $CONF" test -f "$CONF"
check "kept $KEY" test -f "$KEY"
check "kept $D/var/lib/actrix" test -d "$D/var/lib/actrix"
if uninstall_sh >"$LOG" 2>&1; then pass "uninstall.sh again exits 0"; else fail "uninstall.sh again exits 0"; cat "$LOG"; fi

echo "== uninstall --purge"
if uninstall_sh --purge >"$LOG" 2>&1; then pass "uninstall.sh --purge exits 0"; else fail "uninstall.sh --purge exits 0"; cat "$LOG"; fi
left=$(find "$D" -mindepth 1 2>/dev/null || true)
if [ -z "$left" ]; then pass "DESTDIR is empty"; else fail "DESTDIR is empty; left:"; printf '%s\n' "$left"; fi

echo "== real install (no DESTDIR) in private mount and network namespaces"
# The host is not touched: /etc is a bind-mounted copy, /usr/local and /var/lib are tmpfs,
# sysctl is a shim that records its arguments, there is no systemd, and the network is a
# fresh namespace with only loopback.
if [ "$(id -u)" -ne 0 ] || ! command -v unshare >/dev/null 2>&1; then
  echo "  skip needs root and unshare"
elif ! unshare --mount --net --propagation private true 2>/dev/null; then
  echo "  skip cannot create mount and network namespaces here"
else
  R=$(mktemp -d /tmp/actrix-real-install.XXXXXX)
  cp -a /etc "$R/etc"
  mkdir -p "$R/shim"
  printf '#!/bin/sh\necho "$@" >>%s/sysctl.calls\n' "$R" >"$R/shim/sysctl"
  chmod +x "$R/shim/sysctl"
  cp "$BIN_SRC" "$R/actrix"
  cat >"$R/inner.sh" <<'INNER'
set -u
R=$1 REPO=$2
fails=0
ok() { printf '  ok   %s\n' "$*"; }
no() { printf '  FAIL %s\n' "$*"; fails=$((fails + 1)); }
t() { local w=$1; shift; if "$@"; then ok "$w"; else no "$w"; fi; }
owner_mode() { [ "$(stat -c '%U:%G %a' "$1" 2>/dev/null)" = "$2" ]; }
mount --bind "$R/etc" /etc
mount -t tmpfs tmpfs /usr/local
mount -t tmpfs tmpfs /var/lib
mount -t tmpfs tmpfs /run # no /run/systemd/system: systemd "is not running"
ip link set lo up
export PATH="$R/shim:$PATH"
if getent passwd actrix >/dev/null; then echo "  skip a user actrix exists on this host"; exit 0; fi
t "install.sh (real) exits 0" "$REPO/scripts/install.sh" --bin "$R/actrix" >"$R/install.log" 2>&1 || cat "$R/install.log"
t "created system user actrix" sh -c 'getent passwd actrix >/dev/null'
t "user actrix is a system account with no login shell" sh -c '[ "$(getent passwd actrix | cut -d: -f3)" -lt 1000 ] && getent passwd actrix | grep -q nologin'
t "/etc/actrix root:actrix 750" owner_mode /etc/actrix "root:actrix 750"
t "/etc/actrix/actrix.toml root:actrix 640" owner_mode /etc/actrix/actrix.toml "root:actrix 640"
t "/etc/actrix/shared_key actrix:actrix 600" owner_mode /etc/actrix/shared_key "actrix:actrix 600"
t "/var/lib/actrix actrix:actrix 750" owner_mode /var/lib/actrix "actrix:actrix 750"
t "/usr/local/bin/actrix root:root 755" owner_mode /usr/local/bin/actrix "root:root 755"
t "sysctl --system was run" grep -qx -- "--system" "$R/sysctl.calls"
t "no systemd: said so instead of enabling" grep -q "systemd is not running" "$R/install.log"
# What systemd does: ExecStartPre and ExecStart as User=actrix.
t "ExecStartPre as actrix: actrix check" sh -c 'setpriv --reuid=actrix --regid=actrix --init-groups -- /usr/local/bin/actrix check -c /etc/actrix/actrix.toml >/dev/null'
# setpriv execs (no fork), so $! is the appliance itself, as MAINPID is for systemd.
setpriv --reuid=actrix --regid=actrix --init-groups -- /usr/local/bin/actrix run -c /etc/actrix/actrix.toml >"$R/run.out" 2>"$R/run.err" </dev/null &
pid=$!
trap 'kill -KILL "$pid" 2>/dev/null' EXIT
ready=0
for _ in $(seq 1 200); do
  if grep -q "actrix ready" "$R/run.err"; then ready=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if [ "$ready" -eq 1 ]; then
  ok "ExecStart as actrix: ready on the installed configuration"
  t "the service user wrote its KEK into /var/lib/actrix (0600)" owner_mode /var/lib/actrix/kek "actrix:actrix 600"
  kill -TERM "$pid"
  rc=0
  wait "$pid" || rc=$?
  t "it stops with 0 on SIGTERM (rc $rc)" test "$rc" -eq 0
  [ "$rc" -eq 0 ] || tail -n 20 "$R/run.err"
else
  no "ExecStart as actrix"
  cat "$R/run.err"
  kill -KILL "$pid" 2>/dev/null
fi
t "install.sh again (idempotent) exits 0" "$REPO/scripts/install.sh" --bin "$R/actrix" >"$R/install2.log" 2>&1 || cat "$R/install2.log"
t "  and keeps the key's owner" owner_mode /etc/actrix/shared_key "actrix:actrix 600"
t "uninstall.sh (real) exits 0" "$REPO/scripts/uninstall.sh" >"$R/uninstall.log" 2>&1 || cat "$R/uninstall.log"
t "  removed the binary, unit and sysctl drop-in" sh -c '! test -e /usr/local/bin/actrix && ! test -e /etc/systemd/system/actrix.service && ! test -e /etc/sysctl.d/60-actrix.conf'
t "  kept /etc/actrix, /var/lib/actrix and the user" sh -c 'test -f /etc/actrix/actrix.toml && test -d /var/lib/actrix && getent passwd actrix >/dev/null'
t "uninstall.sh --purge exits 0" "$REPO/scripts/uninstall.sh" --purge >"$R/purge.log" 2>&1 || cat "$R/purge.log"
t "  deleted /etc/actrix, /var/lib/actrix, the user and the group" sh -c '! test -e /etc/actrix && ! test -e /var/lib/actrix && ! getent passwd actrix >/dev/null && ! getent group actrix >/dev/null'
exit "$fails"
INNER
  rc=0
  unshare --mount --net --propagation private -- bash "$R/inner.sh" "$R" "$REPO" || rc=$?
  if [ "$rc" -ne 0 ]; then
    FAILS=$((FAILS + rc))
  fi
  rm -rf "$R"
fi

echo
if [ "$FAILS" -eq 0 ]; then
  echo "test-install: all checks passed"
else
  echo "test-install: $FAILS check(s) failed"
  exit 1
fi
