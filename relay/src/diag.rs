//! The operator's diagnostics page: `GET /diag` on the control server (and `GET /` redirecting
//! to it).
//!
//! A small self-contained page (HTML, CSS and vanilla JS embedded in the binary, no CDN) that,
//! in the operator's browser:
//! - shows the ICE server URLs a WebRTC application should use for this node, one per
//!   configured TURN transport (`turn:HOST:PORT?transport=udp`, `turn:HOST:PORT?transport=tcp`,
//!   `turns:NAME:PORT`), derived from the running configuration by [`ice_urls`] and
//!   [`stream_urls`];
//! - gathers ICE candidates against this node's STUN and the TURN URLs of the transport the
//!   user chose (policy "all" for host and server-reflexive candidates, policy "relay" for
//!   relayed ones) and lists them;
//! - connects two relay-only `RTCPeerConnection`s to each other inside the page, over that
//!   transport, and measures the round-trip time of data-channel echoes through the relay
//!   (median, min, max);
//! - polls `/metrics` every 2 s and shows a handful of the node's figures.
//!
//! Credentials are typed by the operator, or minted for the page by `GET /diag/credential`
//! when a TURN REST secret is given in [`DiagOptions::rest_secret`]: username
//! `<now + ttl>:diag`, password base64(HMAC-SHA1(secret, username)), the formula of
//! [`actrix_proto::auth::rest_password`]. Anyone who can reach that route gets a short-lived TURN
//! credential, so leave `rest_secret` at `None` unless the operator asked for it; the route
//! also refuses requests a browser marks as cross-site, so another web page cannot mint one.
//!
//! With `?auto=1` (or `#auto=1`) the page runs at once and writes its results as JSON into
//! `<pre id="result" data-done="1">`: the end-to-end test drives it that way. Parameters:
//! `user`, `pass` (prefer the `#` fragment, which never reaches the server or its logs),
//! `pings` (echo count, default 20), `transport` (`udp`, `tcp` or `tls`; the first configured
//! one by default) and `mint=1` (use a minted credential).

use actrix_proto::turn::Transport;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

const PAGE_HTML: &str = include_str!("diag/index.html");
const PAGE_JS: &str = include_str!("diag/diag.js");
const PAGE_CSS: &str = include_str!("diag/diag.css");

/// Placeholder in a STUN/TURN URL that the page replaces with the host name it was loaded
/// from (for listeners on a wildcard address).
pub const HOST_PLACEHOLDER: &str = "{host}";

/// Default lifetime of a minted credential, seconds.
pub const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 300;

/// What the diagnostics page needs to know about this node.
#[derive(Debug, Clone)]
pub struct DiagOptions {
    /// `stun:HOST:PORT` URLs of this node (see [`ice_urls`]).
    pub stun_urls: Vec<String>,
    /// `turn:HOST:PORT?transport=udp` URLs of this node.
    pub turn_urls: Vec<String>,
    /// `turn:HOST:PORT?transport=tcp` URLs of this node's TURN-over-TCP listeners (see
    /// [`stream_urls`]).
    pub turn_tcp_urls: Vec<String>,
    /// `turns:NAME:PORT` URLs of this node's TURN-over-TLS listeners.
    pub turns_urls: Vec<String>,
    /// What the TLS certificate says (shown next to the `turns:` URLs).
    pub tls: TlsNames,
    /// The addresses this node listens on for STUN/TURN clients, with their transport (UDP
    /// listeners first, then the stream listeners, as configured).
    pub listeners: Vec<(Transport, SocketAddr)>,
    /// The current TURN REST secret; `Some` enables `GET /diag/credential`.
    pub rest_secret: Option<String>,
    /// Lifetime of a minted credential, seconds (0 means [`DEFAULT_CREDENTIAL_TTL_SECS`]).
    pub credential_ttl_secs: u64,
}

impl Default for DiagOptions {
    fn default() -> Self {
        DiagOptions {
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_tcp_urls: Vec::new(),
            turns_urls: Vec::new(),
            tls: TlsNames::default(),
            listeners: Vec::new(),
            rest_secret: None,
            credential_ttl_secs: DEFAULT_CREDENTIAL_TTL_SECS,
        }
    }
}

