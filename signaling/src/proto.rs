//! The signaling protobuf messages, written by hand from the tables of wire reference section 1
//! (proto2), without `protoc`.
//!
//! Conventions (wire section 1.1): `required` fields are plain fields and always emitted;
//! `optional` fields are `Option` and emitted only when set; oneofs are `Option<enum>`; the one
//! repeated enum on the path (`ranking_factors`) is encoded unpacked, and prost decodes both
//! forms. Enums are carried as `i32` so unknown values survive decoding. Decoding is lenient
//! like prost is for Actrix: a missing required field takes its zero value.
//!
//! The messages shared with the AIS ([`ActrId`], [`ActrType`], [`Realm`], [`AIdCredential`],
//! [`ErrorResponse`], [`Timestamp`], [`RegisterRequest`] with its [`ServiceSpec`] and [`Acl`],
//! [`RegisterResponse`]) are re-exported from the control crate so both sides use one
//! definition; this module defines only the messages of the signaling flows.

pub use actrix_control::ais::proto::{
    acl_rule, actr_id_string, actr_type_string, register_response, service_spec, AIdCredential,
    Acl, AclRule, ActrId, ActrType, ErrorResponse, Realm, RegisterRequest, RegisterResponse,
    ServiceSpec, Timestamp,
};

/// `actr.ServiceAvailabilityState` values (lower is healthier).
pub mod availability {
    pub const FULL: i32 = 0;
    pub const DEGRADED: i32 = 1;
    pub const OVERLOADED: i32 = 2;
    pub const UNAVAILABLE: i32 = 3;
}

/// `actr.ServiceDependencyState` values.
pub mod dependency {
    pub const HEALTHY: i32 = 0;
    pub const WARNING: i32 = 1;
    pub const BROKEN: i32 = 2;
}

/// `actr.CompatibilityLevel` values.
pub mod compat_level {
    pub const FULLY_COMPATIBLE: i32 = 0;
    pub const BACKWARD_COMPATIBLE: i32 = 1;
    pub const BREAKING_CHANGES: i32 = 2;
}

/// `RouteCandidatesRequest.NodeSelectionCriteria.NodeRankingFactor` values.
pub mod ranking {
    pub const MAXIMUM_POWER_RESERVE: i32 = 0;
    pub const MINIMUM_MAILBOX_BACKLOG: i32 = 1;
    pub const BEST_COMPATIBILITY: i32 = 2;
    pub const NEAREST: i32 = 3;
    pub const CLIENT_AFFINITY: i32 = 4;
}

/// `actr.ServiceLocation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceLocation {
    #[prost(string, optional, tag = "1")]
    pub region: Option<String>,
    #[prost(double, optional, tag = "2")]
    pub latitude: Option<f64>,
    #[prost(double, optional, tag = "3")]
    pub longitude: Option<f64>,
}

/// `actr.CredentialUpdateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredentialUpdateRequest {
    #[prost(message, required, tag = "1")]
    pub actr_id: ActrId,
}

/// `actr.UnregisterRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnregisterRequest {
    #[prost(message, required, tag = "1")]
    pub actr_id: ActrId,
    #[prost(string, optional, tag = "2")]
    pub reason: Option<String>,
}

/// An empty message (`UnregisterOk`, `SubscribeOk`, `UnsubscribeOk`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// `actr.UnregisterResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnregisterResponse {
    #[prost(oneof = "EmptyResult", tags = "1, 2")]
    pub result: Option<EmptyResult>,
}

/// `actr.SubscribeActrUpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribeActrUpResponse {
    #[prost(oneof = "EmptyResult", tags = "1, 2")]
    pub result: Option<EmptyResult>,
}

/// `actr.UnsubscribeActrUpResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnsubscribeActrUpResponse {
    #[prost(oneof = "EmptyResult", tags = "1, 2")]
    pub result: Option<EmptyResult>,
}

/// oneof `result` of the responses whose success is an empty message.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EmptyResult {
    #[prost(message, tag = "1")]
    Success(Empty),
    #[prost(message, tag = "2")]
    Error(ErrorResponse),
}

/// `actr.Ping`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(int32, required, tag = "1")]
    pub availability: i32,
    #[prost(float, required, tag = "2")]
    pub power_reserve: f32,
    #[prost(float, required, tag = "3")]
    pub mailbox_backlog: f32,
    #[prost(string, repeated, tag = "4")]
    pub sticky_client_ids: Vec<String>,
}

