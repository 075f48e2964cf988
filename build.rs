//! Puts the build's git commit into `GRAFT_COMMIT` for `graft --version`:
//! the `GRAFT_COMMIT` environment variable when set (the Dockerfile's build
//! argument, where no .git is copied in), else `git rev-parse --short HEAD`,
//! else "unknown".

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GRAFT_COMMIT");
    let commit = std::env::var("GRAFT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it
    // names (a commit). Only existing paths: cargo reruns a build script
    // on every build for a path that does not exist.
    if let Some(git_dir) = git(&["rev-parse", "--git-dir"]).map(PathBuf::from) {
        let head = git_dir.join("HEAD");
        rerun_if_exists(&head);
        if let Some(branch) = std::fs::read_to_string(&head)
            .ok()
            .and_then(|h| h.strip_prefix("ref: ").map(|r| r.trim().to_owned()))
        {
            let common = git(&["rev-parse", "--git-common-dir"])
                .map(PathBuf::from)
                .unwrap_or(git_dir);
            rerun_if_exists(&common.join(&branch));
            rerun_if_exists(&common.join("packed-refs"));
        }
    }
    println!("cargo:rustc-env=GRAFT_COMMIT={}", commit.trim());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn rerun_if_exists(path: &std::path::Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
