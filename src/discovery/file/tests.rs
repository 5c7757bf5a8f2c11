//! Tests of the file source, from one file's text to the run loop.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::parse::doc_starts;
use super::*;
use crate::config::Limits;
use crate::discovery::convert;
use crate::discovery::{Batch, Update};
use crate::model::{
    Balance, EndpointSlice, Object, Protocol, Service, ServiceOptions, ServiceType, TargetPort,
};

fn names(objects: &[Object]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            let (kind, key) = o.id();
            convert::describe(kind, &key)
        })
        .collect()
}

fn messages(errors: &[ManifestError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// The objects of `text`, which must parse.
fn parse(origin: &str, text: &str) -> Vec<Object> {
    parse_str(origin, text, &Limits::default()).unwrap()
}

/// The errors of `text`, which must not parse.
fn parse_err(origin: &str, text: &str) -> Vec<ManifestError> {
    parse_str(origin, text, &Limits::default()).unwrap_err()
}

/// `objects[i]`, which must be a Service.
fn svc(objects: &[Object], i: usize) -> &Service {
    match &objects[i] {
        Object::Service(s) => s,
        other => panic!("not a Service: {other:?}"),
    }
}

/// `objects[i]`, which must be an EndpointSlice.
fn slice_at(objects: &[Object], i: usize) -> &EndpointSlice {
    match &objects[i] {
        Object::EndpointSlice(s) => s,
        other => panic!("not a slice: {other:?}"),
    }
}

/// `web`, the example NodePort Service: 30080 to `target`.
fn assert_web_node_port(web: &Service, target: TargetPort) {
    assert_eq!(web.service_type, ServiceType::NodePort);
    assert_eq!(web.ports[0].node_port, Some(30080));
    assert_eq!(web.ports[0].target_port, target);
}

/// The objects of `paths`, which must load without errors.
fn load_clean(paths: &[PathBuf]) -> Vec<Object> {
    let (objects, errors) = load(paths, &Limits::default());
    assert!(errors.is_empty(), "{:?}", messages(&errors));
    objects
}

/// The first error of `text`, which must not parse.
fn first_error(origin: &str, text: &str) -> String {
    parse_err(origin, text)[0].to_string()
}

/// The one error of `text`, which must not parse.
fn only_error(origin: &str, text: &str) -> ManifestError {
    let errors = parse_err(origin, text);
    assert_eq!(errors.len(), 1, "{:?}", messages(&errors));
    errors.into_iter().next().unwrap()
}

/// Service `a` on port 80 (eight lines and a separator), then `doc` in the
/// same file.
fn after_a(doc: &str) -> String {
    format!("{}---\n{doc}", service("a", 80))
}

/// The first port of the Service `objects[i]`.
fn port_of(objects: &[Object], i: usize) -> u16 {
    svc(objects, i).ports[0].port
}

/// A directory with a.yaml and b.yaml, Services a and b on port 80.
fn two_files() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    fs::write(&a, service("a", 80)).unwrap();
    fs::write(&b, service("b", 80)).unwrap();
    (dir, a, b)
}

fn service(name: &str, port: u32) -> String {
    format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: {port}\n"
        )
}