/// The IP a client reaches listener `l` at: its own, or for a wildcard listener the `public`
/// address of its family (None without one).
fn reachable_ip(l: &SocketAddr, public: &[IpAddr]) -> Option<IpAddr> {
    if l.ip().is_unspecified() {
        public
            .iter()
            .find(|p| p.is_ipv4() == l.is_ipv4() && !p.is_unspecified())
            .copied()
    } else {
        Some(l.ip())
    }
}

/// The host part of a URL for `ip` (IPv6 in brackets), or [`HOST_PLACEHOLDER`].
fn url_host(ip: Option<IpAddr>) -> String {
    match ip {
        None => HOST_PLACEHOLDER.to_string(),
        Some(IpAddr::V6(v6)) => format!("[{v6}]"),
        Some(v4) => v4.to_string(),
    }
}

/// STUN and TURN URLs for a set of UDP listeners. A listener on a wildcard address gets the
/// `public` address of its family (the advertised relay address, say) as host, or, without
/// one, [`HOST_PLACEHOLDER`], which the page replaces with the host it was loaded from.
pub fn ice_urls(listen: &[SocketAddr], public: &[IpAddr]) -> (Vec<String>, Vec<String>) {
    let mut stun = Vec::new();
    let mut turn = Vec::new();
    for l in listen {
        let host = url_host(reachable_ip(l, public));
        let s = format!("stun:{host}:{}", l.port());
        let t = format!("turn:{host}:{}?transport=udp", l.port());
        if !stun.contains(&s) {
            stun.push(s);
            turn.push(t);
        }
    }
    (stun, turn)
}

/// What the TURN-over-TLS certificate says about the names clients may use in `turns:` URLs
/// (filled by [`crate::tls::certificate_names`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsNames {
    /// The DNS names of its subjectAltName, wildcards (`*.example.com`) included, in order.
    pub dns: Vec<String>,
    /// Those of the TLS listeners' reachable addresses it is valid for (IP subjectAltNames).
    pub ips: Vec<IpAddr>,
    /// Issued by itself (as `actrix cert --self-signed` makes them): browsers refuse it
    /// unless told to trust it.
    pub self_signed: bool,
}

/// Whether a client on another machine can use DNS name `n` for a listener at `ip`:
/// `localhost` only means this node to a client on it.
fn name_fits(n: &str, ip: Option<IpAddr>) -> bool {
    let local =
        n.eq_ignore_ascii_case("localhost") || n.to_ascii_lowercase().ends_with(".localhost");
    !n.starts_with('*') && (!local || ip.is_some_and(|ip| ip.is_loopback()))
}

/// TURN URLs for the stream listeners: `turn:HOST:PORT?transport=tcp` for TCP and
/// `turns:NAME:PORT` for TLS (TCP is implied by `turns:`, RFC 7065). Hosts are found as in
/// [`ice_urls`]. A TLS client checks the certificate against the name in the URL, so a
/// `turns:` URL names the first DNS name of the certificate a remote client can use (not a
/// wildcard, not `localhost` unless the listener is on loopback); without one, the
/// listener's address, which the certificate may be valid for ([`TlsNames::ips`]; the page
/// warns when it is not).
pub fn stream_urls(
    streams: &[(SocketAddr, Transport)],
    public: &[IpAddr],
    tls: &TlsNames,
) -> (Vec<String>, Vec<String>) {
    let mut tcp = Vec::new();
    let mut turns = Vec::new();
    for (l, transport) in streams {
        let ip = reachable_ip(l, public);
        let url = match transport {
            Transport::Tcp => format!("turn:{}:{}?transport=tcp", url_host(ip), l.port()),
            Transport::Tls => {
                let host = match tls.dns.iter().find(|n| name_fits(n, ip)) {
                    Some(name) => name.clone(),
                    None => url_host(ip),
                };
                format!("turns:{host}:{}", l.port())
            }
            Transport::Udp | Transport::Dtls => continue,
        };
        let list = if *transport == Transport::Tcp {
            &mut tcp
        } else {
            &mut turns
        };
        if !list.contains(&url) {
            list.push(url);
        }
    }
    (tcp, turns)
}

