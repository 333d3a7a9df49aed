//! The protobuf messages of `POST /ais/register`, written from the tables of wire reference
//! section 1 (package `actr`, proto2), and the identity types every Actrix message is built
//! from. This is the one definition of each: the signaling crate re-exports these and adds
//! only the messages of its own flows.
//!
//! proto2 semantics: `required` fields are plain (non-`Option`) fields and are always emitted,
//! `optional` fields are `Option` and emitted only when set. Decoding is lenient like prost is
//! for Actrix: a missing required field takes its zero value and unknown fields are skipped.
//!
//! [`RegisterRequest`] is modelled completely because the signaling hub reads every field of
//! it; the AIS itself uses only `actr_type` and `realm` and ignores the rest (`service_spec`,
//! `acl`, `service`, `ws_address`), though it decodes them like any other field.

use std::fmt::Write as _;

/// `actr.Realm`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Realm {
    #[prost(uint32, required, tag = "1")]
    pub realm_id: u32,
}

/// `actr.ActrType`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ActrType {
    #[prost(string, required, tag = "1")]
    pub manufacturer: String,
    #[prost(string, required, tag = "2")]
    pub name: String,
    #[prost(string, optional, tag = "3")]
    pub version: Option<String>,
}

/// `actr.ActrId`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ActrId {
    #[prost(message, required, tag = "1")]
    pub realm: Realm,
    #[prost(uint64, required, tag = "2")]
    pub serial_number: u64,
    #[prost(message, required, tag = "3")]
    pub r#type: ActrType,
}

/// `actr.AIdCredential`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AIdCredential {
    #[prost(bytes = "vec", required, tag = "1")]
    pub encrypted_token: Vec<u8>,
    #[prost(uint32, required, tag = "2")]
    pub token_key_id: u32,
}

/// `actr.ErrorResponse`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct ErrorResponse {
    #[prost(uint32, required, tag = "1")]
    pub code: u32,
    #[prost(string, required, tag = "2")]
    pub message: String,
}

/// `google.protobuf.Timestamp` (proto3: zero fields are not emitted; Actrix sets `nanos = 0`).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `actr.ServiceSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceSpec {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(string, optional, tag = "2")]
    pub description: Option<String>,
    #[prost(string, required, tag = "3")]
    pub fingerprint: String,
    #[prost(message, repeated, tag = "4")]
    pub protobufs: Vec<service_spec::Protobuf>,
    #[prost(int64, optional, tag = "5")]
    pub published_at: Option<i64>,
    #[prost(string, repeated, tag = "6")]
    pub tags: Vec<String>,
}

/// Nested types of [`ServiceSpec`].
pub mod service_spec {
    /// `ServiceSpec.Protobuf`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Protobuf {
        #[prost(string, required, tag = "1")]
        pub package: String,
        #[prost(string, required, tag = "2")]
        pub content: String,
        #[prost(string, required, tag = "3")]
        pub fingerprint: String,
    }
}

/// `actr.Acl`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Acl {
    #[prost(message, repeated, tag = "1")]
    pub rules: Vec<AclRule>,
}

/// `actr.AclRule`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AclRule {
    #[prost(message, repeated, tag = "1")]
    pub principals: Vec<acl_rule::Principal>,
    /// `AclRule.Permission`: DENY = 0, ALLOW = 1.
    #[prost(int32, required, tag = "2")]
    pub permission: i32,
}

/// Nested types of [`AclRule`].
pub mod acl_rule {
    /// `AclRule.Permission.ALLOW`.
    pub const ALLOW: i32 = 1;
    /// `AclRule.Permission.DENY`.
    pub const DENY: i32 = 0;

    /// `AclRule.Principal`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Principal {
        #[prost(message, optional, tag = "1")]
        pub realm: Option<super::Realm>,
        #[prost(message, optional, tag = "2")]
        pub actr_type: Option<super::ActrType>,
    }
}

/// `actr.RegisterRequest`, every field. The AIS reads only `actr_type` and `realm`; the
/// signaling hub reads all of them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterRequest {
    #[prost(message, required, tag = "1")]
    pub actr_type: ActrType,
    #[prost(message, required, tag = "2")]
    pub realm: Realm,
    #[prost(message, optional, tag = "3")]
    pub service_spec: Option<ServiceSpec>,
    #[prost(message, optional, tag = "4")]
    pub acl: Option<Acl>,
    #[prost(string, optional, tag = "5")]
    pub service: Option<String>,
    #[prost(string, optional, tag = "6")]
    pub ws_address: Option<String>,
}

/// `actr.RegisterResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterResponse {
    #[prost(oneof = "register_response::Result", tags = "1, 2")]
    pub result: Option<register_response::Result>,
}

/// Nested types of `RegisterResponse`.
pub mod register_response {
    /// `RegisterResponse.RegisterOk`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RegisterOk {
        #[prost(message, required, tag = "1")]
        pub actr_id: super::ActrId,
        #[prost(message, required, tag = "2")]
        pub credential: super::AIdCredential,
        #[prost(bytes = "vec", optional, tag = "3")]
        pub psk: Option<Vec<u8>>,
        #[prost(message, optional, tag = "4")]
        pub credential_expires_at: Option<super::Timestamp>,
        #[prost(uint32, required, tag = "5")]
        pub signaling_heartbeat_interval_secs: u32,
    }

    /// oneof `result`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Result {
        #[prost(message, tag = "1")]
        Success(RegisterOk),
        #[prost(message, tag = "2")]
        Error(super::ErrorResponse),
    }
}

impl RegisterResponse {
    /// An error response.
    #[must_use]
    pub fn error(code: u32, message: impl Into<String>) -> Self {
        RegisterResponse {
            result: Some(register_response::Result::Error(ErrorResponse {
                code,
                message: message.into(),
            })),
        }
    }
}

/// `manufacturer:name[:version]` (wire reference section 7); an empty version is omitted.
pub fn actr_type_string(t: &ActrType) -> String {
    match t.version.as_deref() {
        Some(v) if !v.is_empty() => format!("{}:{}:{}", t.manufacturer, t.name, v),
        _ => format!("{}:{}", t.manufacturer, t.name),
    }
}

/// `{serial hex}@{realm}/{type}` (wire reference section 7).
pub fn actr_id_string(id: &ActrId) -> String {
    let mut s = String::with_capacity(64);
    let _ = write!(
        s,
        "{:x}@{}/{}",
        id.serial_number,
        id.realm.realm_id,
        actr_type_string(&id.r#type)
    );
    s
}