/// What `kubectl get svc,endpointslices -o yaml` prints (kubectl 1.33, kind
/// cluster), noise included.
const KUBECTL_GET: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2025-04-23T08:12:31Z"
    labels:
      component: apiserver
      provider: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "199"
    uid: 2f0a6a0e-3b0f-4d8e-9d6c-6f7d0b7f6c11
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"labels":{"app":"web"},"name":"web","namespace":"default"},"spec":{"ports":[{"name":"http","nodePort":30080,"port":80,"targetPort":"http"}],"selector":{"app":"web"},"type":"NodePort"}}
    creationTimestamp: "2025-04-23T08:20:02Z"
    labels:
      app: web
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:metadata:
          f:annotations:
            .: {}
            f:kubectl.kubernetes.io/last-applied-configuration: {}
          f:labels:
            .: {}
            f:app: {}
        f:spec:
          f:externalTrafficPolicy: {}
          f:internalTrafficPolicy: {}
          f:ports:
            .: {}
            k:{"port":80,"protocol":"TCP"}:
              .: {}
              f:name: {}
              f:nodePort: {}
              f:port: {}
              f:protocol: {}
              f:targetPort: {}
          f:selector: {}
          f:sessionAffinity: {}
          f:type: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2025-04-23T08:20:02Z"
    name: web
    namespace: default
    resourceVersion: "1043"
    uid: 8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77
  spec:
    clusterIP: 10.96.187.12
    clusterIPs:
    - 10.96.187.12
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      nodePort: 30080
      port: 80
      protocol: TCP
      targetPort: http
    selector:
      app: web
    sessionAffinity: None
    type: NodePort
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2025-04-23T08:21:40Z"
    name: db
    namespace: shop
    resourceVersion: "1101"
    uid: 0b9b2c1e-8f0e-4c38-a0c5-2d0b5a3b1e42
  spec:
    clusterIP: None
    clusterIPs:
    - None
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: pg
      port: 5432
      protocol: TCP
      targetPort: 5432
    selector:
      app: db
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 172.18.0.2
    conditions:
      ready: true
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2025-04-23T08:12:31Z"
    generation: 1
    labels:
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
    resourceVersion: "201"
    uid: 7b0f3f0c-5d3c-4b8a-8f0e-1c1d2e3f4a5b
  ports:
  - name: https
    port: 6443
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 10.244.1.7
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: kind-worker
    targetRef:
      kind: Pod
      name: web-6d4cf56db6-4xk8p
      namespace: default
      uid: 3c7e9d10-6a4b-4f0e-9a2b-5e6f7a8b9c0d
    zone: zone-a
  - addresses:
    - 10.244.2.9
    conditions:
      ready: false
      serving: true
      terminating: true
    nodeName: kind-worker2
    targetRef:
      kind: Pod
      name: web-6d4cf56db6-m2l7q
      namespace: default
      uid: 9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2025-04-23T08:20:09Z"
    creationTimestamp: "2025-04-23T08:20:02Z"
    generateName: web-
    generation: 3
    labels:
      app: web
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    managedFields:
    - apiVersion: discovery.k8s.io/v1
      fieldsType: FieldsV1
      fieldsV1:
        f:addressType: {}
        f:endpoints: {}
        f:metadata:
          f:annotations:
            .: {}
            f:endpoints.kubernetes.io/last-change-trigger-time: {}
          f:generateName: {}
          f:labels:
            .: {}
            f:app: {}
            f:endpointslice.kubernetes.io/managed-by: {}
            f:kubernetes.io/service-name: {}
          f:ownerReferences:
            .: {}
            k:{"uid":"8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77"}: {}
        f:ports: {}
      manager: kube-controller-manager
      operation: Update
      time: "2025-04-23T08:20:09Z"
    name: web-x5v8k
    namespace: default
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: web
      uid: 8c5d3b56-1f53-4a5e-8a4e-4f5e0f2b9a77
    resourceVersion: "1162"
    uid: 5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a
  ports:
  - name: http
    port: 8080
    protocol: TCP
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints: null
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2025-04-23T08:21:40Z"
    generateName: db-
    generation: 1
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: db
      service.kubernetes.io/headless: ""
    name: db-p9w2x
    namespace: shop
    resourceVersion: "1102"
    uid: 1e2d3c4b-5a69-4788-9a0b-c1d2e3f4a5b6
  ports: null
kind: List
metadata:
  resourceVersion: ""
"#;

#[test]
fn kubectl_get_output_parses() {
    let objects = parse("get.yaml", KUBECTL_GET);
    assert_eq!(
        names(&objects),
        vec![
            "Service default/kubernetes",
            "Service default/web",
            "Service shop/db",
            "EndpointSlice default/kubernetes",
            "EndpointSlice default/web-x5v8k",
            "EndpointSlice shop/db-p9w2x",
        ]
    );
    let web = svc(&objects, 1);
    assert_web_node_port(web, TargetPort::Name("http".into()));
    let db = svc(&objects, 2);
    assert!(db.headless);
    let slice = slice_at(&objects, 4);
    assert_eq!(slice.service_name, "web");
    assert_eq!(slice.endpoints.len(), 2);
    assert!(slice.endpoints[1].terminating && !slice.endpoints[1].ready);
    assert_eq!(slice.endpoints[0].zone.as_deref(), Some("zone-a"));
    let empty = slice_at(&objects, 5);
    assert!(empty.endpoints.is_empty() && empty.ports.is_empty());
}

#[test]
fn list_and_multi_document_files_parse() {
    let text = format!(
            "# leading comment\n---\n---\n{}---\napiVersion: v1\nkind: List\nitems:\n- {}\n- apiVersion: v1\n  kind: Node\n  metadata: {{name: node-a}}\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {{name: cm}}\n---\n# only a comment\n---\napiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {{name: typed, namespace: shop}}\n  spec: {{ports: [{{port: 9}}]}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {{containers: []}}\n...\n",
            service("a", 80),
            "{apiVersion: v1, kind: Service, metadata: {name: b}, spec: {ports: [{port: 81}]}}"
        );
    let objects = parse("multi.yaml", &text);
    assert_eq!(
        names(&objects),
        vec![
            "Service default/a",
            "Service default/b",
            "Node node-a",
            "Service shop/typed",
            "Pod default/p",
        ]
    );
    // An empty file is fine too.
    assert_eq!(parse("e.yaml", ""), vec![]);
    assert_eq!(parse("e.yaml", "# nothing\n---\n"), vec![]);
}

