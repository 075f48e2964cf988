//! The `graft` binary: parse the command line, load the configuration, set
//! up logging, and hand over to the library.

mod progress;

use std::process::ExitCode;

use clap::Parser;
use graft::cli::{
    CacheCommand, CacheWarmArgs, Cli, Command, DoctorArgs, MigrateArgs, ReferrersArgs, ReindexArgs,
};
use graft::config::{Config, ConfigErrors, LogFormat};
use progress::{Bar, Lines};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match args.load() {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log.format, std::io::stderr);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("graft: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config))
        }
        Command::Reindex(args) => reindex(&args),
        Command::Referrers(args) => referrers(&args),
        Command::Cache(args) => cache(args.command),
        Command::Migrate(args) => migrate(&args),
        Command::Doctor(args) => doctor(&args),
        Command::Completions { shell } => {
            Cli::completions(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => match Cli::man(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("graft man: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Healthcheck { url } => match healthcheck(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("graft healthcheck: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `graft reindex`: exit 0 when everything was read and decided, 1 when
/// something is left (the summary says what) or the index is held by a
/// running graft, 2 for bad arguments.
fn reindex(args: &ReindexArgs) -> ExitCode {
    let config = match args.load() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let Some(repos) = repo_names(&args.repos, "graft reindex") else {
        return ExitCode::from(2);
    };
    // Draws only when stderr is a terminal; log lines go above it.
    let bar = Bar::new();
    let above = bar.clone();
    init_logging(config.log.format, move || AboveBar(above.clone()));
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    // `run` finishes the bar on every path, so an error prints cleanly.
    match runtime.block_on(graft::admin::reindex::run(&config, &repos, &bar)) {
        Ok(summary) => {
            println!("{summary}");
            if summary.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("graft reindex: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `--repo` values of `command`, or `None` after saying which is not a
/// repository name.
fn repo_names(names: &[String], command: &str) -> Option<Vec<graft::oci::RepoName>> {
    names
        .iter()
        .map(|r| graft::oci::RepoName::parse(r).map_err(|e| eprintln!("{command}: --repo {e}")))
        .collect::<Result<_, ()>>()
        .ok()
}

/// `graft migrate`: exit 0 when every fallback-tag referrer is listed by
/// the registry's own referrers API, 1 when something is left (failed, or
/// a dry run found work), 2 for bad arguments.
fn migrate(args: &MigrateArgs) -> ExitCode {
    use graft::admin::migrate;
    let config = match args.load() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let Some(repos) = repo_names(&args.repos, "graft migrate") else {
        return ExitCode::from(2);
    };
    let opts = migrate::MigrateOptions {
        repos,
        dry_run: args.dry_run,
        remove_fallback_tags: args.remove_fallback_tags,
    };
    let bar = Bar::new();
    let above = bar.clone();
    init_logging(config.log.format, move || AboveBar(above.clone()));
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(migrate::run(&config, &opts, &bar)) {
        Ok(summary) => {
            println!("{summary}");
            if summary.is_complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("graft migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `graft referrers`: exit 0 with the listing on stdout, 1 when graft could
/// not be asked or refused, 2 for a malformed subject.
fn referrers(args: &ReferrersArgs) -> ExitCode {
    use graft::admin::listing;
    let (repo, subject) = match listing::parse_subject(&args.subject) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("graft referrers: {e}");
            return ExitCode::from(2);
        }
    };
    let auth = match args.client.authorization() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("graft referrers: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = listing::ListOptions {
        graft: args.client.graft.clone(),
        artifact_types: args.artifact_types.clone(),
        tree: args.tree,
        max_depth: args.max_depth.max(1),
        auth,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(listing::fetch(&opts, &repo, &subject)) {
        Ok(nodes) => {
            print!("{}", listing::render(&repo, &subject, &nodes));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("graft referrers: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `graft doctor`: exit 0 when graft can serve the registry fully, 1 when
/// something graft needs fails, 2 for usage errors or no answer at all.
fn doctor(args: &DoctorArgs) -> ExitCode {
    use graft::admin::doctor;
    let config = match args.load() {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let fail = |e: String| {
        eprintln!("graft doctor: {e}");
        ExitCode::from(2)
    };
    let auth = match args.authorization(&config) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let timeout = match humantime::parse_duration(&args.timeout) {
        Ok(t) => t,
        Err(e) => return fail(format!("--timeout `{}`: {e}", args.timeout)),
    };
    let opts = doctor::DoctorOptions {
        upstream: config.upstream.url.clone(),
        auth,
        ca_file: config.upstream.ca_file.clone(),
        timeout,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let report = runtime.block_on(doctor::run(&opts));
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    ExitCode::from(report.exit_code())
}

/// `graft cache stats|gc|verify|warm`. Exit codes: 0 when the command did
/// all it was asked (stats printed; the cache within its budget after gc;
/// every file sound for verify — so a cron job notices corruption; every
/// image pulled completely for warm); 1 otherwise, or when the data
/// directory cannot be used (a running graft holds it…) or graft cannot be
/// asked; 2 for a bad configuration, image reference or credentials.
fn cache(command: CacheCommand) -> ExitCode {
    use graft::admin::cache;
    match command {
        CacheCommand::Stats(args) => with_config(args.load(|_| {}), |config| {
            init_logging(config.log.format, std::io::stderr);
            finish("cache stats", cache::stats(&config), |_| true)
        }),
        CacheCommand::Gc(args) => with_config(args.load(), |config| {
            init_logging(config.log.format, std::io::stderr);
            finish("cache gc", cache::gc(&config), |r| r.within_budget())
        }),
        CacheCommand::Verify(args) => with_config(args.load(|_| {}), |config| {
            // Draws only when stderr is a terminal; log lines go above it.
            let bar = Bar::new();
            let above = bar.clone();
            init_logging(config.log.format, move || AboveBar(above.clone()));
            finish("cache verify", cache::verify(&config, &bar), |r| {
                r.is_clean()
            })
        }),
        CacheCommand::Warm(args) => cache_warm(&args),
    }
}

/// Runs `run` with the loaded configuration, or reports every bad key and
/// exits 2.
fn with_config(
    loaded: Result<Config, ConfigErrors>,
    run: impl FnOnce(Config) -> ExitCode,
) -> ExitCode {
    match loaded {
        Ok(config) => run(config),
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

/// `graft cache warm`: pulls through a running graft; see [`cache`] for the
/// exit codes.
fn cache_warm(args: &CacheWarmArgs) -> ExitCode {
    use graft::admin::warm;
    let mut images = Vec::with_capacity(args.images.len());
    for s in &args.images {
        match warm::ImageRef::parse(s) {
            Ok(r) => images.push(r),
            Err(e) => {
                eprintln!("graft cache warm: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let auth = match args.client.authorization() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("graft cache warm: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = warm::WarmOptions {
        graft: args.client.graft.clone(),
        auth,
        jobs: args.jobs.max(1),
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    // One bar per image; drawn only when stderr is a terminal.
    let warmed = runtime.block_on(warm::run(&opts, &images, &Lines::new()));
    finish("cache warm", warmed, |s| s.is_complete())
}

/// Prints a command's report on stdout, or its error on stderr, and gives
/// the exit code: 0 when `ok` holds for the report, else 1.
fn finish<R: std::fmt::Display, E: std::fmt::Display>(
    command: &str,
    result: Result<R, E>,
    ok: impl FnOnce(&R) -> bool,
) -> ExitCode {
    match result {
        Ok(report) => {
            println!("{report}");
            if ok(&report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("graft {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A runtime for the one-shot commands.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("graft: cannot start the runtime: {e}");
            None
        }
    }
}

/// Writes log lines to stderr with the progress bar lifted out of the way,
/// so neither overwrites the other.
struct AboveBar(Bar);

impl std::io::Write for AboveBar {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A minimal HTTP/1.1 GET, so the container image needs no curl.
fn healthcheck(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(|e| e.to_string())?;
    if &head[9..12] == b"200" {
        Ok(())
    } else {
        Err(format!("status {}", String::from_utf8_lossy(&head[9..12])))
    }
}

async fn serve(config: graft::Config) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.server.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match graft::run(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "graft stopped");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

fn init_logging<W>(format: LogFormat, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: a log file or a log
    // collector would keep them as noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
