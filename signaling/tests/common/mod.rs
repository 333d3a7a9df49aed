//! Helpers for the end-to-end tests: a real control server with the signaling routes on
//! 127.0.0.1:0, a temporary data directory, and tokio-tungstenite clients.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actrix_control::server::ControlContext;
use actrix_control::{ControlBuilder, ControlConfig, ControlHandle, RealmStatus};
use actrix_signaling::proto::*;
use actrix_signaling::{SignalingConfig, SignalingStats};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SHARED_KEY: &str = actrix_control::testing::SHARED_KEY;
pub const KEK_HEX: &str = actrix_control::testing::KEK_HEX;
pub const REALM: u32 = 101;
pub const OTHER_REALM: u32 = 202;

pub struct Server {
    pub handle: Option<ControlHandle>,
    pub addr: SocketAddr,
    pub ctx: ControlContext,
    pub stats: Arc<SignalingStats>,
}

impl Server {
    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/signaling/ws", self.addr)
        } else {
            format!("ws://{}/signaling/ws?{query}", self.addr)
        }
    }

    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().expect("clean shutdown");
        }
    }
}

/// A control config on 127.0.0.1:0 with `dir` as data directory and the fixed test secrets.
pub fn control_config(dir: &Path) -> ControlConfig {
    actrix_control::testing::config(dir, "sig-test")
}

/// Limits loose enough for functional tests; specific tests tighten one.
pub fn test_config() -> SignalingConfig {
    SignalingConfig {
        conn_rate_per_sec: 1000,
        conn_burst: 1000,
        msg_rate_per_sec: 10_000,
        msg_burst: 10_000,
        ..SignalingConfig::default()
    }
}

pub fn provision(dir: &Path) {
    for (id, name) in [(REALM, "main"), (OTHER_REALM, "other")] {
        actrix_control::provision_realm(
            dir,
            &actrix_control::Realm {
                realm_id: id,
                name: name.into(),
                status: RealmStatus::Normal,
                expires_at: None,
            },
        )
        .unwrap();
    }
}

pub fn start(dir: &Path, sig: SignalingConfig) -> Server {
    start_with(control_config(dir), dir, sig)
}

pub fn start_with(cfg: ControlConfig, dir: &Path, sig: SignalingConfig) -> Server {
    provision(dir);
    let slot: Arc<Mutex<Option<ControlContext>>> = Arc::default();
    let stats = Arc::new(SignalingStats::default());
    let (slot2, stats2, dir2) = (slot.clone(), stats.clone(), dir.to_owned());
    let handle = ControlBuilder::new(cfg)
        .routes_with(move |ctx| {
            *slot2.lock().unwrap() = Some(ctx.clone());
            actrix_signaling::router_with_stats(ctx, sig, &dir2, stats2).expect("signaling routes")
        })
        .spawn()
        .expect("control plane starts");
    let ctx = slot.lock().unwrap().clone().unwrap();
    Server {
        addr: handle.local_addr(),
        handle: Some(handle),
        ctx,
        stats,
    }
}

pub fn actr_type(name: &str) -> ActrType {
    ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
        version: Some("1.0.0".into()),
    }
}