/// A TURN REST credential minted for the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
    pub ttl: u64,
}

/// Mint a REST credential valid `ttl` seconds from `now_unix`: username `<now+ttl>:diag`,
/// password base64(HMAC-SHA1(secret, username)).
pub fn mint_credential(secret: &str, ttl: u64, now_unix: u64) -> Credential {
    let ttl = if ttl == 0 {
        DEFAULT_CREDENTIAL_TTL_SECS
    } else {
        ttl
    };
    let username = format!("{}:diag", now_unix.saturating_add(ttl));
    let password = actrix_proto::auth::rest_password(secret.as_bytes(), username.as_bytes());
    Credential {
        username,
        password,
        ttl,
    }
}

/// A JSON string literal for `s`. `<`, `>` and `&` are escaped too, so the result can sit
/// inside a `<script>` element.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}') => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| json_str(s)).collect();
    format!("[{}]", items.join(","))
}

/// The listen addresses of `transport` among `listeners`, as text.
fn listen_list(listeners: &[(Transport, SocketAddr)], transport: Transport) -> Vec<String> {
    listeners
        .iter()
        .filter(|(t, _)| *t == transport)
        .map(|(_, a)| a.to_string())
        .collect()
}

/// The page's configuration, embedded in the HTML: `listen` and `turn` hold the listen
/// addresses and the URLs of each transport (an absent transport has empty lists).
fn page_config(opts: &DiagOptions) -> String {
    let listen = |t| json_list(&listen_list(&opts.listeners, t));
    format!(
        "{{\"stun_urls\":{},\"turn\":{{\"udp\":{},\"tcp\":{},\"tls\":{}}},\
         \"listen\":{{\"udp\":{},\"tcp\":{},\"tls\":{}}},\
         \"tls_names\":{},\"tls_ips\":{},\"tls_self_signed\":{},\"credential\":{},\
         \"host_placeholder\":{}}}",
        json_list(&opts.stun_urls),
        json_list(&opts.turn_urls),
        json_list(&opts.turn_tcp_urls),
        json_list(&opts.turns_urls),
        listen(Transport::Udp),
        listen(Transport::Tcp),
        listen(Transport::Tls),
        json_list(&opts.tls.dns),
        json_list(
            &opts
                .tls
                .ips
                .iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
        ),
        opts.tls.self_signed,
        opts.rest_secret.is_some(),
        json_str(HOST_PLACEHOLDER)
    )
}

fn credential_json(c: &Credential, urls: &[String]) -> String {
    format!(
        "{{\"username\":{},\"password\":{},\"ttl\":{},\"urls\":{}}}",
        json_str(&c.username),
        json_str(&c.password),
        c.ttl,
        json_list(urls)
    )
}

/// Whether a browser says this request comes from another site (a page elsewhere fetching
/// it). Requests without these headers (curl, scripts) are not cross-site.
fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(v) = headers.get("sec-fetch-site") {
        return !matches!(v.to_str().unwrap_or(""), "same-origin" | "none");
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let authority = origin.split_once("://").map(|(_, a)| a).unwrap_or("");
        return host.is_empty() || !authority.eq_ignore_ascii_case(host);
    }
    false
}

