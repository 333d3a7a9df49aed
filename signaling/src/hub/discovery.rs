//! Finding actors: discovery (one entry per type), service spec lookup, and route candidates
//! (wire section 8.4) with the compatibility ranking of negotiation mode, over the spec table
//! and a cache of compatibility decisions.
//!
//! Every search runs over the caller's realm only and through the ACL (caller type → candidate
//! type) before anything else looks at the candidates. The compatibility model is deliberately
//! simple (see [`analyze_compatibility`]): it compares package fingerprints and never parses
//! the protobuf sources. What it does not do: location, compatibility-score and sticky-client
//! ranking factors keep the order, as in Actrix (those fields are never populated), and a
//! dependency requirement is judged with the dependency state unknown.

use std::collections::HashMap;

use super::registry::Entry;
use super::{secs, ActorKey, ConnId, Hub, Proto};
use crate::proto::*;

const MAX_COMPAT_CACHE: usize = 10_000;
const MAX_SPECS: usize = 100_000;

/// `manufacturer:name`, the key of stored specs.
pub fn type_base(t: &ActrType) -> String {
    format!("{}:{}", t.manufacturer, t.name)
}

/// Specs kept for compatibility analysis, and the decisions made from them.
#[derive(Debug, Default)]
pub(super) struct SpecTable {
    /// (manufacturer:name, fingerprint) → spec.
    specs: HashMap<(String, String), ServiceSpec>,
    /// (base fingerprint, candidate fingerprint) → analysis.
    compat_cache: HashMap<(String, String), CompatibilityAnalysisResult>,
}

impl SpecTable {
    /// A spec loaded from the database.
    pub(super) fn insert(&mut self, base: String, spec: ServiceSpec) {
        self.specs.insert((base, spec.fingerprint.clone()), spec);
    }

    /// A spec from a registration; false (and nothing kept) when the table is full.
    pub(super) fn store(&mut self, base: String, spec: &ServiceSpec) -> bool {
        if self.specs.len() >= MAX_SPECS {
            return false;
        }
        let k = (base, spec.fingerprint.clone());
        if self.specs.get(&k) != Some(spec) {
            self.specs.insert(k, spec.clone());
        }
        true
    }

    fn get(&self, base: String, fingerprint: &str) -> Option<&ServiceSpec> {
        self.specs.get(&(base, fingerprint.to_owned()))
    }

    /// The analysis of `cand` against `base`, cached by their fingerprints.
    fn compatibility(
        &mut self,
        now_unix: u64,
        base: &ServiceSpec,
        cand: &ServiceSpec,
    ) -> CompatibilityAnalysisResult {
        let k = (base.fingerprint.clone(), cand.fingerprint.clone());
        if let Some(r) = self.compat_cache.get(&k) {
            return r.clone();
        }
        let r = analyze_compatibility(now_unix, base, cand);
        if self.compat_cache.len() >= MAX_COMPAT_CACHE {
            self.compat_cache.clear();
        }
        self.compat_cache.insert(k, r.clone());
        r
    }
}