#[test]
fn yaml_merge_keys_are_applied() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: m\nspec:\n  ports:\n  - &p {name: a, port: 80, protocol: UDP}\n  - <<: *p\n    name: b\n    port: 81\n";
    let objects = parse("m.yaml", text);
    let s = svc(&objects, 0);
    assert_eq!(s.ports[1].protocol, Protocol::Udp);
    assert_eq!(s.ports[1].port, 81);
}

#[test]
fn doc_starts_follow_the_parser() {
    assert_eq!(doc_starts("a: 1\n"), vec![1]);
    assert_eq!(doc_starts("# c\n\n---\na: 1\n---\nb: 1\n"), vec![4, 6]);
    assert_eq!(doc_starts("---\n---\na: 1\n"), vec![1, 3]);
    assert_eq!(doc_starts("a: 1\n---\n"), vec![1, 2]);
    assert_eq!(doc_starts("--- {a: 1}\n--- # x\nb: 1\n"), vec![1, 3]);
    assert_eq!(
        doc_starts("%YAML 1.2\n---\na: 1\n...\n---\nb: 2\n"),
        vec![3, 6]
    );
    assert_eq!(doc_starts("a: |\n  ---x\n  y\n"), vec![1]);
}

#[test]
fn yaml_syntax_error_has_line_and_column() {
    let text = after_a("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n   bad: indent\n");
    let e = only_error("dir/bad.yaml", &text);
    match &e {
        ManifestError::Syntax { line, column, .. } => assert_eq!((*line, *column), (13, 7)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        e.to_string(),
        "dir/bad.yaml:13:7: syntax error: mapping values are not allowed in this context"
    );
    // Unclosed flow sequence: the message keeps the parser's context.
    let e = first_error("f.yaml", "a: [1, 2\nb: 3\n");
    assert!(e.starts_with("f.yaml:2:"), "{e}");
}

#[test]
fn type_error_has_field_path_and_position() {
    // Top-level document: the exact position of the bad value.
    let text = after_a("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n  - port: abc\n");
    assert_eq!(
            only_error("t.yaml", &text).to_string(),
            "t.yaml:16:11: Service default/web: spec.ports[1].port: invalid type: string \"abc\", expected i32"
        );
    // Inside a List: the List's first line, the item and the path.
    let text = "# list\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: ok}\n  spec: {ports: [{port: 1}]}\n- apiVersion: v1\n  kind: Service\n  metadata: {name: web, namespace: shop}\n  spec:\n    ports:\n    - port: [80]\n";
    assert_eq!(
            only_error("l.yaml", text).to_string(),
            "l.yaml:2: Service shop/web (items[1]): spec.ports[0].port: invalid type: sequence, expected i32"
        );
    // Unknown name.
    let e = first_error("n.yaml", "apiVersion: v1\nkind: Pod\nmetadata: 7\n");
    let want = "n.yaml:3:11: Pod (no name): metadata: invalid type";
    assert!(e.starts_with(want), "{e}");
}

#[test]
fn json_files_parse_and_report_positions() {
    let json = r#"{
  "apiVersion": "v1",
  "kind": "List",
  "items": [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"}, "spec": {"ports": [{"port": 80}]}}
  ]
}"#;
    let objects = parse("x.json", json);
    assert_eq!(names(&objects), vec!["Service default/j"]);
    let e = first_error("x.json", "{\n  \"kind\": \"Service\",\n}");
    assert!(e.starts_with("x.json:3:1: syntax error:"), "{e}");
    let e = first_error("y.json", "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"s\"},\n \"spec\": {\"ports\": [{\"port\": \"x\"}]}}");
    assert!(
        e.starts_with("y.json:2:") && e.contains("spec.ports[0].port"),
        "{e}"
    );
}

