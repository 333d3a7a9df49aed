//! actr 0.4 envelopes at the edge of the hub (control/WIRE-0.4.md): decoding a 0.4 frame into
//! the 0.1.7 types the hub works with, encoding the hub's output for a 0.4 connection, and
//! what a 0.4 actor registered with (its ACL in 0.1.7 form).
//!
//! The two protocols encode almost every message identically, so most of the translation is a
//! re-decode of the same bytes under the other schema ([`recode`]). The exceptions are handled
//! by hand:
//! - `AIdCredential`: different fields with clashing wire types (0.1.7: bytes #1, uint32 #2;
//!   0.4: uint32 #1, bytes #2, bytes #3). The hub never needs the bytes (the I/O layer hands it
//!   a verdict, and forwarded relays carry an empty credential), so the credential is cut out
//!   of the encoded message before the other schema reads it ([`without_field`]).
//! - `RouteCandidatesOk`: 0.1.7 has `compatibility_info` at #2 and `ws_address_map` at #5, 0.4
//!   has `ws_address_map` at #2.
//! - `GetSigningKeyRequest` (0.4 only): answered by the I/O layer, never reaches the hub.
//! - `RegisterRequest` on the WebSocket: 0.4 clients register with the AIS over HTTP; one sent
//!   on a 0.4 connection is refused.
//! - `ActrType.version`: required in 0.4, optional in 0.1.7; the same bytes either way.

use actrix_wire::v4::{actr as a4, signaling as s4};
use prost::Message;

use crate::hub::Registration;
use crate::proto::{self as p1, type_key};

/// Re-decode `a` as `B` (for messages both protocols encode the same way).
pub(crate) fn recode<A: Message, B: Message + Default>(a: &A) -> B {
    B::decode(&a.encode_to_vec()[..]).unwrap_or_default()
}

/// `msg` without its top-level field `field` (every occurrence). `None` if `msg` does not
/// parse as protobuf.
pub(crate) fn without_field(msg: &[u8], field: u32) -> Option<Vec<u8>> {
    fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = *b.get(*at)?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::with_capacity(msg.len());
    let mut at = 0;
    while at < msg.len() {
        let start = at;
        let key = varint(msg, &mut at)?;
        match key & 7 {
            0 => {
                varint(msg, &mut at)?;
            }
            1 => at += 8,
            2 => {
                let n = usize::try_from(varint(msg, &mut at)?).ok()?;
                at = at.checked_add(n)?;
            }
            5 => at += 4,
            _ => return None,
        }
        if at > msg.len() {
            return None;
        }
        if key >> 3 != u64::from(field) {
            out.extend_from_slice(&msg[start..at]);
        }
    }
    Some(out)
}

/// `m` re-decoded as `B` without its field 2 (the credential of `ActrToSignaling` and
/// `ActrRelay`).
fn without_credential<A: Message, B: Message + Default>(m: &A) -> B {
    without_field(&m.encode_to_vec(), 2)
        .and_then(|b| B::decode(&b[..]).ok())
        .unwrap_or_default()
}

/// A 0.4 frame, decoded.
pub(crate) enum Incoming {
    /// For the hub, with the credential it carried (verified by the I/O layer).
    Envelope(Box<p1::SignalingEnvelope>, Option<a4::AIdCredential>),
    /// `GetSigningKeyRequest`: the I/O layer authenticates and answers it.
    SigningKey {
        envelope_id: String,
        source: p1::ActrId,
        credential: a4::AIdCredential,
        key_id: u32,
    },
    /// A `RegisterRequest` on the WebSocket (0.4 registers over HTTP).
    Register { envelope_id: String },
}

