//! The deployment kit in deploy/ is checked against graft itself: every
//! manifest and the Helm chart's rendered output parse, name ports, paths
//! and probes graft really serves, carry a graft.toml graft's own loader
//! accepts; every Grafana query names metrics `/metrics` exports after real
//! traffic; the systemd unit passes `systemd-analyze verify`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::artifacts::{artifact, push_by_digest, push_subject, referrer_list, referrers};
use common::{Api, Graft, Registry};
use serde_norway::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every document of a multi-document YAML stream.
fn documents(text: &str, what: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_norway::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{what} is not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

/// The plain Kubernetes manifests.
fn kubernetes_docs() -> Vec<(String, Vec<Value>)> {
    ["sidecar.yaml", "edge-cache.yaml"]
        .iter()
        .map(|f| {
            let path = deploy(&format!("kubernetes/{f}"));
            (f.to_string(), documents(&read(&path), f))
        })
        .collect()
}

/// A renderer for the subset of Go templates the chart keeps to:
/// `{{ .Values.a.b }}`, `{{ .Release.Name }}`, `| quote`, and
/// `| toYaml | nindent N`. Anything else fails the test, so the chart
/// stays within what is checked here.
fn render(template: &str, values: &Value, release: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find("}}")
            .unwrap_or_else(|| panic!("unclosed {{{{ in {rest}"))
            + start;
        let expr = rest[start + 2..end].trim();
        out.push_str(&evaluate(expr, values, release));
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

fn evaluate(expr: &str, values: &Value, release: &str) -> String {
    let mut stages = expr.split('|').map(str::trim);
    let head = stages.next().unwrap_or_default();
    let mut value = if head == ".Release.Name" {
        Value::String(release.to_owned())
    } else if let Some(path) = head.strip_prefix(".Values.") {
        let mut v = values;
        for key in path.split('.') {
            v = v
                .get(key)
                .unwrap_or_else(|| panic!("values.yaml has no `{path}` (at `{key}`)"));
        }
        v.clone()
    } else {
        panic!("unsupported template expression `{expr}`")
    };
    let mut text: Option<String> = None;
    for stage in stages {
        let (func, arg) = stage.split_once(' ').unwrap_or((stage, ""));
        match func {
            "quote" => {
                let s = scalar(&value);
                text = Some(format!("{:?}", s));
            }
            "toYaml" => {
                let y = serde_norway::to_string(&value).expect("toYaml");
                text = Some(y.trim_end().to_owned());
                value = Value::Null;
            }
            "nindent" => {
                let n: usize = arg.trim().parse().expect("nindent N");
                let pad = " ".repeat(n);
                let body = text.take().unwrap_or_else(|| scalar(&value));
                let indented: Vec<String> = body.lines().map(|l| format!("{pad}{l}")).collect();
                text = Some(format!("\n{}", indented.join("\n")));
            }
            other => panic!("unsupported template function `{other}` in `{expr}`"),
        }
    }
    text.unwrap_or_else(|| scalar(&value))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// The chart rendered as `helm template ci deploy/helm/graft` would.
fn helm_docs() -> Vec<Value> {
    let chart = deploy("helm/graft");
    let meta = documents(&read(&chart.join("Chart.yaml")), "Chart.yaml");
    assert_eq!(meta[0]["apiVersion"].as_str(), Some("v2"), "Chart.yaml");
    assert_eq!(meta[0]["name"].as_str(), Some("graft"), "Chart.yaml");
    let values = documents(&read(&chart.join("values.yaml")), "values.yaml")
        .pop()
        .expect("values");
    let mut docs = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(chart.join("templates"))
        .expect("templates/")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let rendered = render(&read(&path), &values, "ci");
        assert!(
            !rendered.contains("{{"),
            "{}: left unrendered",
            path.display()
        );
        docs.extend(documents(&rendered, &path.display().to_string()));
    }
    docs
}

fn all_docs() -> Vec<(String, Vec<Value>)> {
    let mut all = kubernetes_docs();
    all.push(("helm chart".into(), helm_docs()));
    all
}

#[test]
fn manifests_and_the_rendered_chart_parse_with_the_objects_promised() {
    let kinds =
        |docs: &[Value]| -> BTreeSet<String> { docs.iter().map(|d| kind(d).to_owned()).collect() };
    let k8s = kubernetes_docs();
    let sidecar = kinds(&k8s[0].1);
    let edge = kinds(&k8s[1].1);
    let helm = kinds(&helm_docs());
    for k in [
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
    ] {
        assert!(sidecar.contains(k), "sidecar.yaml lacks a {k}: {sidecar:?}");
    }
    for k in [
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    ] {
        assert!(edge.contains(k), "edge-cache.yaml lacks a {k}: {edge:?}");
        assert!(helm.contains(k), "the chart lacks a {k}: {helm:?}");
    }
    // The sidecar: one Pod with the registry and graft; the registry on
    // loopback only, DELETE enabled (fallback tags need it).
    let deployment = k8s[0]
        .1
        .iter()
        .find(|d| kind(d) == "Deployment")
        .expect("Deployment");
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(containers.len(), 2, "registry + graft in one Pod");
    let registry_env = format!("{:?}", containers[0]["env"]);
    assert!(registry_env.contains("127.0.0.1:5000"), "{registry_env}");
    assert!(
        registry_env.contains("REGISTRY_STORAGE_DELETE_ENABLED"),
        "{registry_env}"
    );
    // The rendered chart names the release everywhere.
    let helm = helm_docs();
    for d in &helm {
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        assert!(name.starts_with("ci-graft"), "{name}");
    }
    // `toYaml | nindent` rendered the values' resources as a mapping.
    let deployment = helm
        .iter()
        .find(|d| kind(d) == "Deployment")
        .expect("Deployment");
    let resources = &deployment["spec"]["template"]["spec"]["containers"][0]["resources"];
    assert_eq!(
        resources["requests"]["memory"].as_str(),
        Some("128Mi"),
        "{resources:?}"
    );
    assert_eq!(
        resources["limits"]["memory"].as_str(),
        Some("512Mi"),
        "{resources:?}"
    );
}

/// Every graft container: (where, its ports by name, its probes (path,
/// port name), and the Service targetPorts of the same file).
struct GraftContainer {
    source: String,
    ports: Vec<(String, u64)>,
    probes: Vec<(String, String, String)>,
    config: String,
    data_mount: String,
    service_targets: Vec<String>,
}

fn graft_containers() -> Vec<GraftContainer> {
    let mut out = Vec::new();
    for (source, docs) in all_docs() {
        let config = docs
            .iter()
            .find(|d| kind(d) == "ConfigMap")
            .and_then(|d| d["data"]["graft.toml"].as_str())
            .unwrap_or_else(|| panic!("{source}: no ConfigMap with graft.toml"))
            .to_owned();
        let service_targets: Vec<String> = docs
            .iter()
            .filter(|d| kind(d) == "Service")
            .flat_map(|d| {
                d["spec"]["ports"]
                    .as_sequence()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|p| scalar(&p["targetPort"]))
            .collect();
        for d in docs.iter().filter(|d| kind(d) == "Deployment") {
            let pod = &d["spec"]["template"]["spec"];
            for c in pod["containers"].as_sequence().expect("containers") {
                if c["name"].as_str() != Some("graft") {
                    continue;
                }
                let ports = c["ports"]
                    .as_sequence()
                    .expect("graft's ports")
                    .iter()
                    .map(|p| {
                        (
                            p["name"].as_str().unwrap_or_default().to_owned(),
                            p["containerPort"].as_u64().expect("containerPort"),
                        )
                    })
                    .collect();
                let probes = ["readinessProbe", "livenessProbe"]
                    .iter()
                    .map(|probe| {
                        let get = &c[*probe]["httpGet"];
                        (
                            (*probe).to_owned(),
                            get["path"]
                                .as_str()
                                .unwrap_or_else(|| panic!("{source}: {probe}"))
                                .to_owned(),
                            scalar(&get["port"]),
                        )
                    })
                    .collect();
                let data_mount = c["volumeMounts"]
                    .as_sequence()
                    .expect("volumeMounts")
                    .iter()
                    .find(|m| m["mountPath"].as_str() != Some("/etc/graft"))
                    .and_then(|m| m["mountPath"].as_str())
                    .expect("a data volume")
                    .to_owned();
                out.push(GraftContainer {
                    source: source.clone(),
                    ports,
                    probes,
                    config: config.clone(),
                    data_mount,
                    service_targets: service_targets.clone(),
                });
            }
        }
    }
    assert_eq!(
        out.len(),
        3,
        "a graft container in each of sidecar, edge cache, chart"
    );
    out
}

/// Loads `text` as a config file with graft's own loader.
fn load_config(text: &str, what: &str) -> graft::Config {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("graft.toml");
    std::fs::write(&path, text).expect("write config");
    graft::Config::load(Some((&path, true)), &graft::config::Overrides::default())
        .unwrap_or_else(|e| panic!("{what}: graft rejects its graft.toml:\n{e}"))
}

#[test]
fn the_configs_are_accepted_by_graft_and_agree_with_ports_and_volumes() {
    for c in graft_containers() {
        let config = load_config(&c.config, &c.source);
        let listen_port = u64::from(config.server.listen.port());
        assert!(
            c.ports.iter().any(|(_, p)| *p == listen_port),
            "{}: graft listens on {listen_port}, the container declares {:?}",
            c.source,
            c.ports
        );
        assert!(
            !config.server.listen.ip().is_loopback(),
            "{}: graft must listen beyond loopback for the Service",
            c.source
        );
        assert_eq!(
            config.storage.data_dir,
            PathBuf::from(&c.data_mount),
            "{}: data_dir is the mounted volume",
            c.source
        );
        for (probe, _, port) in &c.probes {
            assert!(
                c.ports
                    .iter()
                    .any(|(name, n)| name == port || n.to_string() == *port),
                "{}: {probe} names port {port}, not one of {:?}",
                c.source,
                c.ports
            );
        }
        for target in &c.service_targets {
            assert!(
                c.ports
                    .iter()
                    .any(|(name, n)| name == target || n.to_string() == *target),
                "{}: the Service targets {target}, not one of graft's ports {:?}",
                c.source,
                c.ports
            );
        }
    }
    let systemd = load_config(
        &read(&deploy("systemd/graft.toml")),
        "deploy/systemd/graft.toml",
    );
    assert_eq!(systemd.storage.data_dir, PathBuf::from("/var/lib/graft"));
}

#[tokio::test]
async fn probe_paths_answer_and_every_dashboard_metric_is_exported_after_real_traffic() {
    let registry = Registry::start();
    let graft = Graft::start(&registry);
    let api = Api::for_graft(&graft);

    // Every probe path the manifests name answers 200 on a ready graft.
    let paths: BTreeSet<String> = graft_containers()
        .into_iter()
        .flat_map(|c| c.probes.into_iter().map(|(_, path, _)| path))
        .collect();
    assert!(
        paths.contains("/readyz") && paths.contains("/healthz"),
        "{paths:?}"
    );
    for path in &paths {
        let status = Api::send(api.get(path)).await.status();
        assert_eq!(status, 200, "GET {path}");
    }

    // Real traffic: push an image and a referrer, pull both, list referrers.
    let subject = push_subject(&api, "kit/app", "v1").await;
    let sbom = artifact(&subject, Some("application/spdx+json"), None, None);
    push_by_digest(&api, "kit/app", &sbom).await;
    api.get_manifest("kit/app", "v1").await;
    api.get_manifest("kit/app", &subject.digest).await;
    api.get_manifest("kit/app", &subject.digest).await;
    let listed = referrer_list(referrers(&api, "kit/app", &subject.digest, "").await).await;
    assert_eq!(listed.len(), 1, "{listed:?}");

    let metrics = Api::send(api.get("/metrics"))
        .await
        .text()
        .await
        .expect("metrics");
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();

    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy("grafana/graft.json"))).expect("dashboard JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "`{expr}` names no graft metric");
            queried.extend(names);
        }
    }
    let missing: Vec<_> = queried
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics graft does not export: {missing:?}"
    );
    // The dashboard covers what the issue asks for.
    for needed in [
        "graft_cache_hits_total",
        "graft_cache_bytes_served_total",
        "graft_upstream_bytes_fetched_total",
        "graft_upstream_latency_seconds_bucket",
        "graft_cache_evictions_total",
        "graft_cache_fills_failed_total",
        "graft_tag_writes_unauthorized_total",
        "graft_requests_total",
    ] {
        assert!(queried.contains(needed), "the dashboard lacks {needed}");
    }
}

/// The `graft_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("graft_") {
        let start = i + found;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn the_systemd_unit_is_hardened_and_verifies() {
    let unit = read(&deploy("systemd/graft.service"));
    for line in [
        "DynamicUser=yes",
        "StateDirectory=graft",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "ExecStart=/usr/local/bin/graft serve --config /etc/graft/graft.toml",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "graft.service lacks `{line}`"
        );
    }
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed here");
        return;
    };
    // verify checks that ExecStart's binary exists: point it at the one
    // this build made.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("graft.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/graft", env!("CARGO_BIN_EXE_graft")),
    )
    .expect("write unit");
    // --man=no: the man page is `graft man`'s output, not installed here.
    let out = std::process::Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Unknown keys and bad values are only warnings: none may be printed.
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("graft.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );
}
