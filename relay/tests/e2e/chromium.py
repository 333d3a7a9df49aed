"""Headless Chromium for the browser tests: two network namespaces joined by a veth pair, the
browser driven over the DevTools protocol on a pipe, and a test PKI (a CA made with openssl,
server certificates it issues, and an NSS database that makes Chromium trust it).

Chromium gathers no candidates on a host with only loopback, so the appliance and the browser
run in namespaces of their own (10.213.0.1 and 10.213.0.2, addresses that exist only there).
The browser is driven over --remote-debugging-pipe: no port, no WebSocket client.

Certificates: Chromium on Linux takes its trust anchors from the system's and from the NSS
database in $HOME/.pki/nssdb. Each browser here gets a HOME of its own whose database trusts
exactly what the test says (a test CA, or one self-signed server certificate as a trusted
peer), so `turns:` connections are verified as in production: chain, validity, name, key
usage. Nothing is switched off (no --ignore-certificate-errors).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import sh

SERVER_IP = "10.213.0.1"
BROWSER_IP = "10.213.0.2"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


# ------------------------------------------------------------------------------------------
# Two namespaces joined by a veth pair
# ------------------------------------------------------------------------------------------


class BrowserNet:
    """`server` (10.213.0.1, runs the appliance) and `browser` (10.213.0.2, runs Chromium)."""

    def __init__(self, tag: str = "diag"):
        self.server = f"actrix-{tag}-{os.getpid()}"
        self.browser = f"actrix-{tag}-{os.getpid()}-b"

    def setup(self) -> "BrowserNet":
        s, b = self.server, self.browser
        self.cleanup()
        sh("ip", "netns", "add", s)
        sh("ip", "netns", "add", b)
        for ns in (s, b):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # IPv4 only: keeps the candidate list to what the test looks at.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", s, "link", "add", "dg0", "type", "veth", "peer", "name", "dg1", "netns", b)
        sh("ip", "-n", s, "addr", "add", f"{SERVER_IP}/24", "dev", "dg0")
        sh("ip", "-n", b, "addr", "add", f"{BROWSER_IP}/24", "dev", "dg1")
        sh("ip", "-n", s, "link", "set", "dg0", "up")
        sh("ip", "-n", b, "link", "set", "dg1", "up")
        # A default route, as on any real client (the browser looks for one).
        sh("ip", "-n", b, "route", "add", "default", "via", SERVER_IP)
        return self

    def cleanup(self) -> None:
        for ns in (self.browser, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def browser_net(request, tag: str) -> BrowserNet:
    """A set-up BrowserNet, deleted at the end of the test (the test is skipped where
    namespaces cannot be made)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    net = BrowserNet(tag)
    request.addfinalizer(net.cleanup)
    try:
        net.setup()
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"cannot create network namespaces with a veth pair here: {e}")
    return net


# ------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol on a pipe
# ------------------------------------------------------------------------------------------


