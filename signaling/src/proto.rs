//! The signaling messages of actr 0.1.7 clients (packages `signaling`, `actr` and `webrtc`,
//! proto2), re-exported from the types `actrix-wire` generates from the vendored `.proto` files
//! (wire reference section 1), plus the string forms of section 7.
//!
//! Conventions as prost implements proto2 (wire section 1.1): `required` fields are plain fields
//! and always emitted; `optional` fields are `Option` and emitted only when set; oneofs are
//! `Option<enum>`; the one repeated enum on the path (`ranking_factors`) is encoded unpacked,
//! and prost decodes both forms. Enums are carried as `i32` so unknown values survive decoding.
//! Decoding is lenient like prost is for Actrix: a missing required field takes its zero value.
//!
//! The messages shared with the AIS ([`ActrId`], [`ActrType`], [`Realm`], [`AIdCredential`],
//! [`ErrorResponse`], [`Timestamp`], [`RegisterRequest`] with its [`ServiceSpec`] and [`Acl`],
//! [`RegisterResponse`]) come through the control crate, so both sides name one definition.

pub use actrix_control::ais::proto::{
    acl_rule, actr_id_string, actr_type_string, register_error, register_response, service_spec,
    AIdCredential, Acl, AclRule, ActrId, ActrType, ErrorResponse, Realm, RegisterRequest,
    RegisterResponse, ServiceSpec, Timestamp,
};
pub use actrix_wire::v1::actr::{
    discovery_response, get_service_spec_response, route_candidates_request,
    route_candidates_response, subscribe_actr_up_response, unregister_response,
    unsubscribe_actr_up_response, ActrUpEvent, CandidateCompatibilityInfo,
    CompatibilityAnalysisResult, CredentialUpdateRequest, CredentialWarning, DiscoveryRequest,
    DiscoveryResponse, GetServiceSpecRequest, GetServiceSpecResponse, IceRestartRequest, Ping,
    Pong, ProtocolChange, RoleAssignment, RoleNegotiation, RouteCandidatesRequest,
    RouteCandidatesResponse, ServiceLocation, SubscribeActrUpRequest, SubscribeActrUpResponse,
    UnregisterRequest, UnregisterResponse, UnsubscribeActrUpRequest, UnsubscribeActrUpResponse,
    WsAddressEntry,
};
pub use actrix_wire::v1::signaling::{
    actr_relay, actr_to_signaling, peer_to_signaling, signaling_envelope, signaling_to_actr,
    ActrRelay, ActrToSignaling, PeerToSignaling, SignalingEnvelope, SignalingToActr,
};
pub use actrix_wire::v1::webrtc::{session_description, IceCandidate, SessionDescription};

use actrix_wire::v1::actr as gen;

/// `actr.ServiceAvailabilityState` values (lower is healthier), as the `i32` fields carry them.
pub mod availability {
    use super::gen::ServiceAvailabilityState as S;
    pub const FULL: i32 = S::Full as i32;
    pub const DEGRADED: i32 = S::Degraded as i32;
    pub const OVERLOADED: i32 = S::Overloaded as i32;
    pub const UNAVAILABLE: i32 = S::Unavailable as i32;
}

/// `actr.ServiceDependencyState` values.
pub mod dependency {
    use super::gen::ServiceDependencyState as S;
    pub const HEALTHY: i32 = S::Healthy as i32;
    pub const WARNING: i32 = S::Warning as i32;
    pub const BROKEN: i32 = S::Broken as i32;
}

/// `actr.CompatibilityLevel` values.
pub mod compat_level {
    use super::gen::CompatibilityLevel as L;
    pub const FULLY_COMPATIBLE: i32 = L::FullyCompatible as i32;
    pub const BACKWARD_COMPATIBLE: i32 = L::BackwardCompatible as i32;
    pub const BREAKING_CHANGES: i32 = L::BreakingChanges as i32;
}

/// `RouteCandidatesRequest.NodeSelectionCriteria.NodeRankingFactor` values.
pub mod ranking {
    use super::route_candidates_request::node_selection_criteria::NodeRankingFactor as F;
    pub const MAXIMUM_POWER_RESERVE: i32 = F::MaximumPowerReserve as i32;
    pub const MINIMUM_MAILBOX_BACKLOG: i32 = F::MinimumMailboxBacklog as i32;
    pub const BEST_COMPATIBILITY: i32 = F::BestCompatibility as i32;
    /// actr 0.4 gives number 2 to `EXACT_MATCH_FIRST`.
    pub const EXACT_MATCH_FIRST: i32 = 2;
    pub const NEAREST: i32 = F::Nearest as i32;
    pub const CLIENT_AFFINITY: i32 = F::ClientAffinity as i32;
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
