//! SO_REUSEPORT steering with a classic BPF program.
//!
//! Without a program the kernel picks a socket of the reuseport group by a hash of the 4-tuple
//! with a random seed. The program below makes the choice a documented, pure function of the
//! client address: `(source IP's low 32 bits + source port) mod shards`
//! ([`actrix_proto::plan::shard_of_client`]). It is stable for the
//! life of the process and lets tests and operators predict which shard serves a client.
//!
//! For UDP the program runs with the packet data positioned after the UDP header, so the
//! addresses are read relative to the network header (`SKF_NET_OFF`).

use std::io;
use std::os::fd::RawFd;

const SKF_NET_OFF: i32 = -0x100000;
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The program for a group of `shards` sockets of one address family: by source address and
/// port, or (`ip_only`) by source address alone ([`actrix_proto::plan::shard_of_client_ip`]).
pub fn program(shards: u32, ipv6: bool, ip_only: bool) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const TAX: u16 = (libc::BPF_MISC | libc::BPF_TAX) as u16;
    const ADD_X: u16 = (libc::BPF_ALU | libc::BPF_ADD | libc::BPF_X) as u16;
    const MOD_K: u16 = (libc::BPF_ALU | 0x90 | libc::BPF_K) as u16; // BPF_MOD
    const RET_A: u16 = (libc::BPF_RET | 0x10) as u16; // BPF_A
                                                      // IPv4: source address at 12, UDP header (no options) at 20. IPv6: the source's last word
                                                      // at 20, UDP header at 40.
    let (src, sport) = if ipv6 { (20, 40) } else { (12, 20) };
    if ip_only {
        return vec![
            stmt(LD_W_ABS, (SKF_NET_OFF + src) as u32),
            stmt(MOD_K, shards.max(1)),
            stmt(RET_A, 0),
        ];
    }
    vec![
        stmt(LD_W_ABS, (SKF_NET_OFF + src) as u32),
        stmt(TAX, 0),
        stmt(LD_H_ABS, (SKF_NET_OFF + sport) as u32),
        stmt(ADD_X, 0),
        stmt(MOD_K, shards.max(1)),
        stmt(RET_A, 0),
    ]
}

/// The shard a client lands on under [`program`]: [`actrix_proto::plan::shard_of_client`]
/// is the same function, computed in user space.
pub use actrix_proto::plan::{shard_of_client, shard_of_client_ip};

/// Attach the steering program to a socket of the group (it applies to the whole group).
pub fn attach(fd: RawFd, shards: u32, ipv6: bool, ip_only: bool) -> io::Result<()> {
    let mut prog = program(shards, ipv6, ip_only);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: fprog points at a live program for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