/// `actr.Pong`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    #[prost(uint64, required, tag = "1")]
    pub seq: u64,
    #[prost(uint32, optional, tag = "2")]
    pub suggest_interval_secs: Option<u32>,
    #[prost(message, optional, tag = "3")]
    pub credential_warning: Option<CredentialWarning>,
}

/// `actr.CredentialWarning`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CredentialWarning {
    /// `WarningType`: KEY_IN_TOLERANCE_PERIOD = 0.
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    #[prost(string, required, tag = "2")]
    pub message: String,
}

/// `actr.DiscoveryRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DiscoveryRequest {
    #[prost(string, optional, tag = "1")]
    pub manufacturer: Option<String>,
    /// Declared default 64.
    #[prost(uint32, optional, tag = "2", default = "64")]
    pub limit: Option<u32>,
}

/// `actr.DiscoveryResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DiscoveryResponse {
    #[prost(oneof = "discovery_response::Result", tags = "1, 2")]
    pub result: Option<discovery_response::Result>,
}

/// Nested types of [`DiscoveryResponse`].
pub mod discovery_response {
    /// `DiscoveryResponse.DiscoveryOk`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DiscoveryOk {
        #[prost(message, repeated, tag = "1")]
        pub entries: Vec<TypeEntry>,
    }

    /// `DiscoveryResponse.TypeEntry`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeEntry {
        #[prost(message, required, tag = "1")]
        pub actr_type: super::ActrType,
        #[prost(string, required, tag = "2")]
        pub name: String,
        #[prost(string, optional, tag = "3")]
        pub description: Option<String>,
        #[prost(string, required, tag = "4")]
        pub service_fingerprint: String,
        #[prost(int64, optional, tag = "5")]
        pub published_at: Option<i64>,
        #[prost(string, repeated, tag = "6")]
        pub tags: Vec<String>,
    }

    /// oneof `result`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "1")]
        Success(DiscoveryOk),
        #[prost(message, tag = "2")]
        Error(super::ErrorResponse),
    }
}

/// `actr.RouteCandidatesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteCandidatesRequest {
    #[prost(message, required, tag = "1")]
    pub target_type: ActrType,
    #[prost(message, optional, tag = "2")]
    pub criteria: Option<route_candidates_request::NodeSelectionCriteria>,
    #[prost(message, optional, tag = "3")]
    pub client_location: Option<ServiceLocation>,
    #[prost(string, required, tag = "4")]
    pub client_fingerprint: String,
}

/// Nested types of [`RouteCandidatesRequest`].
pub mod route_candidates_request {
    /// `NodeSelectionCriteria`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeSelectionCriteria {
        #[prost(uint32, required, tag = "1")]
        pub candidate_count: u32,
        /// proto2 repeated enum: unpacked on the wire.
        #[prost(int32, repeated, packed = "false", tag = "2")]
        pub ranking_factors: Vec<i32>,
        #[prost(int32, optional, tag = "3")]
        pub minimal_dependency_requirement: Option<i32>,
        #[prost(int32, optional, tag = "4")]
        pub minimal_health_requirement: Option<i32>,
    }
}

/// `actr.RouteCandidatesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RouteCandidatesResponse {
    #[prost(oneof = "route_candidates_response::Result", tags = "1, 2")]
    pub result: Option<route_candidates_response::Result>,
}

/// Nested types of [`RouteCandidatesResponse`].
pub mod route_candidates_response {
    /// `RouteCandidatesOk`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RouteCandidatesOk {
        #[prost(message, repeated, tag = "1")]
        pub candidates: Vec<super::ActrId>,
        #[prost(message, repeated, tag = "2")]
        pub compatibility_info: Vec<super::CandidateCompatibilityInfo>,
        #[prost(bool, optional, tag = "3")]
        pub has_exact_match: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub is_sub_healthy: Option<bool>,
        #[prost(message, repeated, tag = "5")]
        pub ws_address_map: Vec<super::WsAddressEntry>,
    }

    /// oneof `result`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "1")]
        Success(RouteCandidatesOk),
        #[prost(message, tag = "2")]
        Error(super::ErrorResponse),
    }
}

/// `actr.CandidateCompatibilityInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CandidateCompatibilityInfo {
    #[prost(message, required, tag = "1")]
    pub candidate_id: ActrId,
    #[prost(string, required, tag = "2")]
    pub candidate_fingerprint: String,
    #[prost(message, optional, tag = "3")]
    pub analysis_result: Option<CompatibilityAnalysisResult>,
    #[prost(bool, optional, tag = "4", default = "false")]
    pub is_exact_match: Option<bool>,
    #[prost(string, optional, tag = "5")]
    pub ws_address: Option<String>,
}

