//! Helpers for integration tests that run the real `actrix` binary on loopback.
#![allow(dead_code)]

use actrix_proto::stun::{self, attr, method, Class, Message, MessageWriter};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running appliance; killed on drop.
pub struct Appliance {
    pub child: Child,
    pub stun: SocketAddr,
    pub http: SocketAddr,
    pub dir: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// Log lines printed before "actrix ready".
    pub early_log: Vec<String>,
}

/// How to start the appliance beyond its configuration text.
#[derive(Default)]
pub struct Launch<'a> {
    /// Lines added at the top of a table the base configuration already has (`cores`, `stun`,
    /// `http`), which `extra` cannot repeat.
    pub sections: &'a [(&'a str, &'a str)],
    /// RLIMIT_NOFILE (soft and hard) of the process.
    pub nofile: Option<u64>,
    /// Environment variables of the process.
    pub env: &'a [(&'a str, &'a str)],
    /// A cgroup directory the process joins before it runs (its `cgroup.procs`).
    pub cgroup: Option<&'a Path>,
}

impl Appliance {
    /// Read the log until a line contains `needle` (5 s at most); the lines read, that one
    /// last.
    pub fn wait_log(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(l) = self.log.recv_timeout(Duration::from_millis(100)) {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
        }
        panic!("no log line with {needle:?}; saw {seen:#?}");
    }

    /// Start `actrix run -c <dir>/actrix.toml` with `extra` appended to a loopback config.
    pub fn start(dir: &Path, extra: &str) -> Appliance {
        Self::start_stun(dir, "", extra)
    }

    /// As [`Appliance::start`], with `stun` added to the `[stun]` section (`{port}` in it
    /// stands for the UDP listener's port, e.g. `listen_tcp = ["127.0.0.1:{port}"]`).
    pub fn start_stun(dir: &Path, stun: &str, extra: &str) -> Appliance {
        Self::start_cores(dir, "", stun, extra)
    }

    /// As [`Appliance::start_stun`], with `cores` added to the `[cores]` section (e.g.
    /// `shards = [0, 1]`).
    pub fn start_cores(dir: &Path, cores: &str, stun: &str, extra: &str) -> Appliance {
        Self::launch(
            dir,
            extra,
            Launch {
                sections: &[("cores", cores), ("stun", stun)],
                ..Launch::default()
            },
        )
    }

