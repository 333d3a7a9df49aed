//! Fixtures shared by the integration tests of this crate and of the crates mounted on it
//! (the signaling hub's): fixed test secrets, a configuration on `127.0.0.1:0`, and a probe
//! standing in for the data plane in the identity exchange.
//!
//! Not part of the API: hidden from the docs, never used by the appliance, and the secrets in
//! it are public test values.

use std::path::Path;

use crate::{ControlConfig, SecretString};

/// The shared key of [`config`].
pub const SHARED_KEY: &str = "integration-test-shared-key-0123456789";
/// The TURN REST secret of [`config`] (actr 0.4 TURN credentials).
pub const TURN_SECRET: &str = "integration-test-turn-rest-secret";
/// The key-encryption key of [`config`] (hex).
pub const KEK_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A configuration listening on 127.0.0.1:0, with `dir` as data directory, `node_id`, and the
/// fixed [`SHARED_KEY`] and [`KEK_HEX`].
pub fn config(dir: &Path, node_id: &str) -> ControlConfig {
    let mut cfg = ControlConfig {
        node_id: node_id.into(),
        data_dir: dir.to_owned(),
        ..ControlConfig::default()
    };
    cfg.http.listen = "127.0.0.1:0".parse().expect("a valid socket address");
    cfg.ks.shared_key = Some(SecretString::from(SHARED_KEY));
    cfg.ks.kek = Some(SecretString::from(KEK_HEX));
    cfg.turn_rest_secret = Some(SecretString::from(TURN_SECRET));
    cfg
}

/// The data plane's end of the identity exchange, for tests: one shard.
pub struct IdentityProbe {
    pub requests: tokio::sync::mpsc::Sender<actrix_proto::auth::IdentityRequest>,
    pub answers: crossbeam_channel::Receiver<actrix_proto::auth::IdentityAnswer>,
}

impl IdentityProbe {
    /// Connect a probe to `builder` (as shard 0).
    pub fn attach(builder: crate::ControlBuilder) -> (crate::ControlBuilder, IdentityProbe) {
        let (requests, rx) = tokio::sync::mpsc::channel(crate::IDENTITY_QUEUE);
        let (tx, answers) = crossbeam_channel::unbounded();
        (
            builder.identity(rx, vec![tx]),
            IdentityProbe { requests, answers },
        )
    }

    /// Ask about `username` and wait (10 s at most) for the answer.
    pub fn ask(
        &self,
        username: &[u8],
    ) -> Result<actrix_proto::auth::IdentityKey, actrix_proto::auth::IdentityRefusal> {
        self.requests
            .try_send(actrix_proto::auth::IdentityRequest {
                shard: actrix_proto::plan::ShardId(0),
                username: username.into(),
            })
            .expect("the control thread takes the request");
        let a = self
            .answers
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("an answer");
        assert_eq!(
            &*a.username, username,
            "the answer names the username asked"
        );
        a.outcome
    }
}
