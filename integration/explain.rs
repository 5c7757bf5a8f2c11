//! `ringvip explain` end to end: the real binary against a running ringvip's
//! admin API and against a manifest directory, text and JSON, and bad input.
//! Loopback only, no root.

mod support;

use std::process::Output;

use support::*;

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Against a running instance: the NodePort matched, each endpoint with its
/// reason (one ready here, one on another node under Local policy, one not
/// ready), and the pick.
#[test]
fn explains_a_flow_against_a_running_ringvip() {
    let (net, port, _b) = backends(3, Mode::Http);
    let node_port = free_port();
    let m = service_with(
        "web",
        "TCP",
        node_port,
        port,
        &[
            (net.ip(1), true, "node-a"),
            (net.ip(2), true, "node-b"),
            (net.ip(3), false, "node-a"),
        ],
        "  externalTrafficPolicy: Local\n",
    );
    let rv = Ringvip::start(&m, &[]);
    let admin = rv.metrics.to_string();
    let to = format!("127.0.0.1:{node_port}");
    let v = json(&command(&[
        "explain", "--admin", &admin, "-o", "json", "10.0.0.5", &to,
    ]));
    assert_eq!(v["verdict"], "forward", "{v}");
    assert_eq!(v["frontend"]["kind"], "NodePort");
    assert_eq!(v["frontend"]["policy_field"], "externalTrafficPolicy");
    assert_eq!(v["frontend"]["policy"], "Local");
    let rules: Vec<(String, String)> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().into(),
                e["rule"].as_str().unwrap().into(),
            )
        })
        .collect();
    let ep = |h| format!("{}:{port}", net.ip(h));
    assert_eq!(
        rules,
        vec![
            (ep(1), "ready".to_string()),
            (ep(2), "not_local".to_string()),
            (ep(3), "not_ready".to_string()),
        ]
    );
    assert_eq!(v["pick"], serde_json::json!([ep(1)]));

    let text = command_ok(&[
        "explain",
        "--admin",
        &admin,
        "10.0.0.5",
        &format!("{to}/tcp"),
    ]);
    assert!(text.contains("verdict:   forward"), "{text}");
    assert!(
        text.contains("default/web port p (NodePort), externalTrafficPolicy Local"),
        "{text}"
    );
    assert!(
        text.contains("on another node, and the traffic policy is Local"),
        "{text}"
    );
    assert!(text.contains(&format!("pick:      {}", ep(1))), "{text}");

    // A port nothing serves: refused, and the same address's ports listed.
    let v = json(&command(&[
        "explain",
        "--admin",
        &admin,
        "-o",
        "json",
        "10.0.0.5",
        "127.0.0.1:1/udp",
    ]));
    assert_eq!(v["verdict"], "refuse");
    assert_eq!(
        v["same_address"],
        serde_json::json!([format!("{node_port}/TCP default/web (NodePort)")])
    );
}

/// Bad input is an error with exit code 2 and a message; the admin API
/// answers bad parameters with 400 and keeps serving.
#[test]
fn bad_input_is_a_clear_error() {
    let (net, port, _b) = backends(1, Mode::Http);
    let node_port = free_port();
    let rv = Ringvip::start(
        &nodeport_service("web", node_port, port, &[net.ip(1)], ""),
        &[],
    );
    let admin = rv.metrics.to_string();
    for (args, says) in [
        (vec!["nope", "10.96.0.10:80"], "bad client address \"nope\""),
        (
            vec!["10.0.0.5", "10.96.0.10"],
            "bad destination \"10.96.0.10\"",
        ),
        (
            vec!["10.0.0.5", "10.96.0.10:80/sctp"],
            "unknown protocol \"sctp\"",
        ),
    ] {
        let mut all = vec!["explain", "--admin", &admin];
        all.extend(args.iter());
        let out = command(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let r = admin_get(rv.metrics, "/api/explain?client=10.0.0.5&to=nowhere");
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(r.contains("bad destination"), "{r}");
    let r = admin_get(
        rv.metrics,
        "/api/explain?client=10.0.0.5&to=127.0.0.1:1&colour=red",
    );
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("unknown parameter"),
        "{r}"
    );
    // Still serving, and a ringvip that is not there is an error too.
    assert!(admin_get(rv.metrics, "/metrics").starts_with("HTTP/1.1 200"));
    drop(rv);
    let out = command(&["explain", "--admin", &admin, "10.0.0.5", "10.96.0.10:80"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// Against a manifest directory: compiled as `run` would for the node the
/// flags name (here node-a, zone-a: topology hints apply to the ClusterIP).
#[test]
fn explains_a_flow_against_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let m = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  clusterIP: 10.96.0.20\n  internalTrafficPolicy: Cluster\n  sessionAffinity: ClientIP\n  ports: [{name: pg, port: 5432, protocol: TCP}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{name: pg, port: 5432, protocol: TCP}]\nendpoints:\n- addresses: [10.1.0.1]\n  conditions: {ready: true}\n  hints: {forZones: [{name: zone-a}]}\n- addresses: [10.1.0.2]\n  conditions: {ready: true}\n  hints: {forZones: [{name: zone-b}]}\n- addresses: [10.1.0.3]\n  conditions: {ready: false, serving: true, terminating: true}\n  hints: {forZones: [{name: zone-a}]}\n";
    std::fs::write(dir.path().join("db.yaml"), m).unwrap();
    let d = dir.path().to_str().unwrap();
    let args = [
        "explain",
        "--manifests",
        d,
        "--node-name",
        "node-a",
        "--zone",
        "zone-a",
        "-o",
        "json",
        "10.0.0.5",
        "10.96.0.20:5432",
    ];
    let v = json(&command(&args));
    assert_eq!(v["verdict"], "forward", "{v}");
    assert_eq!(v["frontend"]["namespace"], "shop");
    assert_eq!(v["frontend"]["zone"], "zone-a");
    let rules: Vec<&str> = v["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules, vec!["ready", "other_zone", "terminating_not_needed"]);
    assert_eq!(v["pick"], serde_json::json!(["10.1.0.1:5432"]));
    assert_eq!(v["affinity"]["endpoint"], serde_json::Value::Null);
    // A manifest that does not parse is reported; the rest is explained.
    std::fs::write(dir.path().join("bad.yaml"), "kind: Service\nmetadata: [\n").unwrap();
    let out = command(&args);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.yaml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["verdict"], "forward");
}