    /// [`Appliance::start`] with lines added to the base tables (`{port}` in them stands for
    /// the UDP listener's port) and process limits.
    pub fn launch(dir: &Path, extra: &str, how: Launch<'_>) -> Appliance {
        let port = loop {
            // The same port number must be free for TCP too when streams are asked for.
            let p = free_udp_port();
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let http = free_tcp_port();
        // Above the ephemeral range (32768-60999), so the relay range can never contain this or
        // another test's listener port.
        let base = (port as u32 % 20) * 200 + 61000;
        let text = format!(
            "[node]\ndata_dir = \"{}\"\n[cores]\npin = false\n[stun]\nlisten = [\"127.0.0.1:{port}\"]\n[http]\nlisten = \"127.0.0.1:{http}\"\n{extra}\n",
            dir.join("data").display()
        );
        let text = if text.contains("relay_port_range") {
            text
        } else {
            text.replace(
                "[turn]\n",
                &format!("[turn]\nrelay_port_range = \"{}-{}\"\n", base, base + 199),
            )
        };
        let mut text = text;
        for (table, lines) in how.sections {
            let header = format!("[{table}]\n");
            assert!(
                text.contains(&header),
                "no [{table}] in the base configuration"
            );
            let lines = lines.replace("{port}", &port.to_string());
            text = text.replacen(&header, &format!("{header}{lines}\n"), 1);
        }
        let cfg = dir.join("actrix.toml");
        std::fs::write(&cfg, text).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_actrix"));
        cmd.args(["run", "-c"])
            .arg(&cfg)
            .env("ACTRIX_LOG", "info")
            .envs(how.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let nofile = how.nofile;
        let procs = how.cgroup.map(|d| {
            std::ffi::CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes())
                .unwrap()
        });
        if nofile.is_some() || procs.is_some() {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls (setrlimit, open, write, close) run between
            // fork and exec, on memory allocated before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(n) = nofile {
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    if let Some(p) = &procs {
                        // "0": the writing process itself.
                        let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(fd);
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start actrix");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.contains("actrix ready") => break,
                Ok(l) => seen.push(l),
                Err(_) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        while let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                            seen.push(l);
                        }
                        panic!("actrix exited early: {st}\n{}", seen.join("\n"));
                    }
                }
            }
            assert!(Instant::now() < deadline, "actrix did not become ready");
        }
        Appliance {
            child,
            stun: SocketAddr::from(([127, 0, 0, 1], port)),
            http: SocketAddr::from(([127, 0, 0, 1], http)),
            dir: dir.to_path_buf(),
            log: rx,
            early_log: seen,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test client knows to sign its requests, and the requests it builds.
pub struct Creds {
    pub username: Vec<u8>,
    pub key: [u8; 16],
    pub realm: Vec<u8>,
    pub nonce: Vec<u8>,
    tid: u32,
}

impl Creds {
    pub fn new(username: &[u8], password: &[u8], realm: &str) -> Self {
        Creds {
            username: username.to_vec(),
            key: stun::long_term_key_md5(username, realm.as_bytes(), password),
            realm: realm.as_bytes().to_vec(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut t = [0x5A; 12];
        t[8..].copy_from_slice(&self.tid.to_be_bytes());
        t
    }

    pub fn build(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], auth: bool) -> ([u8; 12], Vec<u8>) {
        let tid = self.next_tid();
        let mut buf = vec![0u8; 2048];
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, &tid).unwrap();
        for (t, v) in attrs {
            w.add(*t, v).unwrap();
        }
        if auth {
            w.add(attr::USERNAME, &self.username).unwrap();
            w.add(attr::REALM, &self.realm).unwrap();
            w.add(attr::NONCE, &self.nonce).unwrap();
            w.add_integrity(&self.key).unwrap();
        }
        w.add_fingerprint().unwrap();
        let n = w.finish();
        buf.truncate(n);
        (tid, buf)
    }

    /// An authenticated request with `attrs` and, when given, an XOR-PEER-ADDRESS (whose
    /// encoding depends on the transaction id, hence built here).
    pub fn signed(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: Option<SocketAddr>,
    ) -> ([u8; 12], Vec<u8>) {
        let tid = self.next_tid();
        let mut buf = vec![0u8; 2048];
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, &tid).unwrap();
        for (t, v) in attrs {
            w.add(*t, v).unwrap();
        }
        if let Some(p) = peer {
            let mut v = [0u8; 20];
            let n = stun::encode_xor_addr(p, &tid, &mut v);
            w.add(attr::XOR_PEER_ADDRESS, &v[..n]).unwrap();
        }
        w.add(attr::USERNAME, &self.username).unwrap();
        w.add(attr::REALM, &self.realm).unwrap();
        w.add(attr::NONCE, &self.nonce).unwrap();
        w.add_integrity(&self.key).unwrap();
        let n = w.finish();
        buf.truncate(n);
        (tid, buf)
    }
}

/// A minimal blocking TURN client over UDP built on the appliance's own codec.
pub struct TurnClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub creds: Creds,
}

impl std::ops::Deref for TurnClient {
    type Target = Creds;
    fn deref(&self) -> &Creds {
        &self.creds
    }
}

impl std::ops::DerefMut for TurnClient {
    fn deref_mut(&mut self) -> &mut Creds {
        &mut self.creds
    }
}

pub struct Reply {
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("reply parses")
    }
    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        m.get(attr::ERROR_CODE)
            .and_then(stun::decode_error_code)
            .map(|(c, _)| c)
    }
}

