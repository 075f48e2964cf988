//! `./scripts/try`, the README's first command, run as a newcomer runs it:
//! in a real terminal (a tmux pane), on ephemeral ports, with graft built by
//! cargo for the tests (`GRAFT_BIN`, so no release build here). The story's
//! steps appear on screen, and afterwards — at its end with
//! `GRAFT_TRY_EXIT=1`, or on Ctrl-C — no process and no temporary file is
//! left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connection_refused, free_port, require_tool};

/// A tmux server of the test's own (its own socket): dropping it kills the
/// server and whatever still runs in its pane.
struct Terminal {
    socket: String,
}

impl Terminal {
    /// Runs `command` (through `sh -c`) in a detached 250×50 pane that stays
    /// readable after the command ends.
    fn run(command: &str) -> Terminal {
        let socket = format!("graft-try-test-{}-{}", std::process::id(), free_port());
        let term = Terminal { socket };
        term.tmux(&["new-session", "-d", "-s", "try", "-x", "250", "-y", "50"]);
        term.tmux(&["set-option", "-t", "try", "remain-on-exit", "on"]);
        term.tmux(&["set-option", "-t", "try", "history-limit", "5000"]);
        term.tmux(&["respawn-pane", "-k", "-t", "try", command]);
        term
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new(require_tool("tmux"))
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything the pane showed, wrapped lines joined.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-", "-t", "try"])
    }

    fn wait_for(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "`{text}` did not appear within {timeout:?}; the terminal shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// The ports and the directory a run uses, and the command that runs it.
struct Run {
    registry_port: u16,
    graft_port: u16,
    /// `TMPDIR` for the script: its temporary directory goes in here.
    tmp: tempfile::TempDir,
}

impl Run {
    fn new() -> Run {
        for tool in ["docker-registry", "skopeo", "curl", "tmux"] {
            require_tool(tool);
        }
        Run {
            registry_port: free_port(),
            graft_port: free_port(),
            tmp: tempfile::Builder::new()
                .prefix("graft-try-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    fn command(&self, exit_after_story: bool) -> String {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        format!(
            // The pane's shell traps Ctrl-C (a trap, unlike an ignored
            // signal, is not inherited) so that it lives to print the
            // script's exit status.
            "trap : INT; cd '{}' && env TMPDIR='{}' GRAFT_BIN='{}' GRAFT_TRY_REGISTRY_PORT={} GRAFT_TRY_PORT={} \
             GRAFT_TRY_EXIT={} sh scripts/try; echo TRY-EXIT=$?",
            repo.display(),
            self.tmp.path().display(),
            env!("CARGO_BIN_EXE_graft"),
            self.registry_port,
            self.graft_port,
            u8::from(exit_after_story),
        )
    }

    /// Nothing left: the script's directory is gone, both ports refuse
    /// connections and no process names the directory.
    fn assert_nothing_left(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.tmp.path())
            .expect("read TMPDIR")
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        for port in [self.registry_port, self.graft_port] {
            let addr = format!("127.0.0.1:{port}").parse().expect("address");
            common::wait_until(Duration::from_secs(10), "the port to close", || {
                connection_refused(addr)
            });
        }
        let needle = self.tmp.path().to_string_lossy().into_owned();
        let running: Vec<String> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|e| {
                let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                // The tmux pane's own shell names it only as TMPDIR=…, and
                // ends with the test.
                (cmdline.contains(&needle) && !cmdline.contains("TRY-EXIT")).then_some(cmdline)
            })
            .collect();
        assert!(running.is_empty(), "still running: {running:?}");
    }
}

#[test]
fn the_story_runs_in_a_terminal_and_leaves_nothing_behind() {
    let run = Run::new();
    let term = Terminal::run(&run.command(true));
    let screen = term.wait_for("TRY-EXIT=", Duration::from_secs(240));
    assert!(screen.contains("TRY-EXIT=0"), "{screen}");

    // Pushed through graft, with referrers both ways.
    assert!(
        screen.contains("Pushing demo/hello:1.0 (linux/amd64 + linux/arm64) through graft"),
        "{screen}"
    );
    let tree: Vec<&str> = screen
        .lines()
        .skip_while(|l| !l.contains("graft referrers --tree"))
        .take_while(|l| !l.contains("(raw: curl"))
        .collect();
    for kind in [
        "application/vnd.example.signature",
        "application/spdx+json",
        "application/vnd.example.vuln-scan",
    ] {
        assert!(
            tree.iter()
                .any(|l| l.contains(kind) && l.contains("sha256:")),
            "graft's API lists no {kind}:\n{screen}"
        );
        assert!(
            screen.contains(&format!("tag entry: {kind}  sha256:")),
            "the registry's tag lists no {kind}:\n{screen}"
        );
    }

    // The pull again hits the cache; with the registry down graft serves it all.
    let after = screen
        .lines()
        .find(|l| l.trim_start().starts_with("after:"))
        .unwrap_or_else(|| panic!("no counts after the pull:\n{screen}"));
    let hits: u64 = after
        .split("cache hits ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hit count in `{after}`"));
    assert!(hits > 0, "{after}");
    assert!(
        screen.contains("answers 000"),
        "the registry was stopped:\n{screen}"
    );
    assert!(
        screen.contains("with the registry down: 7 of 7 requests answered 200"),
        "{screen}"
    );
    assert!(screen.contains("status page:"), "{screen}");
    assert!(screen.contains("GRAFT_TRY_EXIT=1: cleaning up"), "{screen}");
    assert!(
        screen.contains("stopped graft and the registry, removed"),
        "{screen}"
    );
    run.assert_nothing_left();
}

#[test]
fn ctrl_c_stops_graft_and_the_registry_and_removes_everything() {
    let run = Run::new();
    let term = Terminal::run(&run.command(false));
    term.wait_for("Press Ctrl-C", Duration::from_secs(240));
    // Both are up while it waits.
    let graft = format!("127.0.0.1:{}", run.graft_port);
    let registry = format!("127.0.0.1:{}", run.registry_port);
    for addr in [&graft, &registry] {
        assert!(
            !connection_refused(addr.parse().expect("address")),
            "{addr} is down"
        );
    }
    term.tmux(&["send-keys", "-t", "try", "C-c"]);
    let screen = term.wait_for("TRY-EXIT=", Duration::from_secs(30));
    assert!(screen.contains("TRY-EXIT=130"), "{screen}");
    assert!(
        screen.contains("stopped graft and the registry, removed"),
        "{screen}"
    );
    run.assert_nothing_left();
}
