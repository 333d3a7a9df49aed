//! The Key Server's gRPC face, `ks.v1.KeyServer` (wire reference section 3.3), for upstream
//! Actrix components (their AIS, signaling and TURN fetch keys through it): `GenerateKey`,
//! `GetSecretKey` and `HealthCheck`, generated from upstream Actrix's own `keyserver.proto`
//! (vendored in `control/wire/proto/actrix-ks-v1`) and served with tonic on its own listener
//! (`ks.grpc_listen`; upstream hard-codes `127.0.0.1:50052`).
//!
//! The same [`KsService`] answers as over HTTP, so the payload strings (`generate_key`,
//! `get_secret_key:{key_id}`), the 60 s window and the nonce store are shared: a nonce used
//! over HTTP cannot be replayed over gRPC, or the other way round. Error mapping as upstream:
//! every nonce-auth failure, replay included, is `UNAUTHENTICATED`; an unknown key or one
//! expired beyond its tolerance is `NOT_FOUND`; anything else is `INTERNAL`.

use std::net::SocketAddr;
use std::sync::Arc;

use actrix_wire::ks::v1 as pb;
use actrix_wire::ks::v1::key_server_server::{KeyServer, KeyServerServer};
use actrix_wire::supervisor::v1::NonceCredential as PbCredential;
use tonic::{Request, Response, Status};

use super::{KsError, KsService};
use crate::nonce_auth::NonceCredential;

/// The `ks.v1.KeyServer` implementation over the local KS.
#[derive(Debug, Clone)]
pub struct KsGrpc {
    svc: Arc<KsService>,
}

fn credential(c: Option<PbCredential>) -> NonceCredential {
    let c = c.unwrap_or_default();
    NonceCredential {
        timestamp: c.timestamp,
        nonce: c.nonce,
        signature: c.signature,
    }
}

fn status(e: KsError) -> Status {
    match e {
        KsError::Unauthorized | KsError::Replay | KsError::BadRequest => {
            Status::unauthenticated(e.message())
        }
        KsError::NotFound => Status::not_found(e.message()),
        KsError::Internal => Status::internal(e.message()),
    }
}

#[tonic::async_trait]
impl KeyServer for KsGrpc {
    async fn generate_key(
        &self,
        request: Request<pb::GenerateKeyRequest>,
    ) -> Result<Response<pb::GenerateKeyResponse>, Status> {
        let cred = credential(Some(request.into_inner().credential));
        let r = self.svc.clone().generate(&cred).await.map_err(status)?;
        Ok(Response::new(pb::GenerateKeyResponse {
            key_id: r.key_id,
            public_key: r.public_key,
            expires_at: r.expires_at,
            tolerance_seconds: r.tolerance_seconds,
        }))
    }

    async fn get_secret_key(
        &self,
        request: Request<pb::GetSecretKeyRequest>,
    ) -> Result<Response<pb::GetSecretKeyResponse>, Status> {
        let req = request.into_inner();
        let cred = credential(Some(req.credential));
        let r = self
            .svc
            .clone()
            .secret(req.key_id, &cred)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GetSecretKeyResponse {
            key_id: r.key_id,
            secret_key: r.secret_key.expose().to_owned(),
            expires_at: r.expires_at,
            tolerance_seconds: r.tolerance_seconds,
        }))
    }

    async fn health_check(
        &self,
        _request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let svc = self.svc.clone();
        let key_count = tokio::task::spawn_blocking(move || svc.store.key_count().unwrap_or(0))
            .await
            .unwrap_or(0);
        Ok(Response::new(pb::HealthCheckResponse {
            status: "healthy".into(),
            service: "ks".into(),
            backend: "sqlite".into(),
            key_count,
            timestamp: self.svc.clock.now_unix(),
        }))
    }
}

/// Bind `addr` now (so a busy port is an error at start), and return the server future,
/// which serves until `shutdown` resolves.
pub(crate) fn serve(
    svc: Arc<KsService>,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), std::io::Error> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let fut = async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "KS gRPC listener");
                return;
            }
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let res = tonic::transport::Server::builder()
            .add_service(KeyServerServer::new(KsGrpc { svc }))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "KS gRPC server stopped");
        }
    };
    Ok((local, fut))
}
