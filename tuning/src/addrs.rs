//! Interface addresses. sysfs does not carry IP addresses, so they come from the
//! caller: [`live_addresses`] asks the kernel (`getifaddrs`), [`fixture_addresses`]
//! reads a recorded `addresses` file so that tests can describe a host without a
//! network namespace.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// Interface name to the addresses configured on it.
pub type InterfaceAddrs = BTreeMap<String, Vec<IpAddr>>;

/// The file under a fixture root that stands in for `getifaddrs`.
pub const FIXTURE_FILE: &str = "addresses";

/// Addresses of the running host, from `getifaddrs(3)`.
pub fn live_addresses() -> std::io::Result<InterfaceAddrs> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = InterfaceAddrs::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list returned above, not yet freed; the
        // sockaddr is only read as the concrete type its family says it is.
        unsafe {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let ip = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            };
            out.entry(name).or_default().push(ip);
        }
    }
    // SAFETY: head came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Reads `root/addresses`: one interface a line, `NAME ADDR[/PREFIX] ...`, `#`
/// comments. Unparsable addresses are skipped with a note, a missing file gives an
/// empty map with a note.
pub fn fixture_addresses(root: &Path) -> (InterfaceAddrs, Vec<String>) {
    let mut notes = Vec::new();
    let path = root.join(FIXTURE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            notes.push(format!("no interface addresses ({}: {e})", path.display()));
            return (InterfaceAddrs::new(), notes);
        }
    };
    (parse_fixture(&text, &mut notes), notes)
}

fn parse_fixture(text: &str, notes: &mut Vec<String>) -> InterfaceAddrs {
    let mut out = InterfaceAddrs::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(name) = words.next() else { continue };
        let entry = out.entry(name.to_string()).or_default();
        for word in words {
            let addr = word.split('/').next().unwrap_or(word);
            match addr.parse::<IpAddr>() {
                Ok(ip) => entry.push(ip),
                Err(_) => notes.push(format!("addresses: ignored {word:?} on {name}")),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_format() {
        let mut notes = Vec::new();
        let m = parse_fixture(
            "# comment\neth0 192.0.2.2/24 fd00::2/64\nlo 127.0.0.1 bogus\n\n",
            &mut notes,
        );
        assert_eq!(m["eth0"].len(), 2);
        assert_eq!(m["lo"], vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn live_has_loopback() {
        // Every Linux host (and network namespace) has `lo` with 127.0.0.1 once up;
        // only assert that the call works and yields well-formed data.
        let m = live_addresses().expect("getifaddrs");
        assert!(m.keys().all(|k| !k.is_empty()));
    }
}