/// Decode a frame of a 0.4 connection.
pub(crate) fn decode(data: &[u8]) -> Result<Incoming, prost::DecodeError> {
    let env = s4::SignalingEnvelope::decode(data)?;
    let mut credential = None;
    let flow = match env.flow {
        None => None,
        Some(s4::signaling_envelope::Flow::PeerToServer(_)) => {
            return Ok(Incoming::Register {
                envelope_id: env.envelope_id,
            })
        }
        Some(s4::signaling_envelope::Flow::ActrToServer(a)) => {
            if let Some(s4::actr_to_signaling::Payload::GetSigningKeyRequest(g)) = &a.payload {
                return Ok(Incoming::SigningKey {
                    envelope_id: env.envelope_id,
                    source: recode(&a.source),
                    key_id: g.key_id,
                    credential: a.credential,
                });
            }
            let a1: p1::ActrToSignaling = without_credential(&a);
            credential = Some(a.credential);
            Some(p1::signaling_envelope::Flow::ActrToServer(a1))
        }
        Some(s4::signaling_envelope::Flow::ActrRelay(r)) => {
            let r1: p1::ActrRelay = without_credential(&r);
            credential = Some(r.credential);
            Some(p1::signaling_envelope::Flow::ActrRelay(r1))
        }
        Some(s4::signaling_envelope::Flow::EnvelopeError(e)) => {
            Some(p1::signaling_envelope::Flow::EnvelopeError(recode(&e)))
        }
        // A client has no business sending server flows; the hub ignores them.
        Some(s4::signaling_envelope::Flow::ServerToActr(_)) => None,
    };
    Ok(Incoming::Envelope(
        Box::new(p1::SignalingEnvelope {
            envelope_version: env.envelope_version,
            envelope_id: env.envelope_id,
            reply_for: env.reply_for,
            timestamp: env.timestamp,
            traceparent: env.traceparent,
            tracestate: env.tracestate,
            flow,
        }),
        credential,
    ))
}

/// The 0.4 form of an envelope the hub produced, for a 0.4 connection. `None` for what has no
/// 0.4 form (a successful WebSocket registration, which 0.4 connections never get).
pub(crate) fn encode(env: &p1::SignalingEnvelope) -> Option<Vec<u8>> {
    use p1::signaling_envelope::Flow as F1;
    use s4::signaling_envelope::Flow as F4;
    let flow = match &env.flow {
        None => None,
        Some(F1::ServerToActr(s)) => Some(F4::ServerToActr(server_to_actr(s)?)),
        Some(F1::ActrRelay(r)) => Some(F4::ActrRelay(without_credential(r))),
        Some(F1::EnvelopeError(e)) => Some(F4::EnvelopeError(recode(e))),
        Some(F1::PeerToServer(_)) | Some(F1::ActrToServer(_)) => None,
    };
    Some(
        s4::SignalingEnvelope {
            envelope_version: env.envelope_version,
            envelope_id: env.envelope_id.clone(),
            reply_for: env.reply_for.clone(),
            timestamp: env.timestamp,
            traceparent: env.traceparent.clone(),
            tracestate: env.tracestate.clone(),
            flow,
        }
        .encode_to_vec(),
    )
}

fn server_to_actr(s: &p1::SignalingToActr) -> Option<s4::SignalingToActr> {
    use p1::signaling_to_actr::Payload as P1;
    use s4::signaling_to_actr::Payload as P4;
    let payload = match &s.payload {
        Some(P1::RouteCandidatesResponse(r)) => {
            Some(P4::RouteCandidatesResponse(a4::RouteCandidatesResponse {
                result: r.result.as_ref().map(|res| match res {
                    p1::route_candidates_response::Result::Success(ok) => {
                        a4::route_candidates_response::Result::Success(
                            a4::route_candidates_response::RouteCandidatesOk {
                                candidates: ok.candidates.iter().map(recode).collect(),
                                ws_address_map: ok.ws_address_map.iter().map(recode).collect(),
                            },
                        )
                    }
                    p1::route_candidates_response::Result::Error(e) => {
                        a4::route_candidates_response::Result::Error(recode(e))
                    }
                }),
            }))
        }
        Some(P1::RegisterResponse(r)) => match &r.result {
            Some(p1::register_response::Result::Error(e)) => {
                Some(P4::RegisterResponse(a4::RegisterResponse {
                    result: Some(a4::register_response::Result::Error(recode(e))),
                }))
            }
            _ => return None,
        },
        // Every other payload is encoded the same way by both protocols.
        Some(_) => {
            let whole: s4::SignalingToActr = recode(s);
            whole.payload
        }
        None => None,
    };
    Some(s4::SignalingToActr {
        target: recode(&s.target),
        payload,
    })
}

/// A 0.4 envelope answering `reply_for` for `target` with `payload` (what the I/O layer sends
/// itself: signing keys, refused registrations).
pub(crate) fn reply(
    now_unix_ms: u64,
    envelope_id: String,
    reply_for: String,
    target: a4::ActrId,
    payload: s4::signaling_to_actr::Payload,
) -> Vec<u8> {
    s4::SignalingEnvelope {
        envelope_version: 1,
        envelope_id,
        reply_for: Some(reply_for),
        timestamp: prost_types::Timestamp {
            seconds: i64::try_from(now_unix_ms / 1000).unwrap_or(i64::MAX),
            nanos: 0,
        },
        traceparent: None,
        tracestate: None,
        flow: Some(s4::signaling_envelope::Flow::ServerToActr(
            s4::SignalingToActr {
                target,
                payload: Some(payload),
            },
        )),
    }
    .encode_to_vec()
}

