//! Cross-node signaling ([cluster]): real appliances joined by a real nats-server on loopback.
//! Actors registered on different nodes discover each other, relay SDP (with the sending
//! node's ACL), and see each other's ActrUp; a node killed with SIGKILL loses its actors on the
//! others within the node timeout; a NATS outage leaves local routing working and cross-node
//! routing comes back with the bus.
//!
//! The tests need `nats-server` (Debian package `nats-server`, installed by scripts/deps.sh;
//! `NATS_SERVER` names another binary). Without it the two that need the bus print
//! "SKIPPED: nats-server is not installed ..." and pass without running.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actrix_control::{provision_realm, Realm, RealmStatus};
use actrix_signaling::proto::{
    acl_rule, actr_id_string, actr_relay, actr_to_signaling, discovery_response, peer_to_signaling,
    register_response, signaling_envelope, signaling_to_actr, AIdCredential, Acl, AclRule, ActrId,
    ActrRelay, ActrToSignaling, ActrType, DiscoveryRequest, PeerToSignaling, Ping, RegisterRequest,
    SessionDescription, SignalingEnvelope, SubscribeActrUpRequest,
};
use common::Appliance;
use prost::Message as _;

const REALM: u32 = 7;

/// `NATS_SERVER` when set (a path; one that does not exist skips the tests), else
/// `nats-server` on PATH or in /usr/sbin (where Debian installs it).
fn nats_server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

macro_rules! need_nats {
    () => {
        match nats_server_bin() {
            Some(b) => b,
            None => {
                eprintln!(
                    "SKIPPED: nats-server is not installed (Debian package nats-server; scripts/deps.sh installs it)"
                );
                return;
            }
        }
    };
}

