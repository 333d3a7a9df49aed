//! Names of the sockets a shard waits on, their 64-bit form for epoll events and io_uring
//! user data, and the changes to the set of sockets a backend waits on.

use actrix_proto::turn::Family;
use std::os::fd::RawFd;

/// A socket the backend must start or stop waiting on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Wait for it to become readable.
    Opened(SocketId, RawFd),
    /// Stop waiting (it is closed once the round is over).
    Closed(SocketId, RawFd),
    /// A stream connection: what to wait for now, readability (`read`: bytes or a hang-up)
    /// and writability (`write`). A connection is waited on from its first Interest change.
    Interest {
        id: SocketId,
        fd: RawFd,
        read: bool,
        write: bool,
    },
}

/// A socket of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SocketId {
    /// The [`actrix_udp::Waker`] other threads wake the shard with.
    Waker,
    /// The shard's socket on listen address `i`.
    Listener(u8),
    /// A relay socket: family, slot index (relay address × port), generation of the slot.
    Relay(Family, u32, u16),
    /// The shared relay socket of a family.
    Shared(Family),
    /// The shard's socket on stream (TCP, TLS) listen address `i` (an index of the stream
    /// listeners).
    StreamListener(u8),
    /// A stream connection (a client's, or an RFC 6062 peer data connection): slot,
    /// generation of the slot.
    Conn(u32, u16),
    /// The listening TCP socket of an RFC 6062 TCP allocation: slot, generation.
    RelayListener(u32, u16),
}

const WAKER: u64 = 1;
const LISTENER: u64 = 2;
const RELAY_V4: u64 = 3;
const RELAY_V6: u64 = 4;
const SHARED_V4: u64 = 5;
const SHARED_V6: u64 = 6;
const STREAM_LISTENER: u64 = 7;
const CONN: u64 = 8;
const RELAY_LISTENER: u64 = 9;

impl SocketId {
    /// Layout: kind (8 bits) | generation (16 bits) | index (32 bits). The top byte is free
    /// for a backend's own kinds (io_uring: sends and cancels), which use kinds from 0x80.
    pub fn token(self) -> u64 {
        let (kind, gen, index) = match self {
            SocketId::Waker => (WAKER, 0, 0),
            SocketId::Listener(i) => (LISTENER, 0, i as u32),
            SocketId::Relay(Family::V4, i, g) => (RELAY_V4, g, i),
            SocketId::Relay(Family::V6, i, g) => (RELAY_V6, g, i),
            SocketId::Shared(Family::V4) => (SHARED_V4, 0, 0),
            SocketId::Shared(Family::V6) => (SHARED_V6, 0, 0),
            SocketId::StreamListener(i) => (STREAM_LISTENER, 0, i as u32),
            SocketId::Conn(i, g) => (CONN, g, i),
            SocketId::RelayListener(i, g) => (RELAY_LISTENER, g, i),
        };
        (kind << 56) | ((gen as u64) << 32) | index as u64
    }

    pub fn from_token(t: u64) -> Option<SocketId> {
        let (kind, gen, index) = (t >> 56, (t >> 32) as u16, t as u32);
        Some(match kind {
            WAKER => SocketId::Waker,
            LISTENER => SocketId::Listener(index as u8),
            RELAY_V4 => SocketId::Relay(Family::V4, index, gen),
            RELAY_V6 => SocketId::Relay(Family::V6, index, gen),
            SHARED_V4 => SocketId::Shared(Family::V4),
            SHARED_V6 => SocketId::Shared(Family::V6),
            STREAM_LISTENER => SocketId::StreamListener(index as u8),
            CONN => SocketId::Conn(index, gen),
            RELAY_LISTENER => SocketId::RelayListener(index, gen),
            _ => return None,
        })
    }

    /// Datagrams on this socket come from peers (not clients).
    pub fn is_relay(self) -> bool {
        matches!(self, SocketId::Relay(..) | SocketId::Shared(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_leave_room_for_backend_kinds() {
        for id in [
            SocketId::Waker,
            SocketId::Listener(3),
            SocketId::Relay(Family::V4, 70_000, 9),
            SocketId::Relay(Family::V6, 0, u16::MAX),
            SocketId::Shared(Family::V4),
            SocketId::Shared(Family::V6),
            SocketId::StreamListener(2),
            SocketId::Conn(123_456, 7),
            SocketId::RelayListener(9, 3),
        ] {
            assert_eq!(SocketId::from_token(id.token()), Some(id));
            assert!(id.token() >> 56 < 0x80);
        }
        assert_eq!(SocketId::from_token(0x80 << 56), None);
    }
}
