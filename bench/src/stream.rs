//! Client connections over streams for the load generator: STUN and TURN over TCP
//! (RFC 8656 §3.1) and TLS (RFC 7350, rustls), framed as the appliance frames them
//! ([`actrix_proto::stun::stream`]: STUN messages and ChannelData padded to 4 bytes).
//!
//! A [`StreamConn`] is non-blocking and owns its buffers: a receive buffer cut into frames in
//! place, and an outgoing buffer of plaintext not yet written (TCP) or not yet handed to
//! rustls (TLS). The caller waits for readiness with epoll (readable always, writable while
//! [`StreamConn::wants_write`]); nothing here blocks or allocates per frame.
//!
//! The TLS client trusts any certificate and signature (the servers under test run on a
//! self-signed pair) and never resumes a session, so every connection is a full handshake.

use crate::scenario::TlsVersion;
use actrix_proto::stun::stream::{self as framing, Frame};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use socket2::{Domain, Socket, Type};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

/// Bytes of a connection's receive buffer (several of the largest frames).
const RX_CAP: usize = 8192;
/// The largest frame accepted from a server.
pub const MAX_FRAME: usize = 4096;
/// Plaintext the generator lets wait on one connection before it stops queueing more.
pub const OUT_LIMIT: usize = 256 << 10;

/// The ALPN protocol of TURN over TLS (RFC 7443).
pub const ALPN_TURN: &[u8] = b"stun.turn";

/// Accepts whatever the server shows: the bench measures servers on self-signed pairs, and
/// checking signatures would only add the generator's own CPU to the measurement.
#[derive(Debug)]
struct AnyServer(Vec<rustls::SignatureScheme>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

/// The generator's TLS client configuration: only `version`, ALPN "stun.turn", no session
/// resumption (every connection pays a full handshake), any server certificate.
pub fn tls_client_config(version: TlsVersion) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let versions: &[&'static rustls::SupportedProtocolVersion] = match version {
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS12],
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| format!("TLS client configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(schemes)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_TURN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The TCP connect is in progress (wait for writability).
    Connecting,
    /// TLS: the handshake is in progress.
    Handshaking,
    /// Frames flow.
    Open,
}

/// What a read brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Plaintext bytes appended to the receive buffer; `more`: read again, there may be more.
    Data(usize, bool),
    /// Nothing now.
    Nothing,
}

/// Why a connection cannot go on.
#[derive(Debug)]
pub enum StreamError {
    /// The server closed it (end of stream, TLS close_notify, or a reset).
    Closed,
    /// Connect failed, a socket error, a TLS error.
    Io(String),
    /// The server sent bytes that are neither STUN nor ChannelData.
    Garbage,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Closed => f.write_str("closed by the server"),
            StreamError::Io(e) => f.write_str(e),
            StreamError::Garbage => f.write_str("unframeable stream from the server"),
        }
    }
}

/// A descriptor as `Read`/`Write` for rustls (non-blocking, no SIGPIPE).
struct FdIo(RawFd);

impl Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.0, buf)
    }
}

