//! `graft referrers <repo>@<digest>`: what a running graft's referrers API
//! answers, printed as a list or as a tree of referrers of referrers.

mod common;

use common::artifacts::{artifact, graft_command, push_by_digest, push_subject, Subject, MANIFEST};
use common::{sha256_digest, Api, Graft, Registry, RegistryOptions};
use serde_json::json;

/// Runs `graft referrers` with `args`; returns stdout, failing on a
/// non-zero exit.
fn graft_referrers(graft: &Graft, args: &[&str]) -> String {
    let work = tempfile::tempdir().expect("work dir");
    let out = graft_command(work.path())
        .arg("referrers")
        .args(args)
        .args(["--graft", &graft.url()])
        .output()
        .expect("run graft referrers");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}: {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The line `graft referrers` prints for a referrer.
fn line(manifest: &[u8], artifact_type: &str) -> String {
    format!(
        "{}  {artifact_type}  {} bytes",
        sha256_digest(manifest),
        manifest.len()
    )
}

#[tokio::test]
async fn graft_referrers_tree_prints_referrers_of_referrers() {
    let registry = Registry::start();
    // A page size of 2 makes every listing below span several pages.
    let graft = Graft::start_with(&registry, |c| c.referrers.page_size = 2);
    let api = Api::for_graft(&graft);
    let subject = push_subject(&api, "app", "v1").await;
    let sig = artifact(
        &subject,
        Some("application/vnd.example.sig"),
        None,
        Some(json!({"com.example.key": "k1"})),
    );
    let sboms: Vec<_> = (0..4)
        .map(|i| {
            artifact(
                &subject,
                Some("application/spdx+json"),
                None,
                Some(json!({"n": i.to_string()})),
            )
        })
        .collect();
    push_by_digest(&api, "app", &sig).await;
    for s in &sboms {
        push_by_digest(&api, "app", s).await;
    }
    let counter = artifact(
        &Subject::of(&sig, MANIFEST),
        Some("application/vnd.example.countersig"),
        None,
        None,
    );
    push_by_digest(&api, "app", &counter).await;

    // Expected: the subject's referrers by digest; the countersignature
    // under the signature, one level deeper.
    let mut top: Vec<(&[u8], &str, String)> = vec![(
        &sig[..],
        "application/vnd.example.sig",
        "com.example.key=k1".to_owned(),
    )];
    for (i, s) in sboms.iter().enumerate() {
        top.push((&s[..], "application/spdx+json", format!("n={i}")));
    }
    top.sort_by_key(|(m, _, _)| sha256_digest(m));
    let render = |tree: bool| {
        let mut want = format!("app@{}\n", subject.digest);
        for (i, (m, t, annotation)) in top.iter().enumerate() {
            let last = i + 1 == top.len();
            let (branch, inner) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            want.push_str(&format!("{branch}{}\n", line(m, t)));
            want.push_str(&format!("{inner}  {annotation}\n"));
            if tree && m == &&sig[..] {
                want.push_str(&format!(
                    "{inner}└── {}\n",
                    line(&counter, "application/vnd.example.countersig")
                ));
            }
        }
        want
    };

    let subject_arg = format!("app@{}", subject.digest);
    assert_eq!(
        graft_referrers(&graft, &[&subject_arg, "--tree"]),
        render(true)
    );
    assert_eq!(graft_referrers(&graft, &[&subject_arg]), render(false));

    let sigs = graft_referrers(
        &graft,
        &[
            &subject_arg,
            "--tree",
            "--artifact-type",
            "application/vnd.example.sig",
        ],
    );
    assert_eq!(
        sigs,
        format!(
            "app@{}\n└── {}\n      com.example.key=k1\n    └── {}\n",
            subject.digest,
            line(&sig, "application/vnd.example.sig"),
            line(&counter, "application/vnd.example.countersig")
        )
    );

    // --max-depth 1 stops under the signature and says what it left out.
    let shallow = graft_referrers(&graft, &[&subject_arg, "--tree", "--max-depth", "1"]);
    assert!(
        shallow.contains("(1 more referrer(s) below, past --max-depth 1)"),
        "{shallow}"
    );
    assert!(!shallow.contains(&sha256_digest(&counter)), "{shallow}");

    let none = Subject::missing("nothing refers to this");
    assert_eq!(
        graft_referrers(&graft, &[&format!("app@{}", none.digest), "--tree"]),
        format!("app@{}\n(no referrers)\n", none.digest)
    );
}

#[tokio::test]
async fn graft_referrers_passes_credentials_and_explains_a_refusal() {
    let registry = Registry::start_with(RegistryOptions::default().basic_auth("alice", "s3cret"));
    let graft = Graft::start(&registry);
    let alice = Api::for_graft(&graft).with_basic_auth("alice", "s3cret");
    let subject = push_subject(&alice, "app", "v1").await;
    let sig = artifact(&subject, Some("application/vnd.example.sig"), None, None);
    push_by_digest(&alice, "app", &sig).await;
    let subject_arg = format!("app@{}", subject.digest);

    let work = tempfile::tempdir().expect("work dir");
    let out = graft_command(work.path())
        .args(["referrers", &subject_arg, "--graft", &graft.url()])
        .output()
        .expect("run graft referrers");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("graft answered 401") && stderr.contains("--username"),
        "{stderr}"
    );

    let out = graft_command(work.path())
        .args([
            "referrers",
            &subject_arg,
            "--graft",
            &graft.url(),
            "--username",
            "alice",
        ])
        .env("GRAFT_CLIENT_PASSWORD", "s3cret")
        .output()
        .expect("run graft referrers");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&line(&sig, "application/vnd.example.sig"))
    );

    let out = graft_command(work.path())
        .args(["referrers", "app:v1"])
        .output()
        .expect("run graft referrers");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed subject is a usage error"
    );
}