impl TurnClient {
    pub fn new(server: SocketAddr, username: &[u8], password: &[u8], realm: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        TurnClient {
            sock,
            server,
            creds: Creds::new(username, password, realm),
        }
    }

    /// Send the request `bytes` (as built by [`TurnClient::signed`]) and expect a success.
    #[allow(dead_code)]
    pub fn expect_ok(&self, bytes: &[u8]) {
        let m = Message::parse(bytes).unwrap();
        let r = self.transact(m.transaction_id(), bytes, 3).expect("answer");
        assert_eq!(r.code(), None);
    }

    /// Allocate (expecting success) and return the relayed address.
    #[allow(dead_code)]
    pub fn allocate_relayed(&mut self) -> SocketAddr {
        let r = self.allocate(3).expect("allocate answered");
        assert_eq!(r.code(), None);
        r.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS")
            .expect("valid address")
    }

    /// Send `bytes` up to `tries` times until a response with `tid` arrives.
    pub fn transact(&self, tid: &[u8; 12], bytes: &[u8], tries: usize) -> Option<Reply> {
        let mut buf = [0u8; 2048];
        for _ in 0..tries {
            self.sock.send_to(bytes, self.server).unwrap();
            let until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < until {
                if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                    if let Ok(m) = Message::parse(&buf[..n]) {
                        if m.transaction_id() == tid {
                            return Some(Reply {
                                bytes: buf[..n].to_vec(),
                            });
                        }
                    }
                }
            }
        }
        None
    }

    /// Authenticated request with the 401 round trip when there is no nonce yet.
    pub fn call(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], tries: usize) -> Option<Reply> {
        if self.nonce.is_empty() {
            let (tid, bytes) = self.build(m, attrs, false);
            let r = self.transact(&tid, &bytes, 3)?;
            assert_eq!(r.code(), Some(401));
            self.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        }
        let (tid, bytes) = self.build(m, attrs, true);
        self.transact(&tid, &bytes, tries)
    }

    pub fn allocate(&mut self, tries: usize) -> Option<Reply> {
        self.call(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
            tries,
        )
    }
}

/// A blocking TURN client over a stream (TCP; TLS through `connect_tls`), framing messages
/// with the appliance's own stream framer.
#[allow(dead_code)]
pub struct StreamClient {
    pub stream: Box<dyn ReadWrite>,
    pub creds: Creds,
    rx: Vec<u8>,
    /// Frames that arrived while waiting for a transaction's answer.
    pub pending: std::collections::VecDeque<Vec<u8>>,
}

/// A byte stream a test client speaks over.
pub trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

impl std::ops::Deref for StreamClient {
    type Target = Creds;
    fn deref(&self) -> &Creds {
        &self.creds
    }
}

impl std::ops::DerefMut for StreamClient {
    fn deref_mut(&mut self) -> &mut Creds {
        &mut self.creds
    }
}