/// What a 0.4 actor of `realm` registered with, for the hub. The ACL becomes 0.1.7 rules with
/// the 0.4 semantics kept: a rule applies to this realm when its realm selector is absent,
/// `any_realm`, or this realm (cross-realm rules have no effect: nothing routes across realms
/// here); types match exactly (version included, as actr-runtime 0.4's own check does); any
/// matching DENY overrides every ALLOW of the same type; no rule means deny.
pub(crate) fn registration(realm: u32, req: a4::RegisterRequest) -> Registration {
    Registration {
        spec: req.service_spec.as_ref().map(recode),
        acl: req.acl.as_ref().map(|acl| acl_v1(realm, acl)),
        ws_address: req.ws_address,
    }
}

fn acl_v1(realm: u32, acl: &a4::Acl) -> p1::Acl {
    use a4::acl_rule::SourceRealm;
    let mut by_type: std::collections::BTreeMap<String, (p1::ActrType, bool)> = Default::default();
    for r in &acl.rules {
        let applies = match r.source_realm {
            None | Some(SourceRealm::AnyRealm(_)) => true,
            Some(SourceRealm::RealmId(id)) => id == realm,
        };
        if !applies {
            continue;
        }
        let t: p1::ActrType = recode(&r.from_type);
        let allow = r.permission == a4::acl_rule::Permission::Allow as i32;
        let e = by_type.entry(type_key(&t)).or_insert((t, true));
        e.1 &= allow;
    }
    p1::Acl {
        rules: by_type
            .into_values()
            .map(|(t, allow)| p1::AclRule {
                principals: vec![p1::acl_rule::Principal {
                    realm: None,
                    actr_type: Some(t),
                }],
                permission: if allow {
                    p1::acl_rule::ALLOW
                } else {
                    p1::acl_rule::DENY
                },
            })
            .collect(),
    }
}

/// Which protocol's credential a frame that did not decode under its connection's protocol
/// carries, when it decodes under the other one: `Some((source, envelope_id))` when the frame
/// is a well-formed envelope of the other protocol with a credential-carrying flow.
pub(crate) fn other_protocol_v1(data: &[u8]) -> Option<(p1::ActrId, String)> {
    let env = p1::SignalingEnvelope::decode(data).ok()?;
    let source = match env.flow? {
        p1::signaling_envelope::Flow::ActrToServer(a) => a.source,
        p1::signaling_envelope::Flow::ActrRelay(r) => r.source,
        _ => return None,
    };
    Some((source, env.envelope_id))
}