/// An ACL allowing each of `from` (type names of manufacturer acme, version 1.0.0).
pub fn allow(from: &[&str]) -> Acl {
    Acl {
        rules: vec![AclRule {
            principals: from
                .iter()
                .map(|n| acl_rule::Principal {
                    realm: None,
                    actr_type: Some(actr_type(n)),
                })
                .collect(),
            permission: acl_rule::ALLOW,
        }],
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    Frame(Box<SignalingEnvelope>),
    /// The connection ended: the code of the server's Close frame, or None when it was
    /// dropped without one.
    Closed(Option<u16>),
    Timeout,
}

pub struct Client {
    pub ws: Ws,
    pub id: Option<ActrId>,
    pub cred: Option<AIdCredential>,
    pub psk: Option<Vec<u8>>,
    pending: VecDeque<SignalingEnvelope>,
    seq: u64,
}

pub fn envelope(id: String, flow: signaling_envelope::Flow) -> SignalingEnvelope {
    SignalingEnvelope {
        envelope_version: 1,
        envelope_id: id,
        reply_for: None,
        timestamp: Timestamp {
            seconds: 1,
            nanos: 0,
        },
        traceparent: None,
        tracestate: None,
        flow: Some(flow),
    }
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Client {
            ws,
            id: None,
            cred: None,
            psk: None,
            pending: VecDeque::new(),
            seq: 0,
        }
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(Message::Binary(bytes.into()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, flow: signaling_envelope::Flow) -> String {
        self.seq += 1;
        let id = format!("req-{}", self.seq);
        let env = envelope(id.clone(), flow);
        self.send_raw(env.encode_to_vec()).await;
        id
    }

    /// What arrives next (pending envelopes first) within `t`: an envelope, the end of the
    /// connection (with the close code the server sent, if it sent a Close frame), or
    /// nothing. Pings, pongs and text frames are skipped.
    pub async fn recv_event(&mut self, t: Duration) -> Event {
        if let Some(e) = self.pending.pop_front() {
            return Event::Frame(Box::new(e));
        }
        self.recv_wire_event(t).await
    }

    async fn recv_wire_event(&mut self, t: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let m = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(None) | Ok(Some(Err(_))) => return Event::Closed(None),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Binary(b) => {
                    return Event::Frame(Box::new(
                        SignalingEnvelope::decode(b).expect("server envelope decodes"),
                    ))
                }
                Message::Close(f) => return Event::Closed(f.map(|f| u16::from(f.code))),
                _ => continue,
            }
        }
    }

    /// The next envelope within `t`; None on a timeout. A close panics: a test that expects
    /// a close says so with [`Client::expect_closed`].
    pub async fn recv_timeout(&mut self, t: Duration) -> Option<SignalingEnvelope> {
        match self.recv_event(t).await {
            Event::Frame(e) => Some(*e),
            Event::Timeout => None,
            Event::Closed(code) => {
                panic!("connection closed (code {code:?}) while waiting for an envelope")
            }
        }
    }

    /// Expect the server to close the connection within `t` (envelopes before the close are
    /// skipped); returns the close code it sent (None: dropped without a Close frame). Panics
    /// on a timeout.
    pub async fn expect_closed(&mut self, t: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_event(left).await {
                Event::Frame(_) => continue,
                Event::Closed(code) => return code,
                Event::Timeout => panic!("still open after {t:?}"),
            }
        }
    }

    async fn recv_wire(&mut self, t: Duration) -> Option<SignalingEnvelope> {
        match self.recv_wire_event(t).await {
            Event::Frame(e) => Some(*e),
            Event::Timeout => None,
            Event::Closed(code) => {
                panic!("connection closed (code {code:?}) while waiting for a reply")
            }
        }
    }

    pub async fn recv(&mut self) -> SignalingEnvelope {
        self.recv_timeout(Duration::from_secs(5))
            .await
            .expect("an envelope")
    }

    /// Send and wait for the envelope answering it; others are kept for `recv`.
    pub async fn request(&mut self, flow: signaling_envelope::Flow) -> SignalingEnvelope {
        let id = self.send(flow).await;
        loop {
            let e = self
                .recv_wire(Duration::from_secs(5))
                .await
                .expect("a reply");
            if e.reply_for.as_deref() == Some(id.as_str()) {
                return e;
            }
            self.pending.push_back(e);
        }
    }

    /// Expect nothing for `t`: no envelope, and the connection stays open.
    pub async fn expect_silence(&mut self, t: Duration) {
        match self.recv_event(t).await {
            Event::Timeout => {}
            Event::Frame(e) => panic!("unexpected envelope {e:?}"),
            Event::Closed(code) => panic!("unexpected close (code {code:?})"),
        }
    }

    pub async fn register_full(
        &mut self,
        realm: u32,
        ty: ActrType,
        acl: Option<Acl>,
        spec: Option<ServiceSpec>,
        ws_address: Option<String>,
    ) -> SignalingEnvelope {
        let req = RegisterRequest {
            actr_type: ty,
            realm: Realm { realm_id: realm },
            service_spec: spec,
            acl,
            service: None,
            ws_address,
        };
        let reply = self
            .request(signaling_envelope::Flow::PeerToServer(PeerToSignaling {
                payload: Some(peer_to_signaling::Payload::RegisterRequest(req)),
            }))
            .await;
        if let Some(register_response::Result::Success(ok)) = register_result(&reply) {
            self.id = Some(ok.actr_id.clone());
            self.cred = Some(ok.credential.clone());
            self.psk = ok.psk.clone();
        }
        reply
    }

    pub async fn register(&mut self, name: &str, acl_from: &[&str]) -> ActrId {
        let reply = self
            .register_full(REALM, actr_type(name), Some(allow(acl_from)), None, None)
            .await;
        assert!(
            matches!(
                register_result(&reply),
                Some(register_response::Result::Success(_))
            ),
            "register failed: {reply:?}"
        );
        self.id.clone().unwrap()
    }

    pub fn actr(&self, payload: actr_to_signaling::Payload) -> signaling_envelope::Flow {
        signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: self.id.clone().expect("registered"),
            credential: self.cred.clone().expect("registered"),
            payload: Some(payload),
        })
    }

    pub fn relay(&self, target: &ActrId, payload: actr_relay::Payload) -> signaling_envelope::Flow {
        signaling_envelope::Flow::ActrRelay(ActrRelay {
            source: self.id.clone().expect("registered"),
            credential: self.cred.clone().expect("registered"),
            target: target.clone(),
            payload: Some(payload),
        })
    }

    pub fn ping_flow(&self) -> signaling_envelope::Flow {
        self.actr(actr_to_signaling::Payload::Ping(Ping {
            availability: 0,
            power_reserve: 1.0,
            mailbox_backlog: 0.0,
            sticky_client_ids: vec![],
        }))
    }

    /// URL query to reconnect as this actor.
    pub fn reconnect_query(&self) -> String {
        use base64::Engine as _;
        let cred = self.cred.as_ref().unwrap();
        form_query(&[
            ("actor_id", actr_id_string(self.id.as_ref().unwrap())),
            (
                "token",
                base64::engine::general_purpose::STANDARD.encode(&cred.encrypted_token),
            ),
            ("token_key_id", cred.token_key_id.to_string()),
        ])
    }
}