/// `actr.CompatibilityAnalysisResult`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CompatibilityAnalysisResult {
    #[prost(int32, required, tag = "1")]
    pub level: i32,
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<ProtocolChange>,
    #[prost(message, repeated, tag = "3")]
    pub breaking_changes: Vec<ProtocolChange>,
    #[prost(string, required, tag = "4")]
    pub base_fingerprint: String,
    #[prost(string, required, tag = "5")]
    pub candidate_fingerprint: String,
    #[prost(int64, required, tag = "6")]
    pub analyzed_at: i64,
}

/// `actr.ProtocolChange`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtocolChange {
    #[prost(string, required, tag = "1")]
    pub change_type: String,
    #[prost(string, required, tag = "2")]
    pub file_name: String,
    #[prost(string, required, tag = "3")]
    pub location: String,
    #[prost(string, required, tag = "4")]
    pub description: String,
    #[prost(bool, required, tag = "5")]
    pub is_breaking: bool,
}

/// `actr.WsAddressEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WsAddressEntry {
    #[prost(message, required, tag = "1")]
    pub candidate_id: ActrId,
    #[prost(string, optional, tag = "2")]
    pub ws_address: Option<String>,
}

/// `actr.GetServiceSpecRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetServiceSpecRequest {
    #[prost(string, required, tag = "1")]
    pub name: String,
}

/// `actr.GetServiceSpecResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetServiceSpecResponse {
    #[prost(oneof = "get_service_spec_response::Result", tags = "1, 2")]
    pub result: Option<get_service_spec_response::Result>,
}

/// Nested types of [`GetServiceSpecResponse`].
pub mod get_service_spec_response {
    /// oneof `result`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "1")]
        Success(super::ServiceSpec),
        #[prost(message, tag = "2")]
        Error(super::ErrorResponse),
    }
}

/// `actr.SubscribeActrUpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SubscribeActrUpRequest {
    #[prost(message, required, tag = "1")]
    pub target_type: ActrType,
}

/// `actr.UnsubscribeActrUpRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UnsubscribeActrUpRequest {
    #[prost(message, required, tag = "1")]
    pub target_type: ActrType,
}

/// `actr.ActrUpEvent`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ActrUpEvent {
    #[prost(message, required, tag = "1")]
    pub actor_id: ActrId,
}

/// `actr.RoleNegotiation`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RoleNegotiation {
    #[prost(message, required, tag = "1")]
    pub from: ActrId,
    #[prost(message, required, tag = "2")]
    pub to: ActrId,
    #[prost(uint32, required, tag = "3")]
    pub realm_id: u32,
}

/// `actr.RoleAssignment`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RoleAssignment {
    #[prost(bool, required, tag = "1")]
    pub is_offerer: bool,
    #[prost(bool, optional, tag = "2", default = "false")]
    pub remote_fixed: Option<bool>,
}

/// `actr.IceRestartRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IceRestartRequest {
    #[prost(string, optional, tag = "1")]
    pub reason: Option<String>,
}

/// `webrtc.IceCandidate`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IceCandidate {
    #[prost(string, required, tag = "1")]
    pub candidate: String,
    #[prost(string, optional, tag = "2")]
    pub sdp_mid: Option<String>,
    #[prost(uint32, optional, tag = "3")]
    pub sdp_mline_index: Option<u32>,
    #[prost(string, optional, tag = "4")]
    pub username_fragment: Option<String>,
}

/// `webrtc.SessionDescription`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionDescription {
    /// OFFER = 0, ANSWER = 1, RENEGOTIATION_OFFER = 2, ICE_RESTART_OFFER = 3.
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    #[prost(string, required, tag = "2")]
    pub sdp: String,
}

/// `signaling.SignalingEnvelope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignalingEnvelope {
    #[prost(uint32, required, tag = "1")]
    pub envelope_version: u32,
    #[prost(string, required, tag = "2")]
    pub envelope_id: String,
    #[prost(string, optional, tag = "3")]
    pub reply_for: Option<String>,
    #[prost(message, required, tag = "4")]
    pub timestamp: Timestamp,
    #[prost(string, optional, tag = "5")]
    pub traceparent: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub tracestate: Option<String>,
    #[prost(oneof = "signaling_envelope::Flow", tags = "10, 11, 12, 13, 14")]
    pub flow: Option<signaling_envelope::Flow>,
}

