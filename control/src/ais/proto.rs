//! The identity messages of actr 0.1.7 clients (package `actr`, proto2) that `POST
//! /ais/register` speaks and every Actrix message is built from, re-exported from the types
//! `actrix-wire` generates from the vendored `.proto` files (wire reference section 1). This
//! is the one place the rest of the control plane and the signaling crate take them from.
//!
//! proto2 semantics as prost implements them: `required` fields are plain (non-`Option`) fields
//! and are always emitted, `optional` fields are `Option` and emitted only when set. Decoding is
//! lenient like prost is for Actrix: a missing required field takes its zero value and unknown
//! fields are skipped.
//!
//! The AIS reads only `actr_type` and `realm` of a [`RegisterRequest`]; the signaling hub reads
//! every field.

use std::fmt::Write as _;

pub use actrix_wire::v1::actr::{
    register_response, service_spec, AIdCredential, Acl, AclRule, ActrId, ActrType, ErrorResponse,
    Realm, RegisterRequest, RegisterResponse, ServiceSpec,
};
/// `google.protobuf.Timestamp` (Actrix always sets `nanos = 0`).
pub use prost_types::Timestamp;

/// Nested types of [`AclRule`], plus the permission values as the `i32` the field carries.
pub mod acl_rule {
    pub use actrix_wire::v1::actr::acl_rule::*;
    /// `AclRule.Permission.ALLOW`.
    pub const ALLOW: i32 = Permission::Allow as i32;
    /// `AclRule.Permission.DENY`.
    pub const DENY: i32 = Permission::Deny as i32;
}

/// A `RegisterResponse` carrying an error.
#[must_use]
pub fn register_error(code: u32, message: impl Into<String>) -> RegisterResponse {
    RegisterResponse {
        result: Some(register_response::Result::Error(ErrorResponse {
            code,
            message: message.into(),
        })),
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