/// As [`other_protocol_v1`], for a 0.4 frame on a 0.1.7 connection.
pub(crate) fn other_protocol_v4(data: &[u8]) -> Option<(p1::ActrId, String)> {
    let env = s4::SignalingEnvelope::decode(data).ok()?;
    let source = match env.flow? {
        s4::signaling_envelope::Flow::ActrToServer(a) => a.source,
        s4::signaling_envelope::Flow::ActrRelay(r) => r.source,
        _ => return None,
    };
    Some((recode(&source), env.envelope_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id4() -> a4::ActrId {
        a4::ActrId {
            realm: a4::Realm { realm_id: 7 },
            serial_number: 0x2c18,
            r#type: a4::ActrType {
                manufacturer: "acme".into(),
                name: "echo".into(),
                version: "1.0.0".into(),
            },
        }
    }

    #[test]
    fn a_relay_crosses_the_hub_with_its_sdp_exchange_id() {
        let env = s4::SignalingEnvelope {
            envelope_version: 1,
            envelope_id: "e1".into(),
            flow: Some(s4::signaling_envelope::Flow::ActrRelay(s4::ActrRelay {
                source: id4(),
                credential: a4::AIdCredential {
                    key_id: 3,
                    claims: vec![1, 2, 3],
                    signature: vec![9; 64],
                },
                target: id4(),
                payload: Some(s4::actr_relay::Payload::SessionDescription(
                    actrix_wire::v4::webrtc::SessionDescription {
                        r#type: 0,
                        sdp: "v=0".into(),
                        sdp_exchange_id: Some("x-1".into()),
                    },
                )),
            })),
            ..Default::default()
        };
        let Ok(Incoming::Envelope(e1, Some(cred))) = decode(&env.encode_to_vec()) else {
            panic!("decodes");
        };
        assert_eq!(cred.key_id, 3);
        let out = encode(&e1).unwrap();
        let back = s4::SignalingEnvelope::decode(&out[..]).unwrap();
        let Some(s4::signaling_envelope::Flow::ActrRelay(r)) = back.flow else {
            panic!()
        };
        assert_eq!(r.source, id4());
        assert_eq!(r.credential, a4::AIdCredential::default());
        let Some(s4::actr_relay::Payload::SessionDescription(sd)) = r.payload else {
            panic!()
        };
        assert_eq!(sd.sdp_exchange_id.as_deref(), Some("x-1"));
    }

    #[test]
    fn route_candidates_map_to_the_0_4_layout() {
        let id1: p1::ActrId = recode(&id4());
        let env = p1::SignalingEnvelope {
            flow: Some(p1::signaling_envelope::Flow::ServerToActr(
                p1::SignalingToActr {
                    target: id1.clone(),
                    payload: Some(p1::signaling_to_actr::Payload::RouteCandidatesResponse(
                        p1::RouteCandidatesResponse {
                            result: Some(p1::route_candidates_response::Result::Success(
                                p1::route_candidates_response::RouteCandidatesOk {
                                    candidates: vec![id1.clone()],
                                    ws_address_map: vec![p1::WsAddressEntry {
                                        candidate_id: id1,
                                        ws_address: Some("ws://a".into()),
                                    }],
                                    ..Default::default()
                                },
                            )),
                        },
                    )),
                },
            )),
            ..Default::default()
        };
        let back = s4::SignalingEnvelope::decode(&encode(&env).unwrap()[..]).unwrap();
        let Some(s4::signaling_envelope::Flow::ServerToActr(s)) = back.flow else {
            panic!()
        };
        let Some(s4::signaling_to_actr::Payload::RouteCandidatesResponse(r)) = s.payload else {
            panic!()
        };
        let Some(a4::route_candidates_response::Result::Success(ok)) = r.result else {
            panic!()
        };
        assert_eq!(ok.candidates, vec![id4()]);
        assert_eq!(ok.ws_address_map[0].ws_address.as_deref(), Some("ws://a"));
    }

    #[test]
    fn acl_rules_keep_the_0_4_semantics() {
        use a4::acl_rule::{Permission, SourceRealm};
        let t = |n: &str| a4::ActrType {
            manufacturer: "acme".into(),
            name: n.into(),
            version: "1".into(),
        };
        let rule = |n: &str, p: Permission, r: Option<SourceRealm>| a4::AclRule {
            permission: p as i32,
            from_type: t(n),
            source_realm: r,
        };
        let acl = a4::Acl {
            rules: vec![
                rule("a", Permission::Allow, None),
                rule("b", Permission::Allow, Some(SourceRealm::AnyRealm(true))),
                rule("b", Permission::Deny, Some(SourceRealm::RealmId(7))),
                rule("c", Permission::Allow, Some(SourceRealm::RealmId(8))),
                rule("d", Permission::Allow, Some(SourceRealm::RealmId(7))),
            ],
        };
        let got = acl_v1(7, &acl);
        let rows: Vec<(String, i32)> = got
            .rules
            .iter()
            .map(|r| {
                (
                    type_key(r.principals[0].actr_type.as_ref().unwrap()),
                    r.permission,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("acme:a:1".into(), p1::acl_rule::ALLOW),
                ("acme:b:1".into(), p1::acl_rule::DENY),
                ("acme:d:1".into(), p1::acl_rule::ALLOW),
            ]
        );
    }

    #[test]
    fn credentials_tell_the_protocols_apart() {
        let v4 = s4::SignalingEnvelope {
            flow: Some(s4::signaling_envelope::Flow::ActrToServer(
                s4::ActrToSignaling {
                    source: id4(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
        .encode_to_vec();
        let v1 = p1::SignalingEnvelope {
            flow: Some(p1::signaling_envelope::Flow::ActrToServer(
                p1::ActrToSignaling {
                    source: recode(&id4()),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }
        .encode_to_vec();
        // Even empty credentials clash in their wire types.
        assert!(p1::SignalingEnvelope::decode(&v4[..]).is_err());
        assert!(s4::SignalingEnvelope::decode(&v1[..]).is_err());
        assert!(other_protocol_v4(&v4).is_some());
        assert!(other_protocol_v1(&v1).is_some());
    }
}