#[test]
fn semantic_errors_carry_file_line_object_and_field() {
    let text = after_a("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - {name: a, port: 80}\n  - {name: b, port: 70000, protocol: SCTP}\n");
    let errors = parse_err("web.yaml", &text);
    assert_eq!(
        messages(&errors),
        vec!["web.yaml:9: Service default/web: spec.ports[1].port: 70000 is out of range 1..65535",]
    );
    let errors = parse_err("s.yaml", "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n");
    assert_eq!(
            messages(&errors),
            vec!["s.yaml:1: EndpointSlice default/s: metadata.labels[kubernetes.io/service-name]: required: it names the Service this slice belongs to"]
        );
}

#[test]
fn unknown_kinds_are_ignored_and_wrong_versions_are_errors() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: notanumber}\n---\napiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: k}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: e}\n";
    assert_eq!(parse("k.yaml", text), vec![]);

    let text = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n---\nkind: Service\nmetadata: {name: x}\n---\napiVersion: v1\nmetadata: {name: y}\n---\n- just\n- a list\n---\napiVersion: v1\nkind: List\nitems: {}\n";
    let errors = parse_err("v.yaml", text);
    assert_eq!(
            messages(&errors),
            vec![
                "v.yaml:1: unsupported apiVersion discovery.k8s.io/v1beta1 for EndpointSlice (expected discovery.k8s.io/v1)",
                "v.yaml:5: Service object has no apiVersion",
                "v.yaml:8: object has no kind",
                "v.yaml:11: expected a Kubernetes object (a mapping with apiVersion and kind), found a sequence",
                "v.yaml:14: items must be a list",
            ]
        );
}

#[test]
fn duplicates_are_reported_naming_both_places() {
    let text = format!("{}---\n{}", service("web", 80), service("web", 81));
    let errors = parse_err("d.yaml", &text);
    assert_eq!(
        messages(&errors),
        vec!["d.yaml:9: duplicate Service default/web: already defined at d.yaml:1"]
    );

    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    fs::write(&a, service("web", 80)).unwrap();
    fs::write(
        &b,
        format!("{}---\n{}", service("other", 1), service("web", 81)),
    )
    .unwrap();
    let (objects, errors) = load(&[dir.path().to_path_buf()], &Limits::default());
    assert_eq!(
        names(&objects),
        vec!["Service default/web", "Service default/other"]
    );
    assert_eq!(port_of(&objects, 0), 80, "the first file wins");
    assert_eq!(
        messages(&errors),
        vec![format!(
            "{}:9: duplicate Service default/web: already defined at {}:1",
            b.display(),
            a.display()
        )]
    );
}

#[test]
fn directories_are_recursive_sorted_and_skip_hidden_entries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir_all(d.join("sub/deeper")).unwrap();
    fs::create_dir_all(d.join(".git")).unwrap();
    fs::write(d.join("b.yaml"), service("b", 1)).unwrap();
    fs::write(d.join("a.yml"), service("a", 1)).unwrap();
    fs::write(d.join("c.json"), r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"c"},"spec":{"ports":[{"port":1}]}}"#).unwrap();
    fs::write(d.join("sub/deeper/z.yaml"), service("z", 1)).unwrap();
    fs::write(d.join("sub/0.yaml"), service("zero", 1)).unwrap();
    fs::write(d.join(".hidden.yaml"), service("hidden", 1)).unwrap();
    fs::write(d.join(".git/x.yaml"), service("git", 1)).unwrap();
    fs::write(d.join("notes.txt"), "not: yaml: at: all").unwrap();
    fs::write(d.join("README.md"), "# hi").unwrap();
    // An explicitly named file is loaded whatever its name, and only once.
    let extra = d.join("notes.conf");
    fs::write(&extra, service("extra", 1)).unwrap();
    let objects = load_clean(&[d.to_path_buf(), extra.clone(), d.join("a.yml")]);
    assert_eq!(
        names(&objects),
        vec![
            "Service default/a",
            "Service default/b",
            "Service default/c",
            "Service default/zero",
            "Service default/z",
            "Service default/extra",
        ]
    );
}

#[test]
fn missing_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yaml");
    let (objects, errors) = load(std::slice::from_ref(&missing), &Limits::default());
    assert!(objects.is_empty());
    assert_eq!(errors.len(), 1);
    assert!(errors[0]
        .to_string()
        .starts_with(&format!("{}: ", missing.display())));
    assert!(matches!(errors[0], ManifestError::Io { .. }));
}

