//! Moving datagrams with recvmmsg and sendmmsg, for the backends that wait for readiness and
//! then move batches themselves (mmsg, glommio).
//!
//! A round receives into successive slots and sends once at its end, straight out of the
//! receive slots: the sends of a whole round leave together, one sendmmsg per run of
//! datagrams on the same socket (replies from many relay sockets to the clients share the
//! listener's run). When fewer than `batch` slots remain, what is queued is sent early and the
//! slots reused.

use crate::shard::ShardCore;
use crate::token::SocketId;
use actrix_udp::{RecvBatch, SendBatch, SLOT_HEADROOM};
use std::os::fd::RawFd;

/// Receive slots per shard, in units of `io.batch`.
const ROUND_BATCHES: usize = 4;
/// recvmmsg calls per ready socket and round: one busy socket cannot starve the others.
const DRAIN_BUDGET: usize = 8;

pub struct Batches {
    rb: RecvBatch,
    sb: SendBatch,
    base: usize,
    batch: usize,
}

impl Batches {
    /// `control`: also receive original destinations (shared relay sockets).
    pub fn new(batch: usize, control: bool) -> Batches {
        let slots = batch * ROUND_BATCHES;
        Batches {
            rb: RecvBatch::new(slots, control),
            sb: SendBatch::new(slots),
            base: 0,
            batch,
        }
    }

    /// Drain ready socket `id` (descriptor `fd`) into the core, queueing what it answers.
    pub fn drain(&mut self, core: &mut ShardCore, id: SocketId, fd: RawFd) {
        for _ in 0..DRAIN_BUDGET {
            if self.rb.n - self.base < self.batch {
                // Out of slots mid-round: what is queued leaves early, counters first (see
                // ShardCore::end_round).
                core.publish();
                self.send(core);
            }
            let start = self.base;
            let n = match self.rb.recv(fd, start, self.batch) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    core.receive_failed(id, &e);
                    break;
                }
            };
            self.base += n;
            for i in start..start + n {
                let (from, len, truncated) = self.rb.meta(i);
                let Some(from) = from else { continue };
                if truncated {
                    core.count_truncated();
                    continue;
                }
                let to = self.rb.orig_dst(i);
                let slot = self.rb.slot_mut(i);
                let range = SLOT_HEADROOM..SLOT_HEADROOM + len;
                if let Some(out) = core.on_datagram(id, from, to, slot, range) {
                    if self.sb.is_full() {
                        continue;
                    }
                    // The slot lives in the RecvBatch buffer, which is neither moved nor
                    // reused until the SendBatch is flushed, so the pointer stays valid.
                    self.sb.push(out.fd, &out.dst, &slot[out.range]);
                }
            }
            if n < self.batch {
                break;
            }
        }
    }

    /// Send everything queued and start the slots over (at the end of a round, after
    /// `ShardCore::end_round` published the counters).
    pub fn send(&mut self, core: &mut ShardCore) {
        if self.sb.len > 0 {
            let f = self.sb.flush();
            core.account(f);
        }
        self.base = 0;
    }
}

impl crate::streams::DatagramSink for Batches {
    fn push(&mut self, out: &crate::shard::Outgoing, data: &[u8]) -> Option<actrix_udp::Flushed> {
        let early = if self.sb.is_full() {
            Some(self.sb.flush())
        } else {
            None
        };
        // `data` points into a connection's receive buffer, which stays put until flush.
        self.sb.push(out.fd, &out.dst, data);
        early
    }

    fn flush(&mut self) -> Option<actrix_udp::Flushed> {
        (self.sb.len > 0).then(|| self.sb.flush())
    }
}

/// A send batch of its own for the datagrams a backend without recvmmsg rounds (io_uring)
/// relays from stream clients: queued while a connection's frames are handled, sent with
/// sendmmsg at the end of the round (or when full).
pub struct StreamBatch {
    sb: SendBatch,
}

impl StreamBatch {
    pub fn new(n: usize) -> StreamBatch {
        StreamBatch {
            sb: SendBatch::new(n.max(1)),
        }
    }
}

impl crate::streams::DatagramSink for StreamBatch {
    fn push(&mut self, out: &crate::shard::Outgoing, data: &[u8]) -> Option<actrix_udp::Flushed> {
        let early = if self.sb.is_full() {
            Some(self.sb.flush())
        } else {
            None
        };
        self.sb.push(out.fd, &out.dst, data);
        early
    }

    fn flush(&mut self) -> Option<actrix_udp::Flushed> {
        (self.sb.len > 0).then(|| self.sb.flush())
    }
}