/// The answer of `GET /diag/credential`: status and body (JSON or a short text).
fn credential_answer(
    opts: &DiagOptions,
    headers: &HeaderMap,
    now_unix: u64,
) -> (StatusCode, String) {
    let Some(secret) = &opts.rest_secret else {
        return (
            StatusCode::NOT_FOUND,
            "credential minting is disabled on this node\n".into(),
        );
    };
    if cross_site(headers) {
        return (
            StatusCode::FORBIDDEN,
            "credentials are only minted for the diagnostics page itself\n".into(),
        );
    }
    let c = mint_credential(secret, opts.credential_ttl_secs, now_unix);
    let urls: Vec<String> = opts
        .stun_urls
        .iter()
        .chain(&opts.turn_urls)
        .chain(&opts.turn_tcp_urls)
        .chain(&opts.turns_urls)
        .cloned()
        .collect();
    (StatusCode::OK, credential_json(&c, &urls))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(ctype: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(ctype)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// What the routes serve: the rendered page and the options it was made from.
struct State {
    page: String,
    opts: DiagOptions,
}

impl State {
    fn new(opts: DiagOptions) -> Arc<State> {
        Arc::new(State {
            page: PAGE_HTML.replace("{{CONFIG}}", &page_config(&opts)),
            opts,
        })
    }
}

/// Changes what a running [`router`] serves (after a configuration reload: rotated REST
/// secrets, minting switched on or off). Cheap to clone.
#[derive(Clone)]
pub struct DiagHandle(Arc<RwLock<Arc<State>>>);

impl DiagHandle {
    /// Serve `opts` from now on.
    pub fn update(&self, opts: DiagOptions) {
        let state = State::new(opts);
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn get(&self) -> Arc<State> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl std::fmt::Debug for DiagHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiagHandle").finish_non_exhaustive()
    }
}

/// The `/`, `/diag`, `/diag/diag.js`, `/diag/diag.css` and `/diag/credential` routes.
pub fn router(opts: DiagOptions) -> Router {
    router_with_handle(opts).0
}

/// [`router`], and a handle that changes its options while it runs.
pub fn router_with_handle(opts: DiagOptions) -> (Router, DiagHandle) {
    let handle = DiagHandle(Arc::new(RwLock::new(State::new(opts))));
    let page_h = handle.clone();
    let cred_h = handle.clone();
    let router = Router::new()
        .route("/", get(|| async { Redirect::temporary("/diag") }))
        .route("/diag/", get(|| async { Redirect::temporary("/diag") }))
        .route(
            "/diag",
            get(move || {
                let state = page_h.get();
                async move {
                    (
                        [
                            (
                                header::CONTENT_TYPE,
                                HeaderValue::from_static("text/html; charset=utf-8"),
                            ),
                            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                            (
                                header::CONTENT_SECURITY_POLICY,
                                HeaderValue::from_static(CSP),
                            ),
                            (
                                header::X_CONTENT_TYPE_OPTIONS,
                                HeaderValue::from_static("nosniff"),
                            ),
                            (
                                header::REFERRER_POLICY,
                                HeaderValue::from_static("no-referrer"),
                            ),
                            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
                        ],
                        state.page.clone(),
                    )
                }
            }),
        )
        .route(
            "/diag/diag.js",
            get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }),
        )
        .route(
            "/diag/diag.css",
            get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }),
        )
        .route(
            "/diag/credential",
            get(move |headers: HeaderMap| {
                let state = cred_h.get();
                async move {
                    let (status, body) = credential_answer(&state.opts, &headers, now_unix());
                    let ctype = if status == StatusCode::OK {
                        "application/json"
                    } else {
                        "text/plain; charset=utf-8"
                    };
                    (
                        status,
                        [
                            (header::CONTENT_TYPE, HeaderValue::from_static(ctype)),
                            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                        ],
                        body,
                    )
                }
            }),
        );
    (router, handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actrix_proto::auth::{AuthConfig, KeyCache, Lookup, UserKey};
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha1::Sha1;

    const SECRET: &str = "0123456789abcdef-rest";

    fn opts(secret: Option<&str>) -> DiagOptions {
        DiagOptions {
            stun_urls: vec!["stun:192.0.2.1:3478".into()],
            turn_urls: vec!["turn:192.0.2.1:3478?transport=udp".into()],
            turn_tcp_urls: vec!["turn:192.0.2.1:3478?transport=tcp".into()],
            turns_urls: vec!["turns:turn.example.net:5349".into()],
            tls: TlsNames {
                dns: vec!["turn.example.net".into()],
                ips: Vec::new(),
                self_signed: false,
            },
            listeners: vec![
                (Transport::Udp, "192.0.2.1:3478".parse().unwrap()),
                (Transport::Tcp, "192.0.2.1:3478".parse().unwrap()),
                (Transport::Tls, "0.0.0.0:5349".parse().unwrap()),
            ],
            rest_secret: secret.map(Into::into),
            credential_ttl_secs: 120,
        }
    }

    #[test]
    fn minted_password_is_hmac_sha1_of_the_username() {
        let c = mint_credential(SECRET, 120, 1_700_000_000);
        assert_eq!(c.username, "1700000120:diag");
        assert_eq!(c.ttl, 120);
        // The formula, computed independently of auth.rs.
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(c.username.as_bytes());
        let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(c.password, want);
        assert_eq!(
            c.password,
            actrix_proto::auth::rest_password(SECRET.as_bytes(), c.username.as_bytes())
        );
        // A fixed vector (Python: base64(hmac.new(secret, user, sha1).digest())).
        assert_eq!(c.password, "+dWbS9vAIXHJVG5mBTVyYrScMn8=");
        assert_eq!(
            actrix_proto::auth::rest_expiry(c.username.as_bytes()),
            Some(1_700_000_120)
        );
        // ttl 0 means the default.
        assert_eq!(
            mint_credential(SECRET, 0, 1000).username,
            format!("{}:diag", 1000 + DEFAULT_CREDENTIAL_TTL_SECS)
        );
    }

    #[test]
    fn minted_credential_is_accepted_by_the_relay_until_it_expires() {
        let now = 1_700_000_000;
        let c = mint_credential(SECRET, 120, now);
        let mut cfg = AuthConfig::new("actor-rtc.local", [3; 32]);
        cfg.rest_secrets.push(SECRET.as_bytes().into());
        let mut cache = KeyCache::new(Arc::new(cfg), 16);
        let want = UserKey::from_password(
            c.username.as_bytes(),
            b"actor-rtc.local",
            c.password.as_bytes(),
        );
        match cache.lookup(now + 60, c.username.as_bytes()) {
            Lookup::Found(found) => assert_eq!(found.key, want),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cache.lookup(now + 121, c.username.as_bytes()),
            Lookup::Refused
        ));
    }

    #[test]
    fn credential_route_answers() {
        let none = HeaderMap::new();
        let (st, _) = credential_answer(&opts(None), &none, 1000);
        assert_eq!(st, StatusCode::NOT_FOUND);

        let (st, body) = credential_answer(&opts(Some(SECRET)), &none, 1000);
        assert_eq!(st, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["username"], "1120:diag");
        assert_eq!(v["ttl"], 120);
        assert_eq!(
            v["password"],
            actrix_proto::auth::rest_password(SECRET.as_bytes(), b"1120:diag")
        );
        assert_eq!(
            v["urls"],
            serde_json::json!([
                "stun:192.0.2.1:3478",
                "turn:192.0.2.1:3478?transport=udp",
                "turn:192.0.2.1:3478?transport=tcp",
                "turns:turn.example.net:5349"
            ])
        );

        // Same-origin fetches are served; cross-site ones are not.
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert_eq!(
            credential_answer(&opts(Some(SECRET)), &h, 1000).0,
            StatusCode::OK
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(
            credential_answer(&opts(Some(SECRET)), &h, 1000).0,
            StatusCode::FORBIDDEN
        );
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("192.0.2.1:8080"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://192.0.2.1:8080"),
        );
        assert_eq!(
            credential_answer(&opts(Some(SECRET)), &h, 1000).0,
            StatusCode::OK
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            credential_answer(&opts(Some(SECRET)), &h, 1000).0,
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn json_is_escaped_for_a_script_element() {
        assert_eq!(json_str("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(json_str("</script>&"), r#""\u003c/script\u003e\u0026""#);
        assert_eq!(json_str("\u{1}"), r#""\u0001""#);
        let mut o = opts(Some(SECRET));
        o.stun_urls.push("stun:</script><b>:1".into());
        let text = page_config(&o);
        assert!(!text.contains('<'));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["stun_urls"][1], "stun:</script><b>:1");
        assert_eq!(v["turn"]["udp"][0], "turn:192.0.2.1:3478?transport=udp");
        assert_eq!(v["turn"]["tcp"][0], "turn:192.0.2.1:3478?transport=tcp");
        assert_eq!(v["turn"]["tls"][0], "turns:turn.example.net:5349");
        assert_eq!(v["tls_names"], serde_json::json!(["turn.example.net"]));
        assert_eq!(v["tls_ips"], serde_json::json!([]));
        assert_eq!(v["tls_self_signed"], false);
        assert_eq!(
            v["listen"],
            serde_json::json!({"udp": ["192.0.2.1:3478"], "tcp": ["192.0.2.1:3478"], "tls": ["0.0.0.0:5349"]})
        );
        assert_eq!(v["credential"], true);
        assert_eq!(v["host_placeholder"], HOST_PLACEHOLDER);
        // The secret itself never reaches the page.
        assert!(!text.contains(SECRET));
        assert!(PAGE_HTML.contains("{{CONFIG}}"));
    }

    #[test]
    fn urls_for_listeners() {
        let listen: Vec<SocketAddr> = vec![
            "203.0.113.7:3478".parse().unwrap(),
            "[2001:db8::7]:3479".parse().unwrap(),
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3480".parse().unwrap(),
        ];
        let (s, t) = ice_urls(&listen, &[]);
        assert_eq!(
            s,
            [
                "stun:203.0.113.7:3478",
                "stun:[2001:db8::7]:3479",
                "stun:{host}:3478",
                "stun:{host}:3480"
            ]
        );
        assert_eq!(
            t,
            [
                "turn:203.0.113.7:3478?transport=udp",
                "turn:[2001:db8::7]:3479?transport=udp",
                "turn:{host}:3478?transport=udp",
                "turn:{host}:3480?transport=udp"
            ]
        );
        // Wildcard listeners take the public address of their family when there is one.
        let public: Vec<IpAddr> = vec![
            "2001:db8::9".parse().unwrap(),
            "198.51.100.9".parse().unwrap(),
        ];
        let (s, t) = ice_urls(&listen[2..], &public);
        assert_eq!(s, ["stun:198.51.100.9:3478", "stun:[2001:db8::9]:3480"]);
        assert_eq!(t[1], "turn:[2001:db8::9]:3480?transport=udp");
    }

    #[test]
    fn urls_for_stream_listeners() {
        let streams: Vec<(SocketAddr, Transport)> = vec![
            ("203.0.113.7:3478".parse().unwrap(), Transport::Tcp),
            ("[2001:db8::7]:3478".parse().unwrap(), Transport::Tcp),
            ("0.0.0.0:443".parse().unwrap(), Transport::Tcp),
            ("203.0.113.7:5349".parse().unwrap(), Transport::Tls),
            ("[::]:5349".parse().unwrap(), Transport::Tls),
        ];
        let public: Vec<IpAddr> = vec!["198.51.100.9".parse().unwrap()];
        // A certificate with a wildcard first and a host name: the host name, for every TLS
        // listener (one URL per port).
        let named = TlsNames {
            dns: vec!["*.example.net".into(), "turn.example.net".into()],
            ips: Vec::new(),
            self_signed: false,
        };
        let (tcp, tls) = stream_urls(&streams, &public, &named);
        assert_eq!(
            tcp,
            [
                "turn:203.0.113.7:3478?transport=tcp",
                "turn:[2001:db8::7]:3478?transport=tcp",
                "turn:198.51.100.9:443?transport=tcp"
            ]
        );
        assert_eq!(tls, ["turns:turn.example.net:5349"]);

        // Only an IP subjectAltName that covers the listener: the address. The wildcard IPv6
        // listener has no public address: the page's host, which the certificate may not cover.
        let by_ip = TlsNames {
            dns: vec!["*.example.net".into()],
            ips: vec!["203.0.113.7".parse().unwrap()],
            self_signed: true,
        };
        let (_, tls) = stream_urls(&streams, &public, &by_ip);
        assert_eq!(tls, ["turns:203.0.113.7:5349", "turns:{host}:5349"]);

        // `actrix cert`'s default names: localhost only serves a loopback listener.
        let default = TlsNames {
            dns: vec!["localhost".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            self_signed: true,
        };
        let loopback: Vec<(SocketAddr, Transport)> = vec![
            ("127.0.0.1:5349".parse().unwrap(), Transport::Tls),
            ("192.0.2.4:5349".parse().unwrap(), Transport::Tls),
        ];
        let (tcp, tls) = stream_urls(&loopback, &[], &default);
        assert!(tcp.is_empty());
        assert_eq!(tls, ["turns:localhost:5349", "turns:192.0.2.4:5349"]);
        assert!(stream_urls(&[], &public, &named).1.is_empty());
    }

    /// A control server with no service of its own, on 127.0.0.1:0.
    fn control_config(dir: &std::path::Path) -> actrix_control::ControlConfig {
        let mut cfg = actrix_control::ControlConfig {
            data_dir: dir.to_owned(),
            ..Default::default()
        };
        cfg.http.listen = "127.0.0.1:0".parse().unwrap();
        cfg.services.ks = false;
        cfg.services.ais = false;
        cfg.services.signaling = false;
        cfg.ks.shared_key = Some(actrix_control::SecretString::from(
            "diag-test-shared-key-0123456789",
        ));
        cfg
    }

    /// The routes on the real control server, over HTTP.
    #[test]
    fn routes_over_http() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = control_config(dir.path());
        let h = actrix_control::spawn_with_routes(cfg, None, router(opts(Some(SECRET))))
            .expect("control server starts");
        let base = format!("http://{}", h.local_addr());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        let get = |path: &str| {
            let mut r = agent.get(format!("{base}{path}")).call().unwrap();
            let status = r.status().as_u16();
            let hdr = |k: &str| {
                r.headers()
                    .get(k)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            };
            let (ct, loc, csp) = (
                hdr("content-type"),
                hdr("location"),
                hdr("content-security-policy"),
            );
            let body = r.body_mut().read_to_string().unwrap();
            (status, ct, loc, csp, body)
        };

        let (st, _, loc, _, _) = get("/");
        assert_eq!((st, loc.as_str()), (307, "/diag"));
        let (st, ct, _, csp, body) = get("/diag");
        assert_eq!(st, 200);
        assert!(ct.starts_with("text/html"), "{ct}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(body.contains("stun:192.0.2.1:3478"));
        assert!(!body.contains("{{CONFIG}}"));
        assert!(!body.contains(SECRET));
        let (st, ct, _, _, js) = get("/diag/diag.js");
        assert_eq!(st, 200);
        assert!(ct.starts_with("text/javascript"), "{ct}");
        assert_eq!(js, PAGE_JS);
        let (st, ct, _, _, _) = get("/diag/diag.css");
        assert_eq!(st, 200);
        assert!(ct.starts_with("text/css"), "{ct}");
        let (st, ct, _, _, body) = get("/diag/credential");
        assert_eq!(st, 200);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let user = v["username"].as_str().unwrap();
        let expiry = actrix_proto::auth::rest_expiry(user.as_bytes()).unwrap();
        assert!(expiry.abs_diff(now_unix() + 120) <= 5);
        assert_eq!(
            v["password"],
            actrix_proto::auth::rest_password(SECRET.as_bytes(), user.as_bytes())
        );
        h.shutdown().unwrap();

        // Without a secret: no minting, and the page says so.
        let dir = tempfile::tempdir().unwrap();
        let cfg = control_config(dir.path());
        let (routes, handle) = router_with_handle(opts(None));
        let h = actrix_control::spawn_with_routes(cfg, None, routes).unwrap();
        let url = format!("http://{}/diag/credential", h.local_addr());
        assert_eq!(agent.get(&url).call().unwrap().status().as_u16(), 404);
        let page = |agent: &ureq::Agent| {
            agent
                .get(format!("http://{}/diag", h.local_addr()))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        };
        assert!(page(&agent).contains("\"credential\":false"));
        // A reload turns minting on (or rotates the secret) without a restart.
        handle.update(opts(Some("another-secret-0123456789")));
        let mut r = agent.get(&url).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        let user = v["username"].as_str().unwrap();
        assert_eq!(
            v["password"],
            actrix_proto::auth::rest_password(b"another-secret-0123456789", user.as_bytes())
        );
        assert!(page(&agent).contains("\"credential\":true"));
        h.shutdown().unwrap();
    }
}