#[test]
fn bad_edit_keeps_last_good_objects_of_that_file() {
    let (dir, a, b) = two_files();
    let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
    let (objects, errors) = src.reload();
    assert!(errors.is_empty());
    assert_eq!(
        names(&objects),
        vec!["Service default/a", "Service default/b"]
    );

    // A half-saved a.yaml (syntax) and a semantically bad b.yaml: both keep their
    // last good objects, and both are reported.
    fs::write(
        &a,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n spec: [\n",
    )
    .unwrap();
    fs::write(&b, service("b", 70000)).unwrap();
    let (objects2, errors) = src.reload();
    assert_eq!(objects2, objects);
    assert_eq!(errors.len(), 2, "{:?}", messages(&errors));

    // Fixed: the new content serves.
    fs::write(&a, service("a", 81)).unwrap();
    let (objects3, errors) = src.reload();
    assert_eq!(errors.len(), 1);
    assert_eq!(port_of(&objects3, 0), 81);

    // A file that never loaded cleanly serves nothing.
    let c = dir.path().join("c.yaml");
    fs::write(&c, service("c", 0)).unwrap();
    let (objects4, _) = src.reload();
    assert_eq!(
        names(&objects4),
        vec!["Service default/a", "Service default/b"]
    );
}

#[test]
fn deleted_file_drops_objects_and_new_file_is_picked_up() {
    let (dir, a, b) = two_files();
    let mut src = FileSource::new(vec![dir.path().to_path_buf(), a.clone()], Limits::default());
    assert_eq!(
        names(&src.reload().0),
        vec!["Service default/a", "Service default/b"]
    );
    fs::remove_file(&b).unwrap();
    let (objects, errors) = src.reload();
    assert!(errors.is_empty());
    assert_eq!(names(&objects), vec!["Service default/a"]);
    // An explicitly named file that is deleted drops its objects too (and says so).
    fs::remove_file(&a).unwrap();
    let (objects, errors) = src.reload();
    assert!(objects.is_empty());
    assert_eq!(errors.len(), 1);
    fs::write(dir.path().join("c.yaml"), service("c", 80)).unwrap();
    assert_eq!(names(&src.reload().0), vec!["Service default/c"]);
}

#[test]
fn selector_example_gives_endpoints_from_ready_pods() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples/selector.yaml");
    let objects = load_clean(&[path]);
    let mut store = crate::state::Store::new();
    store.apply(super::super::Update::Reset(objects));
    let slices: Vec<_> = store.selector_slices().collect();
    let eps: Vec<(String, String, bool, Option<u16>)> = slices
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                (
                    s.service_name.clone(),
                    e.ip.to_string(),
                    e.ready,
                    s.ports[0].port,
                )
            })
        })
        .collect();
    assert_eq!(
        eps,
        vec![
            ("api".into(), "127.0.0.11".into(), true, Some(8080)),
            ("api".into(), "127.0.0.12".into(), false, Some(8080)),
            ("api-public".into(), "127.0.0.11".into(), true, Some(8080)),
            ("api-public".into(), "127.0.0.12".into(), false, Some(8080)),
        ]
    );
    assert_eq!(slices[0].endpoints[0].hostname(), Some("api-0"));
    assert_eq!(slices[1].endpoints[0].hostname(), None, "subdomain is api");
}

#[test]
fn examples_load_without_errors() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let objects = load_clean(&[dir.join("web.yaml"), dir.join("dns-udp.yaml")]);
    assert_eq!(
        names(&objects),
        vec![
            "Service default/web",
            "EndpointSlice default/web-abc12",
            "Service kube-system/dns",
            "EndpointSlice kube-system/dns-x7k2p",
        ]
    );
    let web = svc(&objects, 0);
    assert_web_node_port(web, TargetPort::Number(8080));
    let slice = slice_at(&objects, 1);
    assert_eq!(slice.endpoints.len(), 3);
    assert!(slice
        .endpoints
        .iter()
        .all(|e| e.zone_hints().is_none() && e.node_name.as_deref() == Some("node-a")));
    let dns = svc(&objects, 2);
    assert_eq!(dns.ports[0].protocol, Protocol::Udp);
}

#[test]
fn annotation_examples_load_with_their_options() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let files = [
        "balance-maglev.yaml",
        "balance-least-connections.yaml",
        "slow-start.yaml",
        "legacy-endpoints.yaml",
    ];
    let objects = load_clean(&files.map(|f| dir.join(f)));
    let options: Vec<(String, ServiceOptions)> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Service(s) => Some((s.key.name.clone(), s.options.clone())),
            _ => None,
        })
        .collect();
    let opts = |balance, slow_start| ServiceOptions {
        balance,
        slow_start,
        ..ServiceOptions::default()
    };
    assert_eq!(
        options,
        vec![
            (
                "gateway".into(),
                opts(Balance::Maglev { table_size: 65537 }, None)
            ),
            ("reports".into(), opts(Balance::LeastConnections, None)),
            (
                "checkout".into(),
                opts(Balance::RoundRobin, Some(Duration::from_secs(60)))
            ),
            ("legacy-db".into(), ServiceOptions::default()),
        ]
    );
    let mirrored = objects
        .iter()
        .any(|o| matches!(o, Object::Endpoints(e) if e.mirror && e.slices[0].endpoints.len() == 2));
    assert!(mirrored, "{objects:?}");
}