pub fn form_query(pairs: &[(&str, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

pub fn register_result(e: &SignalingEnvelope) -> Option<&register_response::Result> {
    match &e.flow {
        Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
            payload: Some(signaling_to_actr::Payload::RegisterResponse(r)),
            ..
        })) => r.result.as_ref(),
        _ => None,
    }
}

pub fn to_actr(e: &SignalingEnvelope) -> &signaling_to_actr::Payload {
    match &e.flow {
        Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
            payload: Some(p), ..
        })) => p,
        other => panic!("not a server_to_actr: {other:?}"),
    }
}

/// The code of a SignalingToActr.error or an envelope_error.
pub fn error_code(e: &SignalingEnvelope) -> Option<(u32, String)> {
    match &e.flow {
        Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
            payload: Some(signaling_to_actr::Payload::Error(er)),
            ..
        }))
        | Some(signaling_envelope::Flow::EnvelopeError(er)) => Some((er.code, er.message.clone())),
        _ => None,
    }
}

pub fn relay_of(e: &SignalingEnvelope) -> &ActrRelay {
    match &e.flow {
        Some(signaling_envelope::Flow::ActrRelay(r)) => r,
        other => panic!("not a relay: {other:?}"),
    }
}

pub fn sdp(text: &str) -> actr_relay::Payload {
    actr_relay::Payload::SessionDescription(SessionDescription {
        r#type: 0,
        sdp: text.into(),
        sdp_exchange_id: None,
    })
}

/// A WebSocket client written by hand over TCP, for what a real client library will not do:
/// send frames that break the protocol, or not read at all (so it never answers pings).
pub struct RawWs {
    pub s: TcpStream,
}

/// A frame from the server: opcode and payload.
pub type RawFrame = (u8, Vec<u8>);

impl RawWs {
    pub async fn connect(srv: &Server) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(
            b"GET /signaling/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "upgrade response");
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawWs { s }
    }

    /// Send one frame: `first` is the FIN/RSV/opcode byte; client frames are masked unless
    /// `masked` is false (a protocol violation).
    pub async fn send_frame(&mut self, first: u8, masked: bool, payload: &[u8]) {
        use tokio::io::AsyncWriteExt;
        assert!(payload.len() < 126);
        let mut f = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
        let key = [0x11, 0x22, 0x33, 0x44];
        if masked {
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        self.s.write_all(&f).await.unwrap();
    }

    /// Every frame the server sends until it closes the connection, or until `t` passes.
    pub async fn frames_until_closed(&mut self, t: Duration) -> (Vec<RawFrame>, bool) {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + t;
        let mut buf = Vec::new();
        let mut closed = false;
        loop {
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        let mut frames = Vec::new();
        let mut i = 0;
        while i + 2 <= buf.len() {
            let op = buf[i] & 0x0F;
            let mut len = (buf[i + 1] & 0x7F) as usize;
            let mut at = i + 2;
            if len == 126 {
                len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
                at += 2;
            } else if len == 127 {
                len = u64::from_be_bytes(buf[at..at + 8].try_into().unwrap()) as usize;
                at += 8;
            }
            if at + len > buf.len() {
                break;
            }
            frames.push((op, buf[at..at + len].to_vec()));
            i = at + len;
        }
        (frames, closed)
    }
}

/// The code of a Close frame's payload.
pub fn close_code(frames: &[RawFrame]) -> Option<u16> {
    frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .and_then(|(_, p)| (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])))
}
