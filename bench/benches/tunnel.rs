//! The data path's pure parts: frame encode/decode, the tunnel state machine moving bulk data
//! between two connections in memory (the multiplexer's per-byte cost without sockets), and RBAC
//! evaluation of a node login.

// Benchmark set-up: a failure to build fixtures is a broken benchmark, so panicking is right.
#![allow(clippy::panic, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gatehouse_controlplane::rbac::RoleSet;
use gatehouse_controlplane::resources::{Resource, parse_document};
use gatehouse_proto::tunnel::{Config, Connection, Event, Frame, Side};

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [64usize, 16 * 1024] {
        let frame = Frame::Data {
            stream: 2,
            data: Bytes::from(vec![7u8; size]),
        };
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, f| {
            let mut out = BytesMut::with_capacity(size + 64);
            b.iter(|| {
                out.clear();
                f.encode(&mut out);
                black_box(out.len())
            })
        });
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        let wire = wire.freeze();
        g.bench_with_input(BenchmarkId::new("decode", size), &wire, |b, w| {
            b.iter(|| {
                let mut buf = BytesMut::from(&w[..]);
                black_box(Frame::decode(&mut buf, 1 << 20).unwrap())
            })
        });
    }
    g.finish();
}

/// Move `total` bytes from proxy to agent through two in-memory connections.
fn pump(total: usize, chunk: &[u8]) -> usize {
    let now = Instant::now();
    let mut proxy = Connection::new(Side::Listener, Config::default(), now);
    let mut agent = Connection::new(Side::Dialer, Config::default(), now);
    let hello = proxy.poll_transmit().unwrap();
    agent.handle_input(&hello, now).unwrap();
    let hello = agent.poll_transmit().unwrap();
    proxy.handle_input(&hello, now).unwrap();
    let id = proxy.open("tcp:sink", Bytes::new()).unwrap();
    agent
        .handle_input(&proxy.poll_transmit().unwrap(), now)
        .unwrap();
    agent.accept(id).unwrap();
    proxy
        .handle_input(&agent.poll_transmit().unwrap(), now)
        .unwrap();
    let mut sent = 0;
    let mut received = 0;
    while received < total {
        if sent < total {
            sent += proxy.send(id, chunk).unwrap();
        }
        if let Some(bytes) = proxy.poll_transmit() {
            agent.handle_input(&bytes, now).unwrap();
        }
        while let Some(ev) = agent.poll_event() {
            if let Event::Data { data, .. } = ev {
                received += data.len();
                agent.consumed(id, data.len(), now);
            }
        }
        if let Some(bytes) = agent.poll_transmit() {
            proxy.handle_input(&bytes, now).unwrap();
        }
        while proxy.poll_event().is_some() {}
    }
    received
}

fn multiplexer(c: &mut Criterion) {
    let mut g = c.benchmark_group("tunnel");
    let total = 8 << 20;
    let chunk = vec![0x42u8; 32 * 1024];
    g.throughput(Throughput::Bytes(total as u64));
    g.sample_size(20);
    g.bench_function("pump_8MiB_in_memory", |b| {
        b.iter(|| black_box(pump(total, &chunk)))
    });
    g.finish();
}

fn rbac(c: &mut Criterion) {
    let role = |text: &str| match parse_document(text).unwrap() {
        Resource::Role(r) => r,
        _ => panic!("not a role"),
    };
    let mut roles = Vec::new();
    for i in 0..8 {
        roles.push(role(&format!(
            "kind='role'\n[metadata]\nname='r{i}'\n[spec.allow]\nlogins=['{{{{internal.logins}}}}','svc{i}']\nnode_labels={{env=['prod','staging'],team='t{i}'}}\n[spec.deny]\nlogins=['root']\n"
        )));
    }
    let set = RoleSet::new(roles);
    let traits: BTreeMap<String, Vec<String>> = [(
        "logins".to_string(),
        vec!["alice".to_string(), "bob".to_string()],
    )]
    .into();
    let labels: BTreeMap<String, String> = [
        ("env".to_string(), "prod".to_string()),
        ("team".to_string(), "t7".to_string()),
    ]
    .into();
    c.bench_function("rbac_check_node_login_8_roles", |b| {
        b.iter(|| black_box(set.check_node_login(&traits, &labels, "alice")))
    });
}

criterion_group!(benches, codec, multiplexer, rbac);
criterion_main!(benches);