#[test]
fn run_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (tx, _rx) = mpsc::channel(1);
    let fut = FileSource::new(vec![], Limits::default()).run(tx, Arc::new(Notify::new()));
    assert_send(&fut);
}

async fn next_batch(rx: &mut mpsc::Receiver<Batch>) -> Vec<Update> {
    match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        Ok(Some(b)) => b.updates,
        other => panic!("expected a batch within 5 s, got {other:?}"),
    }
}

/// What the store holds of the source's batches: a Reset replaces it all,
/// an Upsert or a Delete changes one object.
#[derive(Default)]
struct Served(BTreeMap<(Kind, ObjectKey), Object>);

impl Served {
    fn apply(&mut self, updates: Vec<Update>) {
        for u in updates {
            match u {
                Update::Reset(objects) => {
                    self.0 = objects.into_iter().map(|o| (o.id(), o)).collect();
                }
                Update::Upsert(o) => {
                    self.0.insert(o.id(), *o);
                }
                Update::Delete(kind, key) => {
                    self.0.remove(&(kind, key));
                }
                Update::Checked(_) => {}
            }
        }
    }

    fn objects(&self) -> Vec<Object> {
        self.0.values().cloned().collect()
    }
}

/// Applies batches (at most 5 s) until the served set has exactly these objects.
async fn wait_for(rx: &mut mpsc::Receiver<Batch>, served: &mut Served, want: &[&str]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while names(&served.objects()) != want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(b)) => served.apply(b.updates),
            other => panic!("not serving {want:?} within 5 s: {other:?}"),
        }
    }
}