class Browser:
    """Headless Chromium in the browser namespace; commands go over fds 3 (in) and 4 (out) as
    NUL-terminated JSON (--remote-debugging-pipe). `args` are extra command-line switches;
    `home` is the HOME it runs with (its NSS database is `home/.pki/nssdb`), a fresh empty
    one next to the profile by default."""

    def __init__(self, binary: str, netns: str, profile: Path, args: tuple[str, ...] = (),
                 home: Path | None = None):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        # Move the child's ends above 9 first, so placing them at 3 and 4 cannot clobber one
        # with the other; bash does the placing right before it execs Chromium.
        hi_r = fcntl.fcntl(to_r, fcntl.F_DUPFD_CLOEXEC, 10)
        hi_w = fcntl.fcntl(from_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_r)
        os.close(from_w)
        to_r, from_w = hi_r, hi_w
        # The namespace has no DNS server: a resolver that asks the host's nameserver (which
        # it cannot reach) waits for timeouts, which Chromium does for some lookups even of
        # names --host-resolver-rules maps (13 s before a turns: connection here). Pointed
        # at its own loopback, where nothing listens, a query fails at once. `ip netns exec`
        # runs the command in a mount namespace of its own, so the bind mount stays there.
        resolv = profile.parent / f"{profile.name}-resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")
        place = (
            f'mount --bind "{resolv}" /etc/resolv.conf || echo "resolv.conf not replaced" >&2; '
            f'exec 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-; exec "$@"'
        )

        if home is None:
            home = profile.parent / f"{profile.name}-home"
            home.mkdir(exist_ok=True)
        env = dict(os.environ, HOME=str(home))
        self.log = profile.parent / f"{profile.name}.log"
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                "ip", "netns", "exec", netns, "bash", "-c", place, "chromium", binary,
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage",
                "--mute-audio", "--window-size=1200,900",
                f"--user-data-dir={profile}", *args, "--remote-debugging-pipe", "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(to_r, from_w),
            env=env,
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe:\n{self.output()}")
                self._buf += chunk

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def open_page(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Runtime.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.send("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session: str, expr: str, await_promise: bool = False,
                 timeout: float = 30):
        r = self.send(
            "Runtime.evaluate",
            {"expression": expr, "returnByValue": True, "awaitPromise": await_promise},
            session=session,
            timeout=timeout,
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r.get("result", {}).get("value")

    def screenshot(self, session: str, path: Path) -> None:
        import base64

        r = self.send("Page.captureScreenshot", {"format": "png"}, session=session)
        path.write_bytes(base64.b64decode(r["data"]))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._to, self._from):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


def need_chromium() -> str:
    binary = chromium_path()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/deps.sh does it)")
    return binary


# ------------------------------------------------------------------------------------------
# A test PKI and the NSS database that trusts it
# ------------------------------------------------------------------------------------------


def _run(*cmd: str) -> None:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")


class TestCa:
    """A certificate authority made with openssl for one test (P-256, valid two days), and the
    server certificates it issues."""

    __test__ = False  # not a test class

    def __init__(self, directory: Path, name: str = "actrix e2e test CA"):
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cert = self.dir / "ca.pem"
        self.key = self.dir / "ca.key"
        _run(
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
            "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )

    def issue(self, stem: str, dns: list[str], ips: list[str] = ()) -> tuple[Path, Path]:
        """A server certificate for `dns` and `ips`; returns (chain PEM: the certificate then
        the CA's, key PEM)."""
        key, csr = self.dir / f"{stem}.key", self.dir / f"{stem}.csr"
        leaf, chain, ext = (self.dir / f"{stem}{s}" for s in (".pem", "-chain.pem", ".ext"))
        san = ",".join([f"DNS:{n}" for n in dns] + [f"IP:{a}" for a in ips])
        ext.write_text(
            f"subjectAltName={san}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
        )
        _run(
            "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={(dns or ips)[0]}",
        )
        _run(
            "openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.cert),
            "-CAkey", str(self.key), "-CAcreateserial", "-out", str(leaf), "-days", "2",
            "-extfile", str(ext),
        )
        chain.write_text(leaf.read_text() + self.cert.read_text())
        return chain, key


def nss_home(home: Path, trusted: list[tuple[Path, str]]) -> Path:
    """A HOME whose NSS database (home/.pki/nssdb, where Chromium on Linux looks) trusts each
    (certificate PEM, NSS trust flags) of `trusted`: "C,," a CA that issues TLS servers,
    "P,," a server certificate trusted as itself (a self-signed one)."""
    if shutil.which("certutil") is None:
        pytest.skip("certutil is not installed (apt-get install libnss3-tools; scripts/deps.sh does it)")
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True, exist_ok=True)
    _run("certutil", "-d", f"sql:{db}", "-N", "--empty-password")
    for i, (cert, trust) in enumerate(trusted):
        _run("certutil", "-d", f"sql:{db}", "-A", "-n", f"actrix-e2e-{i}", "-t", trust,
             "-i", str(cert))
    return home
