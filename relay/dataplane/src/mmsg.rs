//! The mmsg backend: epoll readiness, recvmmsg and sendmmsg ([`crate::batch`]).

use crate::batch::Batches;
use crate::relays::Change;
use crate::shard::ShardCore;
use crate::token::SocketId;
use actrix_udp::Epoll;

/// Run the shard loop on the current thread until the core stops.
pub fn run(mut core: ShardCore) {
    let mut epoll = match Epoll::new(256) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(shard = %core.id, error = %e, "epoll_create failed");
            return;
        }
    };
    for (id, fd) in core.initial_sockets() {
        if let Err(e) = epoll.add(fd, id.token()) {
            tracing::error!(shard = %core.id, error = %e, "epoll add failed");
            return;
        }
    }
    let mut io = Batches::new(core.batch, core.relays.reports_destination());
    let mut ready: Vec<u64> = Vec::with_capacity(256);
    tracing::info!(shard = %core.id, backend = "mmsg", ports = %core.ports(), "shard I/O ready");
    while !core.stopping() {
        if core.pause_due() {
            core.pause();
        }
        epoll.wait(core.timeout_ms() as i32, &mut ready);
        core.begin_round();
        for &token in &ready {
            match SocketId::from_token(token) {
                Some(SocketId::Waker) => core.handle_inbox(),
                Some(id) => {
                    if let Some(fd) = core.fd_of(id) {
                        io.drain(&mut core, id, fd);
                    }
                }
                None => {}
            }
        }
        core.end_round();
        apply_changes(&mut core, &epoll);
        io.send(&mut core);
        core.relays.close_released();
    }
    core.finish();
    apply_changes(&mut core, &epoll);
    core.relays.close_released();
}

#[inline]
fn apply_changes(core: &mut ShardCore, epoll: &Epoll) {
    if !core.relays.has_changes() {
        return;
    }
    let id = core.id;
    core.relays.take_changes(|c| match c {
        Change::Opened(sock, fd) => {
            if let Err(e) = epoll.add(fd, sock.token()) {
                tracing::error!(shard = %id, error = %e, "epoll add of a relay socket failed");
            }
        }
        Change::Closed(_, fd) => epoll.del(fd),
    });
}