/// The first batch is the whole set (a Reset); each change after it sends
/// the objects it changed and nothing else.
#[tokio::test]
async fn run_sends_what_changed_when_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    fs::write(&a, service("a", 80)).unwrap();
    // One file named explicitly, one directory.
    let sub = dir.path().join("more");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("z.yaml"), service("z", 9)).unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let reload_now = Arc::new(Notify::new());
    let task = tokio::spawn(
        FileSource::new(vec![a.clone(), sub.clone()], Limits::default())
            .run(tx, reload_now.clone()),
    );

    let mut served = Served::default();
    let first = next_batch(&mut rx).await;
    assert!(matches!(first.as_slice(), [Update::Reset(_)]), "{first:?}");
    served.apply(first);
    assert_eq!(
        names(&served.objects()),
        vec!["Service default/a", "Service default/z"]
    );

    // Rewritten in place: that Service alone.
    fs::write(&a, service("a", 81)).unwrap();
    let changed = next_batch(&mut rx).await;
    match changed.as_slice() {
        [Update::Upsert(o)] => assert_eq!(port_of(std::slice::from_ref(&**o), 0), 81),
        other => panic!("expected a's new version alone, got {other:?}"),
    }
    served.apply(changed);

    // Replaced by rename, as editors do.
    let tmp = dir.path().join(".a.yaml.swp");
    fs::write(&tmp, service("a", 82)).unwrap();
    fs::rename(&tmp, &a).unwrap();
    served.apply(next_batch(&mut rx).await);
    assert_eq!(port_of(&served.objects(), 0), 82);

    // A new file in the watched directory.
    fs::write(sub.join("b.yaml"), service("b", 1)).unwrap();
    let changed = next_batch(&mut rx).await;
    assert!(
        matches!(changed.as_slice(), [Update::Upsert(_)]),
        "{changed:?}"
    );
    served.apply(changed);
    assert_eq!(
        names(&served.objects()),
        vec![
            "Service default/a",
            "Service default/b",
            "Service default/z"
        ]
    );

    // A bad edit: nothing sent (nothing good changed); the fix sends it.
    fs::write(sub.join("b.yaml"), "kind: [").unwrap();
    reload_now.notify_one();
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    fs::write(sub.join("b.yaml"), service("b", 2)).unwrap();
    served.apply(next_batch(&mut rx).await);
    assert_eq!(port_of(&served.objects(), 1), 2);

    // A reload with nothing changed sends nothing.
    reload_now.notify_one();
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());

    // The watched directory deleted and re-created: its objects go, and it
    // is watched again.
    fs::remove_dir_all(&sub).unwrap();
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("c.yaml"), service("c", 1)).unwrap();
    wait_for(
        &mut rx,
        &mut served,
        &["Service default/a", "Service default/c"],
    )
    .await;
    fs::write(sub.join("d.yaml"), service("d", 1)).unwrap();
    wait_for(
        &mut rx,
        &mut served,
        &[
            "Service default/a",
            "Service default/c",
            "Service default/d",
        ],
    )
    .await;

    // Closing the channel ends the task.
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// The objects of the updates, by name, with their first port.
fn upserts(r: &Reloaded) -> Vec<(String, u16)> {
    let mut v: Vec<(String, u16)> = r
        .updates
        .iter()
        .filter_map(|u| match u {
            Update::Upsert(o) => Some((
                names(std::slice::from_ref(&**o)).remove(0),
                port_of(std::slice::from_ref(&**o), 0),
            )),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn deletes(r: &Reloaded) -> Vec<String> {
    r.updates
        .iter()
        .filter_map(|u| match u {
            Update::Delete(kind, key) => Some(convert::describe(*kind, key)),
            _ => None,
        })
        .collect()
}

/// A reload reads and parses only the files that changed and hands out only
/// the objects whose first definition changed: an edit among many files
/// costs that file, not all of them.
#[test]
fn a_reload_parses_changed_files_and_sends_changed_objects() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.yaml")));
    fs::write(&a, service("a", 80)).unwrap();
    fs::write(
        &b,
        format!("{}---\n{}", service("b", 81), service("b2", 82)),
    )
    .unwrap();
    let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
    let r = src.reload_changes();
    assert_eq!(r.parsed, 2);
    assert_eq!(upserts(&r).len(), 3);

    // Written within the last second, the files are read again once (their
    // stamps are too recent to trust); older than that, not at all.
    std::thread::sleep(Duration::from_millis(1100));
    let r = src.reload_changes();
    assert_eq!((r.parsed, r.updates.len()), (2, 0));
    let r = src.reload_changes();
    assert_eq!((r.parsed, r.updates.len()), (0, 0));

    // One object of one file changed: that file parsed, that object sent.
    fs::write(
        &b,
        format!("{}---\n{}", service("b", 81), service("b2", 83)),
    )
    .unwrap();
    let r = src.reload_changes();
    assert_eq!(r.parsed, 1);
    assert_eq!(upserts(&r), vec![("Service default/b2".to_string(), 83)]);

    // A later file defines b again: reported, and b stays the first one.
    fs::write(&c, service("b", 90)).unwrap();
    let r = src.reload_changes();
    assert!(r.updates.is_empty(), "{:?}", r.updates);
    assert!(
        matches!(r.errors.as_slice(), [ManifestError::Duplicate { .. }]),
        "{:?}",
        messages(&r.errors)
    );

    // The first definition's file goes: b2 goes, and the next b takes over.
    fs::remove_file(&b).unwrap();
    let r = src.reload_changes();
    assert_eq!(deletes(&r), vec!["Service default/b2"]);
    assert_eq!(upserts(&r), vec![("Service default/b".to_string(), 90)]);
    assert!(r.errors.is_empty(), "{:?}", messages(&r.errors));
    assert_eq!(
        names(&src.objects()),
        vec!["Service default/a", "Service default/b"]
    );
}

/// A path beside `dir` (same file system) to move things out of it to.
fn elsewhere_dir(dir: &tempfile::TempDir) -> PathBuf {
    let name = dir.path().file_name().unwrap().to_string_lossy();
    dir.path().with_file_name(format!("{name}-moved"))
}

/// A reload of the paths a watcher named reads those files and nothing
/// else, and falls back to a full reload whenever the names could hide a
/// change elsewhere: a new manifest, a directory, errors to report again, a
/// symlink among the files.
#[test]
fn a_reload_of_named_paths_reads_only_those_files() {
    let dir = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| dir.path().join(format!("{n}.yaml")));
    fs::write(&a, service("a", 80)).unwrap();
    fs::write(&b, service("b", 81)).unwrap();
    let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
    assert_eq!(src.reload_changes().parsed, 2);
    let named = |paths: &[&std::path::Path]| -> HashSet<PathBuf> {
        paths.iter().map(|p| p.to_path_buf()).collect()
    };

    // Both files changed, a alone named: a alone read and sent.
    fs::write(&a, service("a", 90)).unwrap();
    fs::write(&b, service("b", 91)).unwrap();
    let r = src.reload_touched(&named(&[&a]));
    assert_eq!(r.parsed, 1);
    assert_eq!(upserts(&r), vec![("Service default/a".to_string(), 90)]);
    // An editor's temporary file is no manifest: nothing to read.
    let tmp = dir.path().join("a.yaml.tmp");
    fs::write(&tmp, "not: [yaml").unwrap();
    let r = src.reload_touched(&named(&[&tmp]));
    assert_eq!((r.parsed, r.updates.len()), (0, 0));

    // A new manifest: everything listed again, b's change found too.
    fs::write(&c, service("c", 92)).unwrap();
    let r = src.reload_touched(&named(&[&c]));
    assert_eq!(
        upserts(&r),
        vec![
            ("Service default/b".to_string(), 91),
            ("Service default/c".to_string(), 92)
        ]
    );

    // A file with an error: the next reload, whatever it names, reports it
    // again (a full one), and the file keeps its last good objects.
    fs::write(&a, "kind: [").unwrap();
    let r = src.reload_touched(&named(&[&a]));
    assert_eq!(r.errors.len(), 1, "{:?}", messages(&r.errors));
    fs::write(&c, service("c", 93)).unwrap();
    let r = src.reload_touched(&named(&[&c]));
    assert_eq!(r.errors.len(), 1, "{:?}", messages(&r.errors));
    assert_eq!(upserts(&r), vec![("Service default/c".to_string(), 93)]);
    fs::write(&a, service("a", 94)).unwrap();
    let r = src.reload_touched(&named(&[&a]));
    assert!(r.errors.is_empty(), "{:?}", messages(&r.errors));
    assert_eq!(upserts(&r), vec![("Service default/a".to_string(), 94)]);

    // A directory named: listed again (its files are new).
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("d.yaml"), service("d", 95)).unwrap();
    let r = src.reload_touched(&named(&[&sub]));
    assert_eq!(upserts(&r), vec![("Service default/d".to_string(), 95)]);
    // A directory of loaded files gone (moved away: one event, its own
    // name): its objects go.
    let moved = elsewhere_dir(&dir);
    fs::rename(&sub, &moved).unwrap();
    let r = src.reload_touched(&named(&[&sub]));
    fs::remove_dir_all(&moved).unwrap();
    assert_eq!(deletes(&r), vec!["Service default/d"]);

    // A named file removed: its objects go.
    fs::remove_file(&b).unwrap();
    let r = src.reload_touched(&named(&[&b]));
    assert_eq!(deletes(&r), vec!["Service default/b"]);

    // A symlink among the files: a change of its target shows up under the
    // target's name, so every reload is a full one.
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("e.yaml");
    fs::write(&target, service("e", 96)).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("e.yaml")).unwrap();
    src.reload_changes();
    fs::write(&target, service("e", 97)).unwrap();
    fs::write(&a, service("a", 98)).unwrap();
    let r = src.reload_touched(&named(&[&a]));
    assert_eq!(
        upserts(&r),
        vec![
            ("Service default/a".to_string(), 98),
            ("Service default/e".to_string(), 97)
        ]
    );
}