impl Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(self.0, buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // One sendmsg for every record rustls has ready.
        // SAFETY: msghdr over the caller's slices (IoSlice is ABI-compatible with iovec).
        let n = unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            m.msg_iovlen = bufs.len() as _;
            libc::sendmsg(self.0, &m, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a buffer we own, of the length given.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writing from a buffer we own, of the length given.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One client connection to a STUN/TURN server over TCP or TLS.
pub struct StreamConn {
    sock: Socket,
    tls: Option<Box<rustls::ClientConnection>>,
    phase: Phase,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// Plaintext queued by [`StreamConn::queue`] and not yet sent (TCP) or encrypted (TLS).
    out: Vec<u8>,
    out_start: usize,
    pub opened_at: Instant,
    /// When TCP connected (TCP) or the TLS handshake finished (TLS).
    pub established_at: Option<Instant>,
}

impl StreamConn {
    /// Start connecting to `server` from `bind` (its port is chosen at connect time, so many
    /// connections can share a source address), over TLS when `tls` is given.
    pub fn connect(
        server: SocketAddr,
        bind: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> io::Result<StreamConn> {
        let sock = Socket::new(Domain::for_address(server), Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        if !bind.ip().is_unspecified() {
            if bind.is_ipv4() {
                let one: libc::c_int = 1;
                // SAFETY: setsockopt with an int option on our socket. Without it, bind takes
                // an ephemeral port for every destination at once and a source address runs
                // out of ports after ~28k connections (TIME_WAIT included).
                unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        &one as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            sock.bind(&bind.into())?;
        }
        match sock.connect(&server.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let tls = match tls {
            Some(cfg) => Some(Box::new(
                rustls::ClientConnection::new(cfg.clone(), ServerName::from(server.ip()))
                    .map_err(io::Error::other)?,
            )),
            None => None,
        };
        Ok(StreamConn {
            sock,
            tls,
            phase: Phase::Connecting,
            rx: vec![0u8; RX_CAP].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            out: Vec::new(),
            out_start: 0,
            opened_at: Instant::now(),
            established_at: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Plaintext queued and not yet sent or encrypted.
    pub fn pending(&self) -> usize {
        self.out.len() - self.out_start
    }

    /// Queue `bytes` (whole frames) for [`StreamConn::flush`]; false, nothing queued, when
    /// more than [`OUT_LIMIT`] already waits (the server or the socket is not keeping up).
    pub fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.pending() + bytes.len() > OUT_LIMIT {
            return false;
        }
        if self.out_start > 0 && self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        }
        self.out.extend_from_slice(bytes);
        true
    }

    /// Whether the connection waits for writability: connecting, or bytes left unsent.
    pub fn wants_write(&self) -> bool {
        match self.phase {
            Phase::Connecting => true,
            _ => match &self.tls {
                Some(t) => t.wants_write(),
                None => self.pending() > 0,
            },
        }
    }

    /// The socket is writable: finish connecting if that is where it is, then flush.
    pub fn on_writable(&mut self) -> Result<(), StreamError> {
        if self.phase == Phase::Connecting {
            match self.sock.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return Err(StreamError::Io(format!("connect: {e}"))),
            }
            if self.tls.is_some() {
                self.phase = Phase::Handshaking;
            } else {
                self.phase = Phase::Open;
                self.established_at = Some(Instant::now());
            }
        }
        self.flush()
    }

    /// Write what is queued: TCP with one `send`; TLS as one record (once the handshake is
    /// done), then every record rustls holds with one `sendmsg`. What the socket does not
    /// take stays for the next flush.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        if self.phase == Phase::Connecting {
            return Ok(());
        }
        let fd = self.sock.as_raw_fd();
        match self.tls.as_mut() {
            None => {
                while self.out_start < self.out.len() {
                    match send(fd, &self.out[self.out_start..]) {
                        Ok(n) => self.out_start += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(StreamError::Io(format!("send: {e}"))),
                    }
                }
            }
            Some(tls) => {
                if !tls.is_handshaking() && self.out_start < self.out.len() {
                    match tls.writer().write(&self.out[self.out_start..]) {
                        Ok(n) => self.out_start += n,
                        Err(e) => return Err(StreamError::Io(format!("TLS write: {e}"))),
                    }
                }
                while tls.wants_write() {
                    match tls.write_tls(&mut FdIo(fd)) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(StreamError::Io(format!("send: {e}"))),
                    }
                }
            }
        }
        if self.out_start == self.out.len() && self.out_start > 0 {
            self.out.clear();
            self.out_start = 0;
        }
        Ok(())
    }

    /// Read once from the socket into the receive buffer (TLS: records in, plaintext out).
    /// Take the frames with [`StreamConn::next_frame`] before reading again.
    pub fn fill(&mut self) -> Result<Fill, StreamError> {
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let fd = self.sock.as_raw_fd();
        let room = self.rx.len() - self.rx_end;
        if room == 0 {
            // A frame larger than the buffer: next_frame already refused it.
            return Err(StreamError::Garbage);
        }
        let Some(tls) = self.tls.as_mut() else {
            return match recv(fd, &mut self.rx[self.rx_end..]) {
                Ok(0) => Err(StreamError::Closed),
                Ok(n) => {
                    self.rx_end += n;
                    Ok(Fill::Data(n, n == room))
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    Ok(Fill::Nothing)
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Err(StreamError::Closed),
                Err(e) => Err(StreamError::Io(format!("recv: {e}"))),
            };
        };
        let got = match tls.read_tls(&mut FdIo(fd)) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                0
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(StreamError::Closed)
            }
            Err(e) => return Err(StreamError::Io(format!("recv: {e}"))),
        };
        let st = tls
            .process_new_packets()
            .map_err(|e| StreamError::Io(format!("TLS: {e}")))?;
        if self.phase == Phase::Handshaking && !tls.is_handshaking() {
            self.phase = Phase::Open;
            self.established_at = Some(Instant::now());
        }
        let mut n = 0;
        if st.plaintext_bytes_to_read() > 0 {
            match tls.reader().read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(StreamError::Closed),
                Ok(k) => n = k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(StreamError::Io(format!("TLS read: {e}"))),
            }
        } else if st.peer_has_closed() {
            return Err(StreamError::Closed);
        }
        self.rx_end += n;
        let more = got > 0 || st.plaintext_bytes_to_read() > n;
        // Handshake records to answer, or plaintext the handshake held back: write them.
        if tls.wants_write() || (self.phase == Phase::Open && self.out_start < self.out.len()) {
            self.flush()?;
        }
        Ok(if n > 0 || more {
            Fill::Data(n, more)
        } else {
            Fill::Nothing
        })
    }

    /// The next complete frame in the receive buffer: (offset, length) of the message as a
    /// datagram (ChannelData without its stream padding), read with [`StreamConn::frame`].
    pub fn next_frame(&mut self) -> Result<Option<(usize, usize)>, StreamError> {
        let start = self.rx_start;
        match framing::next(&self.rx[start..self.rx_end], MAX_FRAME) {
            Frame::Stun(n) => {
                self.rx_start += n;
                Ok(Some((start, n)))
            }
            Frame::ChannelData { len, total } => {
                self.rx_start += total;
                Ok(Some((start, len)))
            }
            Frame::Incomplete(_) => Ok(None),
            Frame::Invalid => Err(StreamError::Garbage),
        }
    }

    pub fn frame(&self, at: (usize, usize)) -> &[u8] {
        &self.rx[at.0..at.0 + at.1]
    }

    /// TLS: the negotiated version, cipher suite and ALPN protocol, for the report.
    pub fn tls_summary(&self) -> Option<String> {
        let t = self.tls.as_ref()?;
        Some(format!(
            "{:?} {:?} ALPN {}",
            t.protocol_version()?,
            t.negotiated_cipher_suite()?.suite(),
            t.alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_else(|| "none".into())
        ))
    }

    /// Close as a client does: TLS sends close_notify first (best effort), then the socket
    /// closes (FIN).
    pub fn close(mut self) {
        if let Some(tls) = self.tls.as_mut() {
            if self.phase == Phase::Open {
                tls.send_close_notify();
                let fd = self.sock.as_raw_fd();
                let _ = tls.write_tls(&mut FdIo(fd));
            }
        }
    }
}

/// Padded length of a ChannelData message of `payload` bytes on a stream (RFC 8656 §12.5).
pub fn padded_channel_len(payload: usize) -> usize {
    (4 + payload).div_ceil(4) * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn wait_writable(c: &mut StreamConn) {
        let until = Instant::now() + Duration::from_secs(2);
        while c.phase() == Phase::Connecting {
            let mut p = libc::pollfd {
                fd: c.fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            if p.revents != 0 {
                c.on_writable().unwrap();
            }
            assert!(Instant::now() < until);
        }
    }

    #[test]
    fn tcp_frames_both_ways_with_padding() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = StreamConn::connect(addr, "127.0.0.1:0".parse().unwrap(), None).unwrap();
        let (mut srv, _) = l.accept().unwrap();
        wait_writable(&mut c);
        assert!(c.established_at.is_some());
        // Two frames in one write: ChannelData of 3 bytes (padded to 8) and a STUN header.
        let mut stun = [0u8; 20];
        stun[1] = 1;
        stun[4..8].copy_from_slice(&0x2112A442u32.to_be_bytes());
        assert!(c.queue(&[0x40, 0x01, 0, 3, 7, 8, 9, 0]));
        assert!(c.queue(&stun));
        c.flush().unwrap();
        assert_eq!(c.pending(), 0);
        let mut got = [0u8; 28];
        srv.read_exact(&mut got).unwrap();
        assert_eq!(&got[..8], &[0x40, 0x01, 0, 3, 7, 8, 9, 0]);
        // And back, split across writes: frames come out whole, without the padding.
        srv.write_all(&[0x40, 0x02, 0, 5, 1, 2]).unwrap();
        srv.write_all(&[3, 4, 5, 0, 0, 0]).unwrap();
        srv.write_all(&stun).unwrap();
        let mut frames = Vec::new();
        let until = Instant::now() + Duration::from_secs(2);
        while frames.len() < 2 && Instant::now() < until {
            if let Ok(Fill::Data(..)) = c.fill() {
                while let Some(f) = c.next_frame().unwrap() {
                    frames.push(c.frame(f).to_vec());
                }
            }
        }
        assert_eq!(frames[0], [0x40, 0x02, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(frames[1], stun);
        // Garbage (first bits 11) cannot be framed.
        srv.write_all(&[0xC0, 0, 0, 0]).unwrap();
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            if let Ok(Fill::Data(..)) = c.fill() {
                assert!(matches!(c.next_frame(), Err(StreamError::Garbage)));
                break;
            }
            assert!(Instant::now() < until);
        }
        drop(srv);
        let until = Instant::now() + Duration::from_secs(2);
        while !matches!(c.fill(), Err(StreamError::Closed)) {
            assert!(Instant::now() < until, "end of stream not seen");
        }
        assert_eq!(padded_channel_len(100), 104);
        assert_eq!(padded_channel_len(3), 8);
    }

    #[test]
    fn refused_connect_is_an_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let cfg = tls_client_config(TlsVersion::Tls13).unwrap();
        let mut c = StreamConn::connect(addr, "127.0.0.1:0".parse().unwrap(), Some(&cfg)).unwrap();
        let mut p = libc::pollfd {
            fd: c.fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 2000) };
        assert!(matches!(c.on_writable(), Err(StreamError::Io(_))));
    }
}