/// A nats-server process; killed on drop.
struct Nats {
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Nats {
    fn start(bin: PathBuf) -> Nats {
        let port = common::free_tcp_port();
        let mut n = Nats {
            bin,
            port,
            child: None,
        };
        n.restart();
        n
    }

    fn restart(&mut self) {
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(Duration::from_secs(10), "nats-server listens", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?}: {what}");
}

/// An appliance in `dir` with realm 7 provisioned and `extra` configuration.
fn appliance(dir: &Path, extra: &str) -> Appliance {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    provision_realm(
        &data,
        &Realm {
            realm_id: REALM,
            name: "edge".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .unwrap();
    Appliance::start(dir, &format!("[turn]\nenabled = true\n{extra}"))
}

/// A node of the cluster in `dir`, with realm 7 provisioned.
fn node(dir: &Path, id: &str, nats: &Nats) -> Appliance {
    appliance(
        dir,
        &format!(
            "[cluster]\nnode_id = \"{id}\"\nurls = [\"{}\"]\nheartbeat_interval_ms = 200\nnode_timeout_ms = 1500\n",
            nats.url()
        ),
    )
}

fn metric(app: &Appliance, name: &str) -> Option<f64> {
    let body = ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

fn ty(name: &str) -> ActrType {
    ActrType {
        manufacturer: "acme".into(),
        name: name.into(),
        version: Some("1.0.0".into()),
    }
}

fn allow(from: &[&str]) -> Acl {
    Acl {
        rules: vec![AclRule {
            principals: from
                .iter()
                .map(|n| acl_rule::Principal {
                    realm: None,
                    actr_type: Some(ty(n)),
                })
                .collect(),
            permission: acl_rule::ALLOW,
        }],
    }
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// A registered actor on one node's signaling WebSocket.
struct Actor {
    ws: Ws,
    id: ActrId,
    cred: AIdCredential,
    next: u64,
}

impl Actor {
    fn connect(app: &Appliance, query: &str) -> Actor {
        let (ws, _) = tungstenite::connect(format!("ws://{}/signaling/ws{query}", app.http))
            .expect("upgrade");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
        }
        Actor {
            ws,
            id: ActrId::default(),
            cred: AIdCredential::default(),
            next: 0,
        }
    }

    /// A new connection of the same actor, with its identity in the URL (wire section 8.1).
    fn reconnect(&self, app: &Appliance) -> Actor {
        use base64::Engine as _;
        let enc = |v: &str| -> String {
            v.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        let token = base64::engine::general_purpose::STANDARD.encode(&self.cred.encrypted_token);
        let query = format!(
            "actor_id={}&token={}&token_key_id={}",
            enc(&actr_id_string(&self.id)),
            enc(&token),
            self.cred.token_key_id
        );
        let mut a = Actor::connect(app, &format!("?{query}"));
        a.id = self.id.clone();
        a.cred = self.cred.clone();
        a
    }

    /// Ping; the error code when the answer is not a Pong.
    fn ping(&mut self) -> Result<(), u32> {
        let reply = self.request(signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: self.id.clone(),
            credential: self.cred.clone(),
            payload: Some(actr_to_signaling::Payload::Ping(Ping {
                availability: 1,
                power_reserve: 1.0,
                mailbox_backlog: 0.0,
                sticky_client_ids: vec![],
            })),
        }));
        match reply.flow {
            Some(signaling_envelope::Flow::ServerToActr(to)) => match to.payload {
                Some(signaling_to_actr::Payload::Pong(_)) => Ok(()),
                Some(signaling_to_actr::Payload::Error(e)) => Err(e.code),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    fn register(app: &Appliance, name: &str, acl_from: &[&str]) -> Actor {
        let mut a = Actor::connect(app, "");
        let reply = a.request(signaling_envelope::Flow::PeerToServer(PeerToSignaling {
            payload: Some(peer_to_signaling::Payload::RegisterRequest(
                RegisterRequest {
                    actr_type: ty(name),
                    realm: actrix_signaling::proto::Realm { realm_id: REALM },
                    acl: Some(allow(acl_from)),
                    ..Default::default()
                },
            )),
        }));
        let Some(signaling_envelope::Flow::ServerToActr(to)) = reply.flow else {
            panic!("{reply:?}")
        };
        let Some(signaling_to_actr::Payload::RegisterResponse(r)) = to.payload else {
            panic!("{to:?}")
        };
        let Some(register_response::Result::Success(ok)) = r.result else {
            panic!("{r:?}")
        };
        a.id = ok.actr_id;
        a.cred = ok.credential;
        a
    }

    fn send(&mut self, flow: signaling_envelope::Flow) -> String {
        self.next += 1;
        let id = format!("req-{}", self.next);
        let env = SignalingEnvelope {
            envelope_version: 1,
            envelope_id: id.clone(),
            flow: Some(flow),
            ..Default::default()
        };
        self.ws
            .send(tungstenite::Message::Binary(env.encode_to_vec().into()))
            .unwrap();
        id
    }

    /// The next envelope within `wait`.
    fn recv(&mut self, wait: Duration) -> Option<SignalingEnvelope> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(b)) => {
                    return Some(SignalingEnvelope::decode(&b[..]).unwrap())
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("websocket: {e}"),
            }
        }
        None
    }

    fn request(&mut self, flow: signaling_envelope::Flow) -> SignalingEnvelope {
        let id = self.send(flow);
        loop {
            let e = self.recv(Duration::from_secs(5)).expect("reply");
            if e.reply_for.as_deref() == Some(id.as_str()) {
                return e;
            }
        }
    }

    /// The type names discovery shows this actor.
    fn discover(&mut self) -> Vec<String> {
        let flow = signaling_envelope::Flow::ActrToServer(ActrToSignaling {
            source: self.id.clone(),
            credential: self.cred.clone(),
            payload: Some(actr_to_signaling::Payload::DiscoveryRequest(
                DiscoveryRequest {
                    manufacturer: None,
                    limit: None,
                },
            )),
        });
        let reply = self.request(flow);
        let Some(signaling_envelope::Flow::ServerToActr(to)) = reply.flow else {
            panic!("{reply:?}")
        };
        let Some(signaling_to_actr::Payload::DiscoveryResponse(d)) = to.payload else {
            panic!("{to:?}")
        };
        let Some(discovery_response::Result::Success(ok)) = d.result else {
            panic!("{d:?}")
        };
        ok.entries.into_iter().map(|e| e.actr_type.name).collect()
    }

    fn sees(&mut self, name: &str) -> bool {
        self.discover().iter().any(|n| n == name)
    }

    fn relay_sdp(&mut self, to: &ActrId, text: &str) {
        let flow = signaling_envelope::Flow::ActrRelay(ActrRelay {
            source: self.id.clone(),
            credential: self.cred.clone(),
            target: to.clone(),
            payload: Some(actr_relay::Payload::SessionDescription(
                SessionDescription {
                    r#type: 0,
                    sdp: text.into(),
                    sdp_exchange_id: None,
                },
            )),
        });
        self.send(flow);
    }

    /// Wait for the relayed SDP `text`; the relay as received.
    fn expect_sdp(&mut self, text: &str, wait: Duration) -> Option<ActrRelay> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            let Some(e) = self.recv(Duration::from_millis(200)) else {
                continue;
            };
            if let Some(signaling_envelope::Flow::ActrRelay(r)) = e.flow {
                if let Some(actr_relay::Payload::SessionDescription(s)) = &r.payload {
                    if s.sdp == text {
                        return Some(r);
                    }
                }
            }
        }
        None
    }
}

#[test]
fn actors_on_different_nodes_discover_relay_and_see_presence() {
    let bin = need_nats!();
    let nats = Nats::start(bin);
    let tmp = tempfile::tempdir().unwrap();
    let n1 = node(&tmp.path().join("n1"), "n1", &nats);
    let n2 = node(&tmp.path().join("n2"), "n2", &nats);
    let mut n3 = node(&tmp.path().join("n3"), "n3", &nats);
    for n in [&n1, &n2, &n3] {
        wait_until(Duration::from_secs(10), "node sees two others", || {
            metric(n, "actrix_signaling_cluster_connected") == Some(1.0)
                && metric(n, "actrix_signaling_cluster_nodes") == Some(2.0)
        });
    }

    // Presence across nodes: a caller on n2 subscribes to callees; one registers on n1.
    let mut caller = Actor::register(&n2, "caller", &["callee"]);
    let sub = caller.request(signaling_envelope::Flow::ActrToServer(ActrToSignaling {
        source: caller.id.clone(),
        credential: caller.cred.clone(),
        payload: Some(actr_to_signaling::Payload::SubscribeActrUpRequest(
            SubscribeActrUpRequest {
                target_type: ty("callee"),
            },
        )),
    }));
    assert!(sub.reply_for.is_some(), "{sub:?}");
    let mut callee = Actor::register(&n1, "callee", &["caller"]);
    let up = (0..25)
        .find_map(|_| {
            let e = caller.recv(Duration::from_millis(200))?;
            match e.flow {
                Some(signaling_envelope::Flow::ServerToActr(to)) => match to.payload {
                    Some(signaling_to_actr::Payload::ActrUpEvent(ev)) => Some(ev),
                    _ => None,
                },
                _ => None,
            }
        })
        .expect("ActrUp from the other node");
    assert_eq!(up.actor_id, callee.id);

    // Discovery on n2 sees the callee of n1, and the callee sees the caller.
    wait_until(Duration::from_secs(5), "n2 discovers n1's callee", || {
        caller.sees("callee")
    });
    assert!(callee.sees("caller"));

    // SDP offer n2 -> n1 and answer n1 -> n2, credential stripped as for a local relay.
    caller.relay_sdp(&callee.id, "offer-1");
    let r = callee
        .expect_sdp("offer-1", Duration::from_secs(5))
        .expect("offer relayed across nodes");
    assert_eq!(r.source, caller.id);
    assert!(r.credential.encrypted_token.is_empty());
    callee.relay_sdp(&caller.id, "answer-1");
    caller
        .expect_sdp("answer-1", Duration::from_secs(5))
        .expect("answer relayed back");

    // The sending node applies the ACL: a type the callee does not allow gets 403.
    let mut stranger = Actor::register(&n3, "stranger", &[]);
    wait_until(Duration::from_secs(5), "n3 knows the callee", || {
        metric(&n3, "actrix_signaling_cluster_remote_actors") >= Some(2.0)
    });
    stranger.relay_sdp(&callee.id, "intrusion");
    let refusal = stranger.recv(Duration::from_secs(5)).expect("a refusal");
    let Some(signaling_envelope::Flow::ServerToActr(to)) = refusal.flow else {
        panic!("{refusal:?}")
    };
    let Some(signaling_to_actr::Payload::Error(e)) = to.payload else {
        panic!("{to:?}")
    };
    assert_eq!(e.code, 403, "{e:?}");
    assert!(callee
        .expect_sdp("intrusion", Duration::from_millis(500))
        .is_none());

    // kill -9 n3: its actor leaves the others within the node timeout (1.5 s).
    wait_until(Duration::from_secs(5), "n1 knows the stranger", || {
        metric(&n1, "actrix_signaling_cluster_remote_actors") == Some(2.0)
    });
    let _ = n3.child.kill();
    let _ = n3.child.wait();
    let took = wait_until(Duration::from_secs(5), "n3's actor leaves n1", || {
        metric(&n1, "actrix_signaling_cluster_remote_actors") == Some(1.0)
            && metric(&n1, "actrix_signaling_cluster_nodes") == Some(1.0)
    });
    eprintln!("n3's actor left n1 {took:?} after kill -9 (node timeout 1.5 s)");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(
        metric(&n1, "actrix_signaling_cluster_relays_in_total") >= Some(1.0),
        "n1 counted the relay it delivered"
    );
}

#[test]
fn nats_outage_degrades_to_local_routing_and_recovers() {
    let bin = need_nats!();
    let mut nats = Nats::start(bin);
    let tmp = tempfile::tempdir().unwrap();
    let n1 = node(&tmp.path().join("n1"), "n1", &nats);
    let n2 = node(&tmp.path().join("n2"), "n2", &nats);
    for n in [&n1, &n2] {
        wait_until(Duration::from_secs(10), "node sees the other", || {
            metric(n, "actrix_signaling_cluster_nodes") == Some(1.0)
        });
    }
    let mut callee = Actor::register(&n1, "callee", &["caller"]);
    let mut local = Actor::register(&n1, "caller", &["callee"]);
    let mut remote = Actor::register(&n2, "caller", &["callee"]);
    wait_until(Duration::from_secs(5), "n2 discovers the callee", || {
        remote.sees("callee")
    });
    remote.relay_sdp(&callee.id, "before");
    callee
        .expect_sdp("before", Duration::from_secs(5))
        .expect("cross-node relay before the outage");

    nats.stop();
    for n in [&n1, &n2] {
        wait_until(
            Duration::from_secs(10),
            "the outage shows on /metrics",
            || metric(n, "actrix_signaling_cluster_connected") == Some(0.0),
        );
    }
    assert!(metric(&n1, "actrix_signaling_cluster_outages_total") >= Some(1.0));
    // Local routing keeps working; remote actors are gone from discovery.
    local.relay_sdp(&callee.id, "local-during");
    callee
        .expect_sdp("local-during", Duration::from_secs(5))
        .expect("local relay during the outage");
    assert!(
        !remote.sees("callee"),
        "no remote actors while the bus is down"
    );
    assert_eq!(
        metric(&n2, "actrix_signaling_cluster_remote_actors"),
        Some(0.0)
    );

    // The bus returns on the same address: the nodes reconnect and resync by themselves.
    nats.restart();
    let took = wait_until(
        Duration::from_secs(15),
        "cross-node routing resumes",
        || {
            metric(&n1, "actrix_signaling_cluster_connected") == Some(1.0)
                && metric(&n2, "actrix_signaling_cluster_connected") == Some(1.0)
                && remote.sees("callee")
        },
    );
    eprintln!("cross-node discovery back {took:?} after nats-server restarted");
    remote.relay_sdp(&callee.id, "after");
    callee
        .expect_sdp("after", Duration::from_secs(5))
        .expect("cross-node relay after the outage");
    // One log line for the outage, not one per message.
    let lines: Vec<String> = n1.log.try_iter().collect();
    let lost = lines
        .iter()
        .filter(|l| l.contains("lost the NATS connection"))
        .count();
    assert_eq!(lost, 1, "{lines:#?}");
}

/// One Key Server for several nodes: node 2 has no KS of its own and uses node 1's over the
/// signed API. While the KS is down, what node 2 already fetched keeps working (a reconnect
/// with the URL identity validates, Pings get Pongs) until the key expires; a key it has not
/// seen is refused, and nothing else breaks. (No NATS needed: the KS is plain HTTP.)
#[test]
fn ks_outage_keeps_cached_keys_working() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = "cluster-test-shared-key-0123456789";
    let mut ks = appliance(
        &tmp.path().join("ks"),
        &format!("[ks]\nshared_key = \"{shared}\"\n"),
    );
    let n2 = appliance(
        &tmp.path().join("n2"),
        &format!(
            "[services]\nks = false\n[ks]\nremote_url = \"http://{}\"\nshared_key = \"{shared}\"\n",
            ks.http
        ),
    );
    // The credential node 2 issues is under the KS's key, and node 2 verifies it (fetching
    // the secret key from node 1).
    let mut a = Actor::register(&n2, "caller", &["caller"]);
    assert_eq!(a.ping(), Ok(()));

    let _ = ks.child.kill();
    let _ = ks.child.wait();
    // A new connection validates its URL identity through the key cache, without the KS.
    let mut again = a.reconnect(&n2);
    assert_eq!(
        again.ping(),
        Ok(()),
        "a cached key works while the KS is down"
    );
    assert_eq!(
        metric(&n2, "actrix_signaling_url_identity_refused_total"),
        Some(0.0)
    );
    // A key node 2 never fetched cannot be checked: 401, and nothing else is affected.
    let mut unknown = Actor::connect(&n2, "");
    unknown.id = a.id.clone();
    unknown.cred = a.cred.clone();
    unknown.cred.token_key_id = a.cred.token_key_id + 1000;
    assert_eq!(unknown.ping(), Err(401));
    assert_eq!(again.ping(), Ok(()));
}