impl Hub {
    /// Same realm, ACL applied, the first instance per type_key, at most `limit` (64).
    pub(super) fn on_discovery(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        d: DiscoveryRequest,
    ) {
        let realm = source.realm.realm_id;
        let src_key = type_key(&source.r#type);
        let limit = d.limit.unwrap_or(64) as usize;
        let proto = self.proto(conn);
        let mut seen: Vec<&str> = Vec::new();
        let mut entries = Vec::new();
        for e in self
            .registry
            .range(ActorKey::realm_range(realm))
            .map(|(_, e)| e)
        {
            if entries.len() >= limit {
                break;
            }
            if e.proto != proto {
                continue;
            }
            if let Some(m) = &d.manufacturer {
                if &e.actr_id.r#type.manufacturer != m {
                    continue;
                }
            }
            if seen.contains(&e.type_key.as_str()) {
                continue;
            }
            if !self.acl_allows(realm, &src_key, &e.type_key) {
                continue;
            }
            seen.push(&e.type_key);
            entries.push(discovery_response::TypeEntry {
                actr_type: e.actr_id.r#type.clone(),
                name: e.service_name.clone(),
                description: e.spec.as_ref().and_then(|s| s.description.clone()),
                service_fingerprint: e
                    .spec
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), |s| s.fingerprint.clone()),
                published_at: e.spec.as_ref().and_then(|s| s.published_at),
                tags: e.spec.as_ref().map(|s| s.tags.clone()).unwrap_or_default(),
            });
        }
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::DiscoveryResponse(DiscoveryResponse {
                result: Some(discovery_response::Result::Success(
                    discovery_response::DiscoveryOk { entries },
                )),
            }),
        );
    }

    /// The spec of the first instance in the caller's realm with that service name, or 404.
    pub(super) fn on_get_service_spec(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        g: GetServiceSpecRequest,
    ) {
        let spec = self
            .registry
            .range(ActorKey::realm_range(source.realm.realm_id))
            .map(|(_, e)| e)
            .find(|e| e.service_name == g.name)
            .and_then(|e| e.spec.clone());
        let result = match spec {
            Some(s) => get_service_spec_response::Result::Success(s),
            None => {
                self.stats.count_error(404);
                get_service_spec_response::Result::Error(ErrorResponse {
                    code: 404,
                    message: format!("Service specification not found for name={}", g.name),
                })
            }
        };
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::GetServiceSpecResponse(GetServiceSpecResponse {
                result: Some(result),
            }),
        );
    }

    pub(super) fn on_route_candidates(
        &mut self,
        now_unix_ms: u64,
        conn: ConnId,
        reply_for: String,
        source: ActrId,
        req: RouteCandidatesRequest,
    ) {
        let proto = self.proto(conn);
        let ok = self.route_candidates(now_unix_ms, proto, &source, &req);
        self.reply(
            now_unix_ms,
            conn,
            reply_for,
            source,
            signaling_to_actr::Payload::RouteCandidatesResponse(RouteCandidatesResponse {
                result: Some(route_candidates_response::Result::Success(ok)),
            }),
        );
    }

    /// Wire section 8.4. The instance set is restricted to the caller's realm and protocol
    /// before the version is chosen, so other instances cannot influence the answer.
    ///
    /// For a 0.4 caller (control/WIRE-0.4.md): there is no negotiation mode (0.4's
    /// `RouteCandidatesOk` has no compatibility fields; `client_fingerprint` only feeds
    /// ranking), and ranking factor 2 is `EXACT_MATCH_FIRST`: a stable sort putting the
    /// instances whose spec fingerprint equals `client_fingerprint` first.
    fn route_candidates(
        &mut self,
        now_unix_ms: u64,
        proto: Proto,
        source: &ActrId,
        req: &RouteCandidatesRequest,
    ) -> route_candidates_response::RouteCandidatesOk {
        let realm = source.realm.realm_id;
        let src_key = type_key(&source.r#type);
        let t = &req.target_type;
        // 1. Instance set: same manufacturer and name; requested version or the greatest.
        let same_name: Vec<&Entry> = self
            .registry
            .range(ActorKey::realm_range(realm))
            .map(|(_, e)| e)
            .filter(|e| {
                e.proto == proto
                    && e.actr_id.r#type.manufacturer == t.manufacturer
                    && e.actr_id.r#type.name == t.name
            })
            .collect();
        let trimmed = |e: &Entry| {
            e.actr_id
                .r#type
                .version
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let wanted = t
            .version
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        let version = match wanted {
            Some(v) => Some(v),
            None => same_name.iter().filter_map(|e| trimmed(e)).max(),
        };
        // 2. ACL filter.
        let instances: Vec<Entry> = same_name
            .into_iter()
            .filter(|e| trimmed(e) == version)
            .filter(|e| self.acl_allows(realm, &src_key, &e.type_key))
            .cloned()
            .collect();
        // 5. ws_address_map: every ACL-passing instance.
        let ws_address_map: Vec<WsAddressEntry> = instances
            .iter()
            .map(|e| WsAddressEntry {
                candidate_id: e.actr_id.clone(),
                ws_address: e.ws_address.clone(),
            })
            .collect();
        let fp = req.client_fingerprint.trim();
        if !fp.is_empty() && proto == Proto::V1 {
            // 3. Negotiation mode.
            let client_spec = self.specs.get(type_base(t), fp).cloned();
            let mut infos = Vec::new();
            let mut exact = Vec::new();
            let mut compatible: Vec<(i32, ActrId)> = Vec::new();
            for e in &instances {
                let cand_fp = e
                    .spec
                    .as_ref()
                    .map(|s| s.fingerprint.clone())
                    .unwrap_or_default();
                if !cand_fp.is_empty() && cand_fp == fp {
                    exact.push(e.actr_id.clone());
                    infos.push(CandidateCompatibilityInfo {
                        candidate_id: e.actr_id.clone(),
                        candidate_fingerprint: cand_fp,
                        analysis_result: None,
                        is_exact_match: Some(true),
                        ws_address: e.ws_address.clone(),
                    });
                    continue;
                }
                let analysis = match (&client_spec, &e.spec) {
                    (Some(base), Some(cand)) => {
                        Some(self.specs.compatibility(secs(now_unix_ms), base, cand))
                    }
                    _ => None,
                };
                if let Some(a) = &analysis {
                    if a.level != compat_level::BREAKING_CHANGES {
                        compatible.push((a.level, e.actr_id.clone()));
                    }
                }
                infos.push(CandidateCompatibilityInfo {
                    candidate_id: e.actr_id.clone(),
                    candidate_fingerprint: cand_fp,
                    analysis_result: analysis,
                    is_exact_match: Some(false),
                    ws_address: e.ws_address.clone(),
                });
            }
            let has_exact = !exact.is_empty();
            let mut candidates = if has_exact {
                exact
            } else {
                compatible.sort_by_key(|(level, _)| *level);
                compatible.into_iter().map(|(_, id)| id).collect()
            };
            let sub_healthy = !has_exact && !candidates.is_empty();
            if let Some(c) = &req.criteria {
                candidates.truncate(c.candidate_count as usize);
            }
            return route_candidates_response::RouteCandidatesOk {
                candidates,
                compatibility_info: infos,
                has_exact_match: Some(has_exact),
                is_sub_healthy: Some(sub_healthy),
                ws_address_map,
            };
        }
        // 4. Plain mode.
        let Some(criteria) = &req.criteria else {
            return route_candidates_response::RouteCandidatesOk {
                candidates: instances.iter().map(|e| e.actr_id.clone()).collect(),
                compatibility_info: Vec::new(),
                has_exact_match: None,
                is_sub_healthy: None,
                ws_address_map,
            };
        };
        let mut ranked: Vec<&Entry> = instances
            .iter()
            .filter(
                |e| match (criteria.minimal_health_requirement, e.availability) {
                    (None, _) => true,
                    (Some(min), Some(a)) => a <= min,
                    (Some(min), None) => min >= availability::DEGRADED,
                },
            )
            // Dependency state is never reported, so it is unknown for every instance.
            .filter(|_| match criteria.minimal_dependency_requirement {
                None => true,
                Some(min) => min >= dependency::WARNING,
            })
            .collect();
        for factor in &criteria.ranking_factors {
            match *factor {
                ranking::MAXIMUM_POWER_RESERVE => ranked.sort_by(|a, b| {
                    cmp_known_first(a.power_reserve, b.power_reserve, |x, y| y.total_cmp(&x))
                }),
                ranking::MINIMUM_MAILBOX_BACKLOG => ranked.sort_by(|a, b| {
                    cmp_known_first(a.mailbox_backlog, b.mailbox_backlog, |x, y| x.total_cmp(&y))
                }),
                ranking::EXACT_MATCH_FIRST if proto == Proto::V4 => ranked.sort_by_key(|e| {
                    fp.is_empty() || e.spec.as_ref().is_none_or(|s| s.fingerprint != fp)
                }),
                // Location, compatibility score and sticky ids are never populated (as in
                // Actrix): these factors keep the order.
                _ => {}
            }
        }
        ranked.truncate(criteria.candidate_count as usize);
        route_candidates_response::RouteCandidatesOk {
            candidates: ranked.iter().map(|e| e.actr_id.clone()).collect(),
            compatibility_info: Vec::new(),
            has_exact_match: None,
            is_sub_healthy: None,
            ws_address_map,
        }
    }
}

/// Known values first, ordered by `f`; unknown ones after, in their order.
fn cmp_known_first(
    a: Option<f32>,
    b: Option<f32>,
    f: impl Fn(f32, f32) -> std::cmp::Ordering,
) -> std::cmp::Ordering {
    match (a, b) {
        (Some(x), Some(y)) => f(x, y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Compatibility of a candidate's spec with the client's, decided per protobuf package from
/// the package fingerprints (a deliberately simple model, documented in the README):
/// a package of the client missing from the candidate, or present with another fingerprint,
/// is a breaking change; a package only the candidate has is a compatible addition. The level is
/// BREAKING_CHANGES if anything breaks, BACKWARD_COMPATIBLE if something was added, otherwise
/// FULLY_COMPATIBLE. `now_unix` (Unix seconds) becomes `analyzed_at`.
#[must_use]
pub fn analyze_compatibility(
    now_unix: u64,
    base: &ServiceSpec,
    cand: &ServiceSpec,
) -> CompatibilityAnalysisResult {
    let mut changes = Vec::new();
    for b in &base.protobufs {
        match cand.protobufs.iter().find(|c| c.package == b.package) {
            None => changes.push(ProtocolChange {
                change_type: "PACKAGE_REMOVED".into(),
                file_name: b.package.clone(),
                location: b.package.clone(),
                description: format!("package {} is missing from the candidate", b.package),
                is_breaking: true,
            }),
            Some(c) if c.fingerprint != b.fingerprint => changes.push(ProtocolChange {
                change_type: "PACKAGE_CHANGED".into(),
                file_name: b.package.clone(),
                location: b.package.clone(),
                description: format!(
                    "package {} fingerprint {} differs from {}",
                    b.package, c.fingerprint, b.fingerprint
                ),
                is_breaking: true,
            }),
            Some(_) => {}
        }
    }
    for c in &cand.protobufs {
        if !base.protobufs.iter().any(|b| b.package == c.package) {
            changes.push(ProtocolChange {
                change_type: "PACKAGE_ADDED".into(),
                file_name: c.package.clone(),
                location: c.package.clone(),
                description: format!("package {} was added", c.package),
                is_breaking: false,
            });
        }
    }
    let breaking_changes: Vec<ProtocolChange> =
        changes.iter().filter(|c| c.is_breaking).cloned().collect();
    let level = if !breaking_changes.is_empty() {
        compat_level::BREAKING_CHANGES
    } else if !changes.is_empty() {
        compat_level::BACKWARD_COMPATIBLE
    } else {
        compat_level::FULLY_COMPATIBLE
    };
    CompatibilityAnalysisResult {
        level,
        changes,
        breaking_changes,
        base_fingerprint: base.fingerprint.clone(),
        candidate_fingerprint: cand.fingerprint.clone(),
        analyzed_at: i64::try_from(now_unix).unwrap_or(i64::MAX),
    }
}
