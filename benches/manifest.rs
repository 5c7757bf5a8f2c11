//! Parsing one manifest file, as the file source does when that file changed.
//! Run: cargo bench --bench manifest
//!
//! `manifest/parse_100_services_1000_pods`: the file layout of
//! `benches/file_scale.py` (100 ClusterIP Services and their 10 Pods each,
//! ~220 KB of YAML), the cost of one reload after one Pod in it changed.
//! `manifest/parse_1_service_10_pods`: one Service with its Pods per file.
//! `manifest/reload_one_pod_changed_in_100_services_file`: the file source's
//! reload of that 220 KB file after one Pod in it flipped readiness, as the
//! watcher asks for it (stat, read, parse of the changed document only,
//! objects compared, one update handed out).

use std::collections::HashSet;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ringvip::config::Limits;
use ringvip::discovery::file::{parse_str, FileSource};

/// The YAML of Services `first..last` with `pods` Pods each (as file_scale.py
/// writes it).
fn documents(first: u32, last: u32, pods: u32, not_ready: Option<u32>) -> String {
    let mut out = Vec::new();
    for i in first..last {
        let ip = (10u32 << 24 | 96 << 16) + i + 10;
        out.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: ns-{}}}\n\
             spec:\n  clusterIP: {}.{}.{}.{}\n  selector: {{app: a{i}}}\n  \
             ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n",
            i % 100,
            ip >> 24,
            ip >> 16 & 255,
            ip >> 8 & 255,
            ip & 255
        ));
        for j in 0..pods {
            let k = i * pods + j;
            out.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}-{j}, namespace: ns-{}, labels: {{app: a{i}}}}}\n\
                 spec: {{nodeName: node-{}}}\nstatus:\n  podIP: 10.{}.{}.{}\n  \
                 conditions: [{{type: Ready, status: \"{}\"}}]\n",
                i % 100,
                k % 50,
                200 + (k >> 16),
                k >> 8 & 255,
                k & 255,
                if Some(k) == not_ready { "False" } else { "True" }
            ));
        }
    }
    out.join("---\n")
}

fn parse(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("manifest");
    for (name, services) in [
        ("parse_100_services_1000_pods", 100),
        ("parse_1_service_10_pods", 1),
    ] {
        let text = documents(0, services, 10, None);
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let objects =
                    parse_str("m.yaml", &text, &limits).expect("the bench's YAML is valid");
                assert_eq!(objects.len(), services as usize * 11);
                objects
            })
        });
    }
    g.finish();
}

fn reload(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("m.yaml");
    // Pod 500 (Service 50's first) ready, then not, in turn.
    let versions = [
        documents(0, 100, 10, None),
        documents(0, 100, 10, Some(500)),
    ];
    std::fs::write(&path, &versions[0]).expect("writable");
    let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
    assert_eq!(src.reload_changes().parsed, 1);
    let touched: HashSet<_> = [path.clone()].into();
    let mut turn = 0;
    c.bench_function(
        "manifest/reload_one_pod_changed_in_100_services_file",
        |b| {
            b.iter_batched(
                || {
                    turn ^= 1;
                    std::fs::write(&path, &versions[turn]).expect("writable");
                },
                |()| {
                    let r = src.reload_touched(&touched);
                    assert_eq!((r.parsed, r.updates.len()), (1, 1));
                },
                BatchSize::PerIteration,
            )
        },
    );
}

criterion_group!(benches, parse, reload);
criterion_main!(benches);
