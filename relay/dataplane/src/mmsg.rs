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
    let mut ready: Vec<(u64, u32)> = Vec::with_capacity(256);
    let mut again: Vec<SocketId> = Vec::new();
    tracing::info!(shard = %core.id, backend = "mmsg", ports = %core.ports(), "shard I/O ready");
    while !core.stopping() {
        if core.pause_due() {
            core.pause();
        }
        epoll.wait_events(core.timeout_ms() as i32, &mut ready);
        core.begin_round();
        core.take_read_again(&mut again);
        for id in again.drain(..) {
            core.read_conn(id, false, &mut io);
        }
        for &(token, events) in &ready {
            match SocketId::from_token(token) {
                Some(SocketId::Waker) => core.handle_inbox(),
                Some(SocketId::StreamListener(i)) => core.accept(i),
                Some(id @ SocketId::RelayListener(..)) => core.accept_relay(id),
                Some(id @ SocketId::Conn(..)) => {
                    if events & libc::EPOLLOUT as u32 != 0 {
                        core.write_conn(id);
                    }
                    if events & !(libc::EPOLLOUT as u32) != 0 {
                        let hangup = events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                        core.read_conn(id, hangup, &mut io);
                    }
                }
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
        core.close_released();
    }
    core.finish();
    apply_changes(&mut core, &epoll);
    core.close_released();
}

#[inline]
fn apply_changes(core: &mut ShardCore, epoll: &Epoll) {
    if !core.has_changes() {
        return;
    }
    let id_shard = core.id;
    core.take_changes(|c| match c {
        // Registered by their first Interest change.
        Change::Opened(SocketId::Conn(..), _) => {}
        Change::Opened(sock, fd) => {
            if let Err(e) = epoll.add(fd, sock.token()) {
                tracing::error!(shard = %id_shard, error = %e, "epoll add failed");
            }
        }
        Change::Interest {
            id,
            fd,
            read,
            write,
        } => {
            if let Err(e) = epoll.set(fd, id.token(), read, write) {
                tracing::error!(shard = %id_shard, error = %e, "epoll_ctl failed");
            }
        }
        Change::Closed(_, fd) => epoll.del(fd),
    });
}
