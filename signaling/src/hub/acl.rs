//! The ACL (wire sections 8.6 and 9.9): per realm, which `type_key` may discover, route to,
//! relay to and hear ActrUp of which other. Default deny: only an explicit ALLOW row
//! permits; rows are unique per (realm, from, to) and the last write wins.
//!
//! Rows come from the database at start ([`super::Loaded`]) and from the `acl` of each
//! registration, which speaks for the registering type as the `to` side. What it deliberately
//! does not do: it has no wildcards, no per-serial rules and no rule order, and it ignores a
//! principal's `realm` (a rule always applies inside the registering actor's realm, so no rule
//! can open a path across realms).

use std::collections::HashMap;

use super::{Hub, Output, PersistOp};
use crate::proto::{acl_rule, type_key, Acl};

/// realm → from type_key → to type_key → allow.
#[derive(Debug, Default)]
pub(super) struct AclTable {
    rows: HashMap<u32, HashMap<String, HashMap<String, bool>>>,
}

impl AclTable {
    /// Insert or overwrite the row (realm, from, to).
    pub(super) fn set(&mut self, realm: u32, from: String, to: String, allow: bool) {
        self.rows
            .entry(realm)
            .or_default()
            .entry(from)
            .or_default()
            .insert(to, allow);
    }

    /// Whether an ALLOW row (realm, from, to) exists.
    pub(super) fn allows(&self, realm: u32, from: &str, to: &str) -> bool {
        self.rows
            .get(&realm)
            .and_then(|m| m.get(from))
            .and_then(|m| m.get(to))
            .copied()
            .unwrap_or(false)
    }
}

impl Hub {
    /// Default deny: only an explicit ALLOW row (realm, from, to) permits (wire section 8.6).
    #[must_use]
    pub fn acl_allows(&self, realm: u32, from: &str, to: &str) -> bool {
        self.acl.allows(realm, from, to)
    }

    /// The rules of a registration of `to` (its `type_key`) in `realm`: one row per principal
    /// with a type, kept and persisted.
    pub(super) fn install_acl(&mut self, realm: u32, to: &str, acl: &Acl) {
        for rule in &acl.rules {
            let allow = rule.permission == acl_rule::ALLOW;
            for p in &rule.principals {
                let Some(from) = &p.actr_type else { continue };
                let from = type_key(from);
                self.acl.set(realm, from.clone(), to.to_owned(), allow);
                self.out.push_back(Output::Persist(PersistOp::UpsertAcl {
                    realm,
                    from,
                    to: to.to_owned(),
                    allow,
                }));
            }
        }
    }
}