/// One document edited in a file of many: one update, and the source then
/// serves what a fresh load of the files serves (the documents kept, the
/// edited one, a Service moved to another file, a duplicate reported).
#[test]
fn one_document_edited_among_many_is_one_update() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
    let docs = |edited: u32| {
        (0..40)
            .map(|i| service(&format!("s{i}"), if i == 7 { edited } else { 80 }))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    fs::write(&a, docs(80)).unwrap();
    fs::write(&b, service("s39", 9)).unwrap();
    let mut src = FileSource::new(vec![dir.path().to_path_buf()], Limits::default());
    let r = src.reload_changes();
    assert_eq!((upserts(&r).len(), r.errors.len()), (40, 1));

    fs::write(&a, docs(81)).unwrap();
    let r = src.reload_touched(&[a.clone()].into());
    assert_eq!(upserts(&r), vec![("Service default/s7".to_string(), 81)]);
    // Reported again: a reload after errors is a full one.
    assert_eq!(r.errors.len(), 1);
    let r = src.reload_changes();
    assert_eq!((r.updates.len(), r.errors.len()), (0, 1));

    // s39 leaves a: b's definition takes over.
    let mut rest: Vec<String> = (0..39).map(|i| service(&format!("s{i}"), 80)).collect();
    rest[7] = service("s7", 81);
    fs::write(&a, rest.join("---\n")).unwrap();
    let r = src.reload_changes();
    assert_eq!(upserts(&r), vec![("Service default/s39".to_string(), 9)]);
    let fresh = load(&[dir.path().to_path_buf()], &Limits::default()).0;
    assert_eq!(src.objects(), fresh);
}