/// Nested types of [`SignalingEnvelope`].
pub mod signaling_envelope {
    /// oneof `flow`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Flow {
        #[prost(message, tag = "10")]
        PeerToServer(super::PeerToSignaling),
        #[prost(message, tag = "11")]
        ActrToServer(super::ActrToSignaling),
        #[prost(message, tag = "12")]
        ServerToActr(super::SignalingToActr),
        #[prost(message, tag = "13")]
        ActrRelay(super::ActrRelay),
        #[prost(message, tag = "14")]
        EnvelopeError(super::ErrorResponse),
    }
}

/// `signaling.PeerToSignaling`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerToSignaling {
    #[prost(oneof = "peer_to_signaling::Payload", tags = "1")]
    pub payload: Option<peer_to_signaling::Payload>,
}

/// Nested types of [`PeerToSignaling`].
pub mod peer_to_signaling {
    /// oneof `payload`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        RegisterRequest(super::RegisterRequest),
    }
}

/// `signaling.ActrToSignaling`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ActrToSignaling {
    #[prost(message, required, tag = "1")]
    pub source: ActrId,
    #[prost(message, required, tag = "2")]
    pub credential: AIdCredential,
    #[prost(
        oneof = "actr_to_signaling::Payload",
        tags = "3, 4, 5, 10, 11, 12, 20, 21, 30"
    )]
    pub payload: Option<actr_to_signaling::Payload>,
}

/// Nested types of [`ActrToSignaling`].
pub mod actr_to_signaling {
    /// oneof `payload`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "3")]
        UnregisterRequest(super::UnregisterRequest),
        #[prost(message, tag = "4")]
        Ping(super::Ping),
        #[prost(message, tag = "5")]
        CredentialUpdateRequest(super::CredentialUpdateRequest),
        #[prost(message, tag = "10")]
        DiscoveryRequest(super::DiscoveryRequest),
        #[prost(message, tag = "11")]
        RouteCandidatesRequest(super::RouteCandidatesRequest),
        #[prost(message, tag = "12")]
        GetServiceSpecRequest(super::GetServiceSpecRequest),
        #[prost(message, tag = "20")]
        SubscribeActrUpRequest(super::SubscribeActrUpRequest),
        #[prost(message, tag = "21")]
        UnsubscribeActrUpRequest(super::UnsubscribeActrUpRequest),
        #[prost(message, tag = "30")]
        Error(super::ErrorResponse),
    }
}

/// `signaling.SignalingToActr`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignalingToActr {
    #[prost(message, required, tag = "1")]
    pub target: ActrId,
    #[prost(
        oneof = "signaling_to_actr::Payload",
        tags = "2, 3, 4, 10, 11, 12, 20, 21, 22, 30"
    )]
    pub payload: Option<signaling_to_actr::Payload>,
}

/// Nested types of [`SignalingToActr`].
pub mod signaling_to_actr {
    /// oneof `payload`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "2")]
        RegisterResponse(super::RegisterResponse),
        #[prost(message, tag = "3")]
        UnregisterResponse(super::UnregisterResponse),
        #[prost(message, tag = "4")]
        Pong(super::Pong),
        #[prost(message, tag = "10")]
        DiscoveryResponse(super::DiscoveryResponse),
        #[prost(message, tag = "11")]
        RouteCandidatesResponse(super::RouteCandidatesResponse),
        #[prost(message, tag = "12")]
        GetServiceSpecResponse(super::GetServiceSpecResponse),
        #[prost(message, tag = "20")]
        SubscribeActrUpResponse(super::SubscribeActrUpResponse),
        #[prost(message, tag = "21")]
        UnsubscribeActrUpResponse(super::UnsubscribeActrUpResponse),
        #[prost(message, tag = "22")]
        ActrUpEvent(super::ActrUpEvent),
        #[prost(message, tag = "30")]
        Error(super::ErrorResponse),
    }
}

/// `signaling.ActrRelay`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ActrRelay {
    #[prost(message, required, tag = "1")]
    pub source: ActrId,
    #[prost(message, required, tag = "2")]
    pub credential: AIdCredential,
    #[prost(message, required, tag = "3")]
    pub target: ActrId,
    #[prost(oneof = "actr_relay::Payload", tags = "10, 11, 12, 13, 14")]
    pub payload: Option<actr_relay::Payload>,
}

