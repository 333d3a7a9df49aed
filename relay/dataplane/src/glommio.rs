//! The glommio backend: each shard is a glommio `LocalExecutor` (thread-per-core, pinned to
//! the shard's core by glommio's placement), and the shard core runs as its one driving task.
//!
//! glommio's UDP sockets move one datagram per operation and copy it through glommio's own
//! buffers; it has no recvmmsg or sendmmsg. So glommio is used for what it does well, waiting:
//! each socket has a small watcher task parked in a glommio `peek` (an io_uring receive with
//! `MSG_PEEK` on a duplicate of the descriptor, one byte), which wakes the driver when the
//! socket becomes readable. The driver then moves the datagrams in batches with recvmmsg and
//! sendmmsg ([`crate::batch`]), the same code as the mmsg backend, and lets the watcher peek
//! again once the socket is drained. Timers are glommio timers; the waker is a glommio Unix
//! stream over the waker socket.
//!
//! glommio needs RLIMIT_MEMLOCK of at least 512 KiB for its rings (it refuses to start
//! otherwise) and registers `io.glommio_io_memory` bytes of buffers with each of its three
//! rings when the limit allows; the data plane checks the limit before it starts.

use crate::batch::Batches;
use crate::relays::Change;
use crate::shard::ShardCore;
use crate::token::SocketId;
use futures_lite::AsyncReadExt;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement, Task};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{FromRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// The smallest RLIMIT_MEMLOCK glommio starts with.
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Sockets found readable since the driver last looked, and one permit per wake-up.
struct Ready {
    ids: RefCell<Vec<SocketId>>,
    wake: Semaphore,
}

impl Ready {
    fn push(&self, id: SocketId) {
        self.ids.borrow_mut().push(id);
        self.wake.signal(1);
    }
}

/// A socket's watcher task (cancelled when dropped) and the gate the driver opens once it has
/// drained the socket.
struct Watcher {
    gate: Rc<Semaphore>,
    _task: Task<()>,
}

/// Run the shard on a glommio executor on the current thread. Returns the core when the
/// executor cannot be made (the caller falls back to the mmsg backend).
pub fn run(core: ShardCore, pin: Option<usize>) -> Result<(), Box<(String, ShardCore)>> {
    let placement = match pin {
        Some(c) => Placement::Fixed(c),
        None => Placement::Unbound,
    };
    let ex = match LocalExecutorBuilder::new(placement)
        .name(&format!("actrix-shard-{}", core.id))
        .io_memory(core.glommio_io_memory)
        .make()
    {
        Ok(ex) => ex,
        Err(e) => return Err(Box::new((e.to_string(), core))),
    };
    ex.run(drive(core));
    Ok(())
}

async fn drive(mut core: ShardCore) {
    let ready = Rc::new(Ready {
        ids: RefCell::new(Vec::with_capacity(256)),
        wake: Semaphore::new(0),
    });
    let mut watchers: HashMap<SocketId, Watcher> = HashMap::new();
    let mut waker_task = None;
    for (id, fd) in core.initial_sockets() {
        if id == SocketId::Waker {
            waker_task = watch_waker(&core, ready.clone());
        } else if let Some(w) = watch(id, fd, ready.clone()) {
            watchers.insert(id, w);
        }
    }
    if waker_task.is_none() {
        tracing::error!(shard = %core.id, "glommio: cannot watch the shard's waker");
        return;
    }
    let mut io = Batches::new(core.batch, core.relays.reports_destination());
    let mut round: Vec<SocketId> = Vec::with_capacity(256);
    tracing::info!(shard = %core.id, backend = "glommio", ports = %core.ports(), "shard I/O ready");
    while !core.stopping() {
        if core.pause_due() {
            if let Some(d) = core.pause_remaining() {
                glommio::timer::sleep(d).await;
            }
        }
        if ready.ids.borrow().is_empty() {
            let wait = Duration::from_millis(core.timeout_ms());
            futures_lite::future::or(
                async {
                    let _ = ready.wake.acquire(1).await;
                },
                glommio::timer::sleep(wait),
            )
            .await;
        }
        // Every wake-up is served by this round.
        let left = ready.wake.available();
        let _ = ready.wake.try_acquire(left);
        round.clear();
        round.append(&mut ready.ids.borrow_mut());
        core.begin_round();
        for &id in &round {
            if id == SocketId::Waker {
                core.handle_inbox();
                continue;
            }
            if let Some(fd) = core.fd_of(id) {
                io.drain(&mut core, id, fd);
            }
            if let Some(w) = watchers.get(&id) {
                w.gate.signal(1);
            }
        }
        core.end_round();
        apply_changes(&mut core, &mut watchers, &ready);
        io.send(&mut core);
        core.close_released();
    }
    core.finish();
    apply_changes(&mut core, &mut watchers, &ready);
    core.close_released();
}

fn apply_changes(
    core: &mut ShardCore,
    watchers: &mut HashMap<SocketId, Watcher>,
    ready: &Rc<Ready>,
) {
    if !core.has_changes() {
        return;
    }
    core.take_changes(|c| match c {
        Change::Opened(id, fd) => {
            if let Some(w) = watch(id, fd, ready.clone()) {
                watchers.insert(id, w);
            }
        }
        // Streams are not served on this backend (configuration validation refuses them).
        Change::Interest { .. } => {}
        Change::Closed(id, _) => {
            watchers.remove(&id);
        }
    });
}

/// A watcher for socket `id`: peek (wait until readable), report, wait for the driver's
/// drain, again.
fn watch(id: SocketId, fd: RawFd, ready: Rc<Ready>) -> Option<Watcher> {
    // SAFETY: duplicating a live descriptor; the glommio socket owns (and closes) the copy.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "glommio: cannot watch a socket");
        return None;
    }
    // SAFETY: `dup` is a fresh descriptor of a UDP socket that nothing else owns.
    let sock = unsafe { glommio::net::UdpSocket::from_raw_fd(dup) };
    let gate = Rc::new(Semaphore::new(0));
    let g = gate.clone();
    let task = glommio::spawn_local(async move {
        let mut byte = [0u8; 1];
        loop {
            if sock.peek_from(&mut byte).await.is_err() {
                // A pending socket error: let the driver's receive clear it, but never spin.
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            ready.push(id);
            if g.acquire(1).await.is_err() {
                return;
            }
        }
    });
    Some(Watcher { gate, _task: task })
}

/// The waker's watcher: reading the waker socket through glommio wakes the driver, which then
/// empties it and the inbox.
fn watch_waker(core: &ShardCore, ready: Rc<Ready>) -> Option<Task<()>> {
    let fd = core.waker().dup_read_end().ok()?;
    // SAFETY: a fresh duplicate of the waker's read end (a Unix stream socket) that the
    // glommio stream owns.
    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(fd) };
    Some(glommio::spawn_local(async move {
        let mut buf = [0u8; 64];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => ready.push(SocketId::Waker),
            }
        }
    }))
}

/// RLIMIT_MEMLOCK of this process (soft limit), bytes.
pub fn memlock_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return 0;
    }
    r.rlim_cur
}
