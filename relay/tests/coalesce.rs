//! Wake-up coalescing (`io.coalesce_us`) on every I/O backend: dense relay traffic is paced
//! (fewer wake-ups than datagrams, pauses counted) and still arrives complete and in order;
//! STUN transactions never pause; with the period at 0 nothing pauses.

mod common;

use actrix_proto::stun::{attr, method, Class, Message, MessageWriter};
use common::{Appliance, Launch, TurnClient};
use std::net::UdpSocket;
use std::time::Duration;

/// Sum of a counter over its shards.
fn counter(app: &Appliance, name: &str) -> f64 {
    let body = ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap();
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let samples: Vec<f64> = parsed
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is not a counter"),
        })
        .collect();
    assert!(!samples.is_empty(), "{name} missing");
    samples.iter().sum()
}

fn relayed_bursts(backend: &str, coalesce_us: u32) {
    let tmp = tempfile::tempdir().unwrap();
    // 300 Bindings back to back from one source: above the default per-source budget.
    let app = Appliance::launch(
        tmp.path(),
        &format!(
            "[io]\nbackend = \"{backend}\"\ncoalesce_us = {coalesce_us}\n[turn]\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\nidentity_credentials = false\n"
        ),
        Launch {
            sections: &[("stun", "bindings_per_source_per_sec = 100000")],
            ..Launch::default()
        },
    );
    let label = format!("{backend}/{coalesce_us}us");
    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let mut b = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let ra = a.allocate_relayed();
    let rb = b.allocate_relayed();
    // Channels both ways: b's ChannelData 0x4001 leaves b's relay for a's relay and reaches a
    // as ChannelData 0x4002.
    let (_, req) = a.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x02, 0, 0])],
        Some(rb),
    );
    a.expect_ok(&req);
    let (_, req) = b.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
        Some(ra),
    );
    b.expect_ok(&req);

    // STUN transactions back to back, closed loop: answered, and never a reason to pause.
    let pauses_before = counter(&app, "actrix_coalesce_pauses_total");
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..300u32 {
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&i.to_be_bytes());
        let mut req = [0u8; 20];
        let n = MessageWriter::new(&mut req, method::BINDING, Class::Request, &tid)
            .unwrap()
            .finish();
        probe.send_to(&req[..n], app.stun).unwrap();
        let (n, _) = probe.recv_from(&mut buf).expect("binding answered");
        assert_eq!(Message::parse(&buf[..n]).unwrap().transaction_id(), &tid);
    }
    assert_eq!(
        counter(&app, "actrix_coalesce_pauses_total"),
        pauses_before,
        "{label}: a round of STUN transactions paused"
    );

    // Dense relay traffic: bursts of 20 ChannelData every millisecond (a paced round then
    // carries up to ~60, well within the receiving test socket's default buffer).
    const BURSTS: u32 = 100;
    const PER_BURST: u32 = 20;
    let total = BURSTS * PER_BURST;
    let wakeups_before = counter(&app, "actrix_shard_wakeups_total");
    let receiver = a.sock.try_clone().unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut seqs = Vec::new();
        while let Ok((n, _)) = receiver.recv_from(&mut buf) {
            assert_eq!(&buf[..4], &[0x40, 0x02, 0x00, 0x04], "ChannelData to a");
            seqs.push(u32::from_be_bytes(buf[4..n.min(8)].try_into().unwrap()));
            if seqs.len() as u32 == total {
                break;
            }
        }
        seqs
    });
    let mut seq = 0u32;
    let started = std::time::Instant::now();
    for _ in 0..BURSTS {
        for _ in 0..PER_BURST {
            let mut cd = vec![0x40, 0x01, 0x00, 0x04];
            cd.extend_from_slice(&seq.to_be_bytes());
            b.sock.send_to(&cd, app.stun).unwrap();
            seq += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let seqs = reader.join().unwrap();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let first_gap = seqs.iter().enumerate().find(|&(i, &s)| s != i as u32);
    assert!(
        seqs.len() as u32 == total && first_gap.is_none(),
        "{label}: {} of {total} relayed; first out of place: {first_gap:?}",
        seqs.len()
    );
    let wakeups = counter(&app, "actrix_shard_wakeups_total") - wakeups_before;
    let pauses = counter(&app, "actrix_coalesce_pauses_total") - pauses_before;
    // Each datagram crosses the shard twice (client in, peer in).
    assert!(
        wakeups < (2 * total) as f64,
        "{label}: {wakeups} wake-ups for {} datagrams",
        2 * total
    );
    if coalesce_us == 0 {
        assert_eq!(pauses, 0.0, "{label}: paused with coalescing off");
    } else {
        // 100 ms of bursts 1 ms apart with a 2 ms period: the shard paced itself to about one
        // round per period (unpaced it takes at least one per burst), each carrying many
        // datagrams.
        assert!(pauses >= 10.0, "{label}: {pauses} pauses");
        assert!(
            wakeups <= elapsed_ms / 2.0 + 10.0,
            "{label}: {wakeups} wake-ups in {elapsed_ms:.0} ms"
        );
    }
}

#[test]
fn mmsg_paces_dense_relay_traffic() {
    relayed_bursts("mmsg", 2000);
}

#[test]
fn mmsg_without_coalescing_never_pauses() {
    relayed_bursts("mmsg", 0);
}

#[test]
fn io_uring_paces_dense_relay_traffic() {
    relayed_bursts("io_uring", 2000);
}

#[test]
fn io_uring_without_coalescing_never_pauses() {
    relayed_bursts("io_uring", 0);
}

#[test]
fn glommio_paces_dense_relay_traffic() {
    relayed_bursts("glommio", 2000);
}

#[test]
fn glommio_without_coalescing_never_pauses() {
    relayed_bursts("glommio", 0);
}
