"""Shared fixtures of the end-to-end tests: the appliance binary run as a real process, free
ports, configuration files, coturn's test peer, and private network namespaces.

Everything runs on loopback or inside namespaces the tests create and delete themselves.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import turnwire as tw

REPO = Path(__file__).resolve().parents[3]
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rfc5769-vectors.txt"
DEFAULT_BIN = REPO / "target" / "release" / "actrix"

USER = "alice"
PASSWORD = "secret-pass"
REST_SECRET = "0123456789abcdef-rest"
REALM = "actor-rtc.local"


# ------------------------------------------------------------------------------------------
# The binary
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def actrix_bin() -> str:
    path = os.environ.get("ACTRIX_BIN") or str(DEFAULT_BIN)
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"actrix binary not found at {path}: build it with "
            "`cargo build --release -p actrix` or set ACTRIX_BIN"
        )
    return path


# ------------------------------------------------------------------------------------------
# Ports
# ------------------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port that is free for UDP and TCP on `host` right now (never handed out twice)."""
    for _ in range(100):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_STREAM if kind == socket.SOCK_DGRAM else socket.SOCK_DGRAM
        try:
            with socket.socket(fam, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port")


def relay_range(size: int = 200) -> str:
    """A relay port block below the kernel's ephemeral range (so it never overlaps the
    listener ports, which come from binding port 0)."""
    lo = random.randrange(20000, 32000 - size, 2)
    return f"{lo}-{lo + size - 1}"


# ------------------------------------------------------------------------------------------
# Configuration files
# ------------------------------------------------------------------------------------------


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_text(cfg: dict) -> str:
    out = []
    for section, body in cfg.items():
        if not isinstance(body, dict):
            out.append(f"{section} = {toml_value(body)}")
    for section, body in cfg.items():
        if isinstance(body, dict):
            out.append(f"\n[{section}]")
            for k, v in body.items():
                out.append(f"{k} = {toml_value(v)}")
    return "\n".join(out) + "\n"


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def base_config(tmp_path: Path, listen_host: str = "127.0.0.1") -> dict:
    port = free_port(host=listen_host)
    http = free_port(socket.SOCK_STREAM)
    hostport = f"[{listen_host}]:{port}" if ":" in listen_host else f"{listen_host}:{port}"
    return {
        "node": {"id": "e2e", "data_dir": str(tmp_path / "data")},
        "cores": {"pin": False},
        "stun": {"listen": [hostport]},
        "turn": {
            "relay_addresses": ["127.0.0.1"],
            "relay_port_range": relay_range(),
            "users": [{"name": USER, "password": PASSWORD}],
            "rest_secrets": [REST_SECRET],
            "rfc5766_channel_range": True,
            "max_allocations_per_user": 1000,
            "shutdown_grace_secs": 2,
        },
        "http": {"listen": f"127.0.0.1:{http}"},
    }


def write_config(tmp_path: Path, cfg: dict, name: str = "actrix.toml") -> Path:
    p = tmp_path / name
    p.write_text(toml_text(cfg))
    return p


# ------------------------------------------------------------------------------------------
# The appliance process
# ------------------------------------------------------------------------------------------


class Appliance:
    """Runs `actrix run -c FILE` (or without -c), collects stdout and stderr, and stops it.

    Use as a context manager; `overrides` are merged into the base configuration (a value of
    None removes a key).
    """

    def __init__(
        self,
        binary: str,
        tmp_path: Path,
        overrides: dict | None = None,
        *,
        netns: str | None = None,
        embedded: bool = False,
        cwd: Path | None = None,
        listen_host: str = "127.0.0.1",
        tcp: bool = False,
        tls: bool = False,
        dtls: bool = False,
    ):
        self.binary = binary
        self.netns = netns
        self.embedded = embedded
        self.cwd = cwd or tmp_path
        self.proc: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self.stdout_lines: list[str] = []
        self._ready = threading.Event()
        self._threads: list[threading.Thread] = []
        self.returncode: int | None = None
        if embedded:
            self.config = None
            self.config_path = None
            self.port = 3478
            self.host = "127.0.0.1"
            self.http_port = 8080
        else:
            self.config = merge(base_config(tmp_path, listen_host), overrides or {})
            if tcp:
                # TURN over TCP on the same address and port as the UDP listener.
                self.config["stun"]["listen_tcp"] = list(self.config["stun"]["listen"])
            self.tls_port = None
            self.dtls_port = None
            if tls or dtls:
                # TURN over TLS and DTLS on ports of their own, with a self-signed pair made
                # by the binary (one certificate for both, as the configuration has it).
                cert, key = tmp_path / "turn-cert.pem", tmp_path / "turn-key.pem"
                subprocess.run(
                    [binary, "cert", "--self-signed", "--cert", str(cert), "--key", str(key)],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                host = self.config["stun"]["listen"][0].rpartition(":")[0]
                self.config["stun"].update(tls_cert=str(cert), tls_key=str(key))
                if tls:
                    self.tls_port = free_port(socket.SOCK_STREAM, host.strip("[]"))
                    self.config["stun"]["listen_tls"] = [f"{host}:{self.tls_port}"]
                if dtls:
                    self.dtls_port = free_port(socket.SOCK_DGRAM, host.strip("[]"))
                    self.config["stun"]["listen_dtls"] = [f"{host}:{self.dtls_port}"]
            self.config_path = write_config(tmp_path, self.config)
            listen = self.config["stun"]["listen"][0]
            host, _, port = listen.rpartition(":")
            self.host = host.strip("[]")
            self.port = int(port)
            self.http_port = int(self.config["http"]["listen"].rpartition(":")[2])

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def grace(self) -> int:
        if self.config is None:
            return 30
        return int(self.config["turn"].get("shutdown_grace_secs", 30))

    def command(self) -> list[str]:
        cmd = [self.binary, "run"]
        if not self.embedded:
            cmd += ["-c", str(self.config_path)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return cmd

    def _reader(self, stream, sink: list[str], watch: bool):
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            sink.append(line)
            if watch and "actrix ready" in line:
                self._ready.set()
        stream.close()

    def start(self, timeout: float = 20.0) -> "Appliance":
        env = dict(os.environ)
        env.pop("ACTRIX_LOG", None)
        env["NO_COLOR"] = "1"
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        for stream, sink, watch in (
            (self.proc.stderr, self.stderr_lines, True),
            (self.proc.stdout, self.stdout_lines, False),
        ):
            t = threading.Thread(target=self._reader, args=(stream, sink, watch), daemon=True)
            t.start()
            self._threads.append(t)
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._join_readers()
                raise RuntimeError(
                    f"actrix exited with {self.proc.returncode} before it was ready:\n"
                    + self.stderr()
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("actrix was not ready in time:\n" + self.stderr())
        return self

    def _join_readers(self):
        for t in self._threads:
            t.join(timeout=5)

    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout=timeout)
        self._join_readers()
        return self.returncode

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM and wait (grace + 5 s by default); SIGKILL if it does not exit."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout if timeout is not None else self.grace + 5)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self._join_readers()

    def __enter__(self) -> "Appliance":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # A second signal ends the drain at once: the test is over.
            self.signal(signal.SIGTERM)
            time.sleep(0.05)
            if self.proc.poll() is None:
                self.signal(signal.SIGTERM)
            try:
                self.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        else:
            self._join_readers()


@pytest.fixture
def appliance_factory(actrix_bin, tmp_path):
    """appliance_factory(overrides=None, **kw) -> a started Appliance (stopped at teardown)."""
    made: list[Appliance] = []
    counter = [0]

    def make(overrides: dict | None = None, start: bool = True, **kw) -> Appliance:
        counter[0] += 1
        d = tmp_path / f"appliance{counter[0]}"
        d.mkdir()
        a = Appliance(actrix_bin, d, overrides, **kw)
        made.append(a)
        if start:
            a.start()
        return a

    yield make
    for a in made:
        a.__exit__(None, None, None)


@pytest.fixture
def appliance(appliance_factory) -> Appliance:
    """A running appliance with the base configuration (loopback peers allowed)."""
    return appliance_factory({"turn": {"allow_peers": ["127.0.0.0/8"]}})


# ------------------------------------------------------------------------------------------
# Third-party clients
# ------------------------------------------------------------------------------------------


def udp_echo_ok(addr: tuple[str, int], timeout: float = 0.3) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"e2e-probe", addr)
        try:
            d, _ = s.recvfrom(2048)
        except socket.timeout:
            return False
        return d == b"e2e-probe"


@pytest.fixture
def turnutils_peer():
    """Start coturn's UDP echo peer on 127.0.0.1; returns its port."""
    procs: list[subprocess.Popen] = []

    def start() -> int:
        port = free_port()
        p = subprocess.Popen(
            ["turnutils_peer", "-L", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(p)
        deadline = time.monotonic() + 10
        while not udp_echo_ok(("127.0.0.1", port)):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("turnutils_peer did not start")
        return port

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


LOST_RE = re.compile(r"Total lost packets (\d+)")

# uclient opens each TLS connection with an OpenSSL context picked at random among
# TLS_client_method, TLSv1_client_method, TLSv1_1_client_method and TLSv1_2_client_method.
# The appliance speaks TLS 1.2 and 1.3 only (RFC 8996 forbids 1.0 and 1.1), so half of its
# connections would be refused at the handshake: the control connection retries until it
# lands on a modern context, RFC 6062 data connections do not. This preload maps the two
# legacy methods to TLS_client_method, so every connection negotiates TLS 1.2 or 1.3; the
# refusal of a real TLS 1.1 client is tested on its own (test_tls_streams.py). Over DTLS
# (-S without -t) uclient picks DTLSv1_client_method (DTLS 1.0 only, which the appliance does
# not speak either) or DTLSv1_2_client_method; the first is mapped to DTLS_client_method.
MODERN_TLS_SHIM = r"""
typedef struct ssl_method_st SSL_METHOD;
extern const SSL_METHOD *TLS_client_method(void);
extern const SSL_METHOD *DTLS_client_method(void);
const SSL_METHOD *TLSv1_client_method(void) { return TLS_client_method(); }
const SSL_METHOD *TLSv1_1_client_method(void) { return TLS_client_method(); }
const SSL_METHOD *DTLSv1_client_method(void) { return DTLS_client_method(); }
"""
_modern_tls_lib: list[str] = []


def modern_tls_preload() -> str:
    """The shared object of MODERN_TLS_SHIM, built once per test session with gcc."""
    if not _modern_tls_lib:
        out = Path(os.environ.get("TMPDIR", "/tmp")) / f"actrix-modern-tls-{os.getpid()}"
        out.mkdir(exist_ok=True)
        src, lib = out / "shim.c", out / "modern-tls.so"
        src.write_text(MODERN_TLS_SHIM)
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _modern_tls_lib.append(str(lib))
    return _modern_tls_lib[0]


def run_uclient(
    args: list[str], timeout: float = 90, netns: str | None = None
) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run turnutils_uclient (inside `netns` if given); returns the process result and the
    "Total lost packets" count (None when the line is missing, i.e. it never relayed).
    TLS and DTLS runs (-S) get MODERN_TLS_SHIM preloaded."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    env = dict(os.environ)
    if "-S" in args:
        env["LD_PRELOAD"] = modern_tls_preload()
    r = subprocess.run(
        prefix + ["turnutils_uclient"] + args,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    m = LOST_RE.search(r.stdout + r.stderr)
    return r, (int(m.group(1)) if m else None)


# ------------------------------------------------------------------------------------------
# Network namespaces
# ------------------------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str) -> str:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


@contextlib.contextmanager
def in_netns(name: str):
    """Switch the calling thread into network namespace `name`; sockets created inside stay
    there after the switch back."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        try:
            yield
        finally:
            if _libc.setns(orig, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")
    finally:
        os.close(target)
        os.close(orig)


class EgressNamespace:
    """A namespace whose only way out is `d0`, one end of a veth pair whose other end sits in
    a second, empty sink namespace. Default routes (IPv4 and IPv6) point at d0, so any
    datagram toward a non-local address is counted in d0's tx_packets. d0 has ARP off and no
    IPv6 autoconfiguration, so nothing else is sent on it.
    """

    V4 = "10.77.0.1"
    V6 = "fd77::1"

    def __init__(self):
        tag = f"{os.getpid()}-{random.randrange(1 << 30):x}"
        self.name = f"actrix-e2e-{tag}"
        self.sink = f"actrix-e2e-{tag}-sink"
        self.has_v6 = False
        self.no_v6_reason = ""

    def setup(self) -> "EgressNamespace":
        n, s = self.name, self.sink
        sh("ip", "netns", "add", n)
        sh("ip", "netns", "add", s)
        sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "-n", n, "link", "add", "d0", "type", "veth", "peer", "name", "d0p", "netns", s)
        if os.path.exists("/proc/sys/net/ipv6"):
            # No IPv6 autoconfiguration on d0: nothing but our own traffic is sent on it.
            for k, v in (
                ("addr_gen_mode", "1"),
                ("accept_dad", "0"),
                ("router_solicitations", "0"),
                ("accept_ra", "0"),
            ):
                sh("ip", "netns", "exec", n, "sysctl", "-qw", f"net.ipv6.conf.d0.{k}={v}")
            sh("ip", "netns", "exec", s, "sysctl", "-qw", "net.ipv6.conf.d0p.disable_ipv6=1")
        sh("ip", "-n", n, "link", "set", "d0", "arp", "off")
        sh("ip", "-n", n, "link", "set", "d0", "up")
        sh("ip", "-n", s, "link", "set", "d0p", "up")
        sh("ip", "-n", n, "addr", "add", f"{self.V4}/24", "dev", "d0")
        sh("ip", "-n", n, "route", "add", "default", "dev", "d0")
        try:
            sh("ip", "-n", n, "-6", "addr", "add", f"{self.V6}/64", "dev", "d0", "nodad")
            sh("ip", "-n", n, "-6", "route", "add", "default", "dev", "d0")
            self.has_v6 = True
        except RuntimeError as e:
            self.has_v6 = False
            self.no_v6_reason = str(e)
        return self

    def tx_packets(self) -> int:
        out = sh("ip", "-n", self.name, "-s", "-j", "link", "show", "dev", "d0")
        return int(json.loads(out)[0]["stats64"]["tx"]["packets"])

    def settle(self, quiet: float = 1.0, limit: float = 10.0) -> int:
        """Wait until d0's counter has not moved for `quiet` seconds; return it."""
        deadline = time.monotonic() + limit
        last, since = self.tx_packets(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            cur = self.tx_packets()
            if cur != last:
                last, since = cur, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return cur
        raise RuntimeError("d0 never went quiet")

    def cleanup(self) -> None:
        for ns in (self.name, self.sink):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture
def loopback_netns(request) -> str | None:
    """A private namespace with only `lo` up (None when namespaces cannot be made here)."""
    name = f"actrix-e2e-{os.getpid()}-{random.randrange(1 << 30):x}-lo"
    try:
        sh("ip", "netns", "add", name)
    except (RuntimeError, FileNotFoundError):
        return None
    request.addfinalizer(
        lambda: subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
    )
    sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


@pytest.fixture
def egress_netns(request):
    ns = EgressNamespace()
    request.addfinalizer(ns.cleanup)
    try:
        ns.setup()
    except (RuntimeError, FileNotFoundError) as e:
        pytest.skip(f"cannot create a network namespace with a veth pair here: {e}")
    return ns


# ------------------------------------------------------------------------------------------
# Test vectors
# ------------------------------------------------------------------------------------------


def load_vectors(path: Path = VECTORS) -> dict[str, dict[str, str]]:
    blocks: dict[str, dict[str, str]] = {}
    cur = None
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = blocks.setdefault(line[1:-1], {})
            continue
        if cur is not None and " = " in line:
            k, v = line.split(" = ", 1)
            cur[k.strip()] = v.strip()
    return blocks


@pytest.fixture(scope="session")
def vectors() -> dict[str, dict[str, str]]:
    return load_vectors()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def client(app: Appliance, user: str = USER, password: str = PASSWORD, **kw) -> tw.RawTurnClient:
    return tw.RawTurnClient(app.addr, user, password, **kw)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def metrics(app: Appliance) -> dict[str, float]:
    """The appliance's Prometheus text from /metrics, summed over labels other than the ones
    kept in the key: {"name{label=value,...}": value} and {"name": sum}. Read from the
    appliance's HTTP address (127.0.0.1 when it listens on a wildcard), inside its network
    namespace when it runs in one."""
    import urllib.request

    host = "127.0.0.1"
    if app.config is not None:
        listen = app.config["http"]["listen"].rpartition(":")[0]
        if listen.strip("[]") not in ("0.0.0.0", "::"):
            host = listen
    url = f"http://{host}:{app.http_port}/metrics"
    with in_netns(app.netns) if app.netns else contextlib.nullcontext():
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[key] = v
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + v if name != key else v
    return out


def metric_sum(m: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for key, v in m.items():
        base, _, rest = key.partition("{")
        if base == name and rest and all(w in rest for w in want):
            total += v
    return total
