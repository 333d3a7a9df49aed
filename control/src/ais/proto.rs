//! The protobuf messages of `POST /ais/register`, written from the tables of wire reference
//! section 1 (package `actr`, proto2).
//!
//! proto2 semantics: `required` fields are plain (non-`Option`) fields and are always emitted,
//! `optional` fields are `Option` and emitted only when set. Decoding is lenient like prost is
//! for Actrix: a missing required field takes its zero value and unknown fields (for example
//! `service_spec` and `acl`, which the AIS ignores) are skipped.

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

/// `actr.RegisterRequest`. Fields 3 (`service_spec`) and 4 (`acl`) are ignored by the AIS and
/// therefore not modelled; prost skips them when decoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterRequest {
    #[prost(message, required, tag = "1")]
    pub actr_type: ActrType,
    #[prost(message, required, tag = "2")]
    pub realm: Realm,
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
