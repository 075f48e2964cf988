//! Command-line conventions: completions that a real bash loads and uses,
//! a man page groff renders, and `--version` naming the build's commit.

use std::process::Command;

fn graft(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_graft"))
        .args(args)
        .output()
        .expect("run graft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SUBCOMMANDS: &[&str] = &[
    "serve",
    "healthcheck",
    "reindex",
    "referrers",
    "cache",
    "doctor",
    "completions",
    "man",
];

#[test]
fn bash_completion_loads_and_completes_subcommands_and_options() {
    let (ok, script, stderr) = graft(&["completions", "bash"]);
    assert!(ok, "{stderr}");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("graft.bash");
    std::fs::write(&path, &script).expect("write script");
    // Load the script, check it registered a completion for `graft`, then
    // drive its function as bash's completion machinery would.
    let probe = format!(
        r#"source {path}
complete -p graft || exit 3
fn=$(complete -p graft | sed -n 's/.*-F \([^ ]*\).*/\1/p')
complete_words() {{
  COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
  COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}
  COMPREPLY=()
  "$fn" graft "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
  printf '%s\n' "${{COMPREPLY[@]}}"
}}
echo "--- subcommands"
complete_words graft do
echo "--- doctor options"
complete_words graft doctor --up
echo "--- shells"
complete_words graft completions ''
"#,
        path = path.display()
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bash: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section = |name: &str| -> Vec<String> {
        stdout
            .split(&format!("--- {name}\n"))
            .nth(1)
            .unwrap_or_default()
            .split("---")
            .next()
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(section("subcommands"), ["doctor"], "{stdout}");
    let options = section("doctor options");
    for o in ["--upstream", "--upstream-username", "--upstream-ca-file"] {
        assert!(options.iter().any(|x| x == o), "{o} in {options:?}");
    }
    let shells = section("shells");
    for s in ["bash", "zsh", "fish"] {
        assert!(shells.iter().any(|x| x == s), "{s} in {shells:?}");
    }
}

#[test]
fn zsh_and_fish_completions_name_every_subcommand() {
    for shell in ["zsh", "fish"] {
        let (ok, script, stderr) = graft(&["completions", shell]);
        assert!(ok, "{shell}: {stderr}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let (ok, _, stderr) = graft(&["completions", "tcsh"]);
    assert!(!ok, "an unknown shell is refused");
    assert!(
        stderr.contains("bash"),
        "the error lists the shells: {stderr}"
    );
}

#[test]
fn the_man_page_is_roff_that_groff_renders_with_every_subcommand() {
    let (ok, page, stderr) = graft(&["man"]);
    assert!(ok, "{stderr}");
    assert!(
        page.starts_with(".ie") || page.contains("\n.TH graft 1"),
        "{page}"
    );
    assert!(page.contains(".TH graft 1"), "no .TH header");
    for sub in SUBCOMMANDS {
        assert!(page.contains(sub), "the man page lacks {sub}");
    }
    // Each subcommand's options are in the page too.
    assert!(page.contains("GRAFT DOCTOR"), "no section for graft doctor");
    assert!(
        page.contains("upstream\\-ca\\-file"),
        "doctor's options missing"
    );

    let Ok(groff) = which("groff") else {
        eprintln!("SKIPPED groff rendering: groff is not installed");
        return;
    };
    let mut child = Command::new(groff)
        .args(["-k", "-man", "-Tutf8", "-ww"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run groff");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("feed groff");
    let out = child.wait_with_output().expect("groff output");
    let text = String::from_utf8_lossy(&out.stdout);
    let warnings = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "groff failed: {warnings}");
    assert!(warnings.trim().is_empty(), "groff warns:\n{warnings}");
    // groff overstrikes bold with backspaces in -Tutf8; drop them to read.
    let plain: String = strip_overstrike(&text);
    assert!(plain.contains("NAME") && plain.contains("graft"), "{plain}");
    assert!(plain.contains("doctor"), "{plain}");
}

fn strip_overstrike(text: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in text.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    // Also drop SGR escapes when groff emits them instead.
    let s: String = out.into_iter().collect();
    let mut plain = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn version_names_the_build_commit() {
    let (ok, out, stderr) = graft(&["--version"]);
    assert!(ok, "{stderr}");
    let line = out.trim();
    let commit = line
        .strip_prefix(&format!("graft {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("`{line}` is not `graft <version> (<commit>)`"));
    // Built from a git checkout (as the tests are), it is HEAD's short
    // hash, or the GRAFT_COMMIT the build was given.
    let expected = match std::env::var("GRAFT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => {
            let head = Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
            match head {
                Some(full) => {
                    assert!(
                        full.starts_with(commit) && commit.len() >= 7,
                        "`{commit}` is not a prefix of HEAD {full}"
                    );
                    return;
                }
                None => "unknown".to_owned(),
            }
        }
    };
    assert_eq!(commit, expected);
}