impl StreamClient {
    /// Connect over TCP.
    pub fn connect_tcp(server: SocketAddr, username: &[u8], password: &[u8], realm: &str) -> Self {
        let s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))
            .expect("TCP connect");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s.set_nodelay(true).unwrap();
        Self::over(Box::new(s), username, password, realm)
    }

    pub fn over(stream: Box<dyn ReadWrite>, username: &[u8], password: &[u8], realm: &str) -> Self {
        StreamClient {
            stream,
            creds: Creds::new(username, password, realm),
            rx: Vec::new(),
            pending: Default::default(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
        self.stream.flush().expect("flush");
    }

    /// The next frame (a STUN message or ChannelData without its padding) within `wait`;
    /// `Err(())` when the server closed the stream.
    pub fn recv_frame(&mut self, wait: Duration) -> Result<Option<Vec<u8>>, ()> {
        use actrix_proto::stun::stream::{next, Frame};
        let until = Instant::now() + wait;
        loop {
            match next(&self.rx, 65_600) {
                Frame::Stun(n) => return Ok(Some(self.rx.drain(..n).collect())),
                Frame::ChannelData { len, total } => {
                    let f: Vec<u8> = self.rx[..len].to_vec();
                    self.rx.drain(..total);
                    return Ok(Some(f));
                }
                Frame::Invalid => panic!("the server sent an unframeable stream: {:?}", self.rx),
                Frame::Incomplete(_) => {}
            }
            if Instant::now() >= until {
                return Ok(None);
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(()),
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return Err(()),
            }
        }
    }

    /// Whether the server closes the stream within `wait` (frames meanwhile are discarded).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if self.recv_frame(Duration::from_millis(50)).is_err() {
                return true;
            }
        }
        false
    }

    /// Send `bytes` and wait for the answer with `tid` (other frames are kept in `pending`).
    pub fn transact(&mut self, tid: &[u8; 12], bytes: &[u8]) -> Option<Reply> {
        self.send(bytes);
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            match self.recv_frame(Duration::from_millis(100)) {
                Ok(Some(f)) => match Message::parse(&f) {
                    Ok(m) if m.transaction_id() == tid => return Some(Reply { bytes: f }),
                    _ => self.pending.push_back(f),
                },
                Ok(None) => {}
                Err(()) => return None,
            }
        }
        None
    }

    /// Authenticated request with the 401 round trip when there is no nonce yet.
    pub fn call(&mut self, m: u16, attrs: &[(u16, Vec<u8>)]) -> Option<Reply> {
        if self.nonce.is_empty() {
            let (tid, bytes) = self.build(m, attrs, false);
            let r = self.transact(&tid, &bytes)?;
            assert_eq!(r.code(), Some(401));
            self.creds.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        }
        let (tid, bytes) = self.build(m, attrs, true);
        self.transact(&tid, &bytes)
    }

    /// Send a signed request and expect a success.
    pub fn expect_ok(&mut self, bytes: &[u8]) {
        let tid = *Message::parse(bytes).unwrap().transaction_id();
        let r = self.transact(&tid, bytes).expect("answer");
        assert_eq!(r.code(), None, "success expected");
    }

    /// The stream and the bytes already read from it but not framed (an RFC 6062 data
    /// connection carries raw bytes after its ConnectionBind).
    pub fn into_raw(self) -> (Box<dyn ReadWrite>, Vec<u8>) {
        (self.stream, self.rx)
    }

    /// Allocate (expecting success) and return the relayed address.
    pub fn allocate_relayed(&mut self) -> SocketAddr {
        let r = self
            .call(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
            )
            .expect("allocate answered");
        assert_eq!(r.code(), None);
        r.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS")
            .expect("valid address")
    }
}

/// A TLS client configuration for tests: trusts whatever certificate the server shows (the
/// appliance runs on a self-signed one here) and offers `alpn`.
pub fn tls_client_config(alpn: &[&[u8]]) -> std::sync::Arc<rustls::ClientConfig> {
    tls_client_config_for(alpn, rustls::DEFAULT_VERSIONS)
}

/// A client config that accepts any server certificate, offering `alpn` and only `versions`.
pub fn tls_client_config_for(
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::sync::Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct AnyCert(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(cfg)
}

impl StreamClient {
    /// Connect over TLS (rustls) with `cfg`; the negotiated ALPN protocol, if any, is returned.
    pub fn connect_tls(
        server: SocketAddr,
        cfg: std::sync::Arc<rustls::ClientConfig>,
        username: &[u8],
        password: &[u8],
        realm: &str,
    ) -> (Self, Option<Vec<u8>>) {
        let s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(3))
            .expect("TCP connect");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, name).expect("client");
        let mut s = s;
        let until = Instant::now() + Duration::from_secs(5);
        while conn.is_handshaking() {
            assert!(Instant::now() < until, "TLS handshake timed out");
            match conn.complete_io(&mut s) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("TLS handshake failed: {e}"),
            }
        }
        let alpn = conn.alpn_protocol().map(|p| p.to_vec());
        let stream = rustls::StreamOwned::new(conn, s);
        (
            Self::over(Box::new(stream), username, password, realm),
            alpn,
        )
    }
}