/// Nested types of [`ActrRelay`].
pub mod actr_relay {
    /// oneof `payload`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "10")]
        IceCandidate(super::IceCandidate),
        #[prost(message, tag = "11")]
        SessionDescription(super::SessionDescription),
        #[prost(message, tag = "12")]
        RoleNegotiation(super::RoleNegotiation),
        #[prost(message, tag = "13")]
        RoleAssignment(super::RoleAssignment),
        #[prost(message, tag = "14")]
        IceRestartRequest(super::IceRestartRequest),
    }
}

/// `type_key` (wire section 7): the ActrType string with the version whitespace-trimmed and an
/// empty version treated as absent. The key of the ACL, the registry and discovery.
pub fn type_key(t: &ActrType) -> String {
    match t.version.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => format!("{}:{}:{}", t.manufacturer, t.name, v),
        _ => format!("{}:{}", t.manufacturer, t.name),
    }
}

/// Parse an ActrId string `{serial hex}@{realm}/{type}` (wire section 7).
pub fn parse_actr_id(s: &str) -> Option<ActrId> {
    let (serial, rest) = s.split_once('@')?;
    let (realm, ty) = rest.split_once('/')?;
    let serial_number = u64::from_str_radix(serial, 16).ok()?;
    let realm_id = realm.parse::<u32>().ok()?;
    let parts: Vec<&str> = ty.split(':').collect();
    let (manufacturer, name, version) = match parts.as_slice() {
        [m, n] => (*m, *n, None),
        [m, n, v] => (*m, *n, Some((*v).to_owned())),
        _ => return None,
    };
    if !name_rule(manufacturer) || !name_rule(name) {
        return None;
    }
    Some(ActrId {
        realm: Realm { realm_id },
        serial_number,
        r#type: ActrType {
            manufacturer: manufacturer.to_owned(),
            name: name.to_owned(),
            version,
        },
    })
}

/// The Name rule (wire section 7): non-empty, at most 32 bytes, first character alphabetic,
/// later characters alphanumeric or `-`, `_`, `.`, last character alphanumeric.
pub fn name_rule(s: &str) -> bool {
    if s.is_empty() || s.len() > 32 {
        return false;
    }
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    if !first.is_alphabetic() {
        return false;
    }
    if !s
        .chars()
        .all(|c| c.is_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return false;
    }
    s.chars().last().is_some_and(char::is_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn actr_id_string_round_trip() {
        let id = parse_actr_id("2c1873c000503@101/acme:echo:1.0.0").unwrap();
        assert_eq!(id.serial_number, 775736524801283);
        assert_eq!(actr_id_string(&id), "2c1873c000503@101/acme:echo:1.0.0");
        assert!(parse_actr_id("x@1/a:b").is_none());
        assert!(parse_actr_id("1@1/a").is_none());
        assert!(parse_actr_id("1@1/a:b:c:d").is_none());
        assert!(parse_actr_id("1@1/1a:b").is_none());
    }

    #[test]
    fn required_fields_always_emitted() {
        let env = SignalingEnvelope::default();
        let bytes = env.encode_to_vec();
        // envelope_version (0x08 0x00), envelope_id (0x12 0x00), timestamp (0x22 0x00).
        assert_eq!(bytes, vec![0x08, 0x00, 0x12, 0x00, 0x22, 0x00]);
    }

    #[test]
    fn ranking_factors_unpacked_and_packed_accepted() {
        let c = route_candidates_request::NodeSelectionCriteria {
            candidate_count: 3,
            ranking_factors: vec![1, 0],
            ..Default::default()
        };
        let bytes = c.encode_to_vec();
        assert_eq!(bytes, vec![0x08, 3, 0x10, 1, 0x10, 0]);
        let packed = [0x08, 3, 0x12, 2, 1, 0];
        let d = route_candidates_request::NodeSelectionCriteria::decode(&packed[..]).unwrap();
        assert_eq!(d.ranking_factors, vec![1, 0]);
    }

    #[test]
    fn type_key_trims_version() {
        let t = ActrType {
            manufacturer: "acme".into(),
            name: "echo".into(),
            version: Some(" 1.0 ".into()),
        };
        assert_eq!(type_key(&t), "acme:echo:1.0");
        let t = ActrType {
            version: Some("  ".into()),
            ..t
        };
        assert_eq!(type_key(&t), "acme:echo");
    }
}
