//! One module per subcommand. Client commands report broker errors as
//! `error N: message` on stderr and exit 1.
//!
//! On macOS `serve`, `acquire`, `status` and `run` are the files of `cmd/macos/` (XPC and
//! vmnet instead of the socket and TAPs); `check-config` is shared.

#[cfg_attr(target_os = "macos", path = "macos/acquire.rs")]
pub mod acquire;
pub mod check_config;
#[cfg(target_os = "linux")]
pub mod leases;
#[cfg(target_os = "linux")]
pub mod list;
pub mod man;
#[cfg(target_os = "linux")]
pub mod metrics;
#[cfg_attr(target_os = "macos", path = "macos/run.rs")]
pub mod run;
#[cfg_attr(target_os = "macos", path = "macos/serve.rs")]
pub mod serve;
#[cfg(target_os = "linux")]
pub mod show;
#[cfg_attr(target_os = "macos", path = "macos/status.rs")]
pub mod status;
#[cfg(target_os = "linux")]
mod table;

/// What a subcommand ends with; the message is printed to stderr.
pub type Result = std::result::Result<std::process::ExitCode, Box<dyn std::error::Error>>;

/// Writes to stdout like `print!`, but a reader that went away (`vmnet-broker status |
/// head -1`) ends the process quietly with status 0 instead of `println!`'s panic: Rust
/// ignores SIGPIPE, so a closed pipe is an EPIPE error here, and what was left to print
/// has no reader anyway. Other write errors (a full disk) are reported and exit 1.
pub fn write_stdout(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`write_stdout`].
macro_rules! outln {
    () => { $crate::cmd::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cmd::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}
pub(crate) use outln;

/// The longest timeout accepted: a year. Much longer ones would overflow when added to
/// the current time (a panic in the middle of serving), and mean "never" anyway.
const MAX_SECONDS: f64 = 31_536_000.0;

/// `--{what} {s}` as a duration, for `serve`'s timeouts on every platform.
pub fn seconds(what: &str, s: f64) -> std::result::Result<std::time::Duration, String> {
    if s > MAX_SECONDS {
        return Err(format!(
            "--{what} {s}: too long, at most {MAX_SECONDS} seconds (a year)"
        ));
    }
    std::time::Duration::try_from_secs_f64(s)
        .map_err(|_| format!("--{what} {s}: not a number of seconds"))
}

/// Where and how `serve` logs (`--log-format`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when stderr is systemd's journal stream (JOURNAL_STREAM), text otherwise.
    Auto,
    /// Lines of text on stderr (colored on a terminal).
    Text,
    /// One JSON object per line on stderr, with the event's fields.
    Json,
    /// journald's native protocol, each field its own journal field (NETWORK=, CLIENT_PID=...).
    #[cfg(target_os = "linux")]
    Journald,
}

/// Sends `serve`'s logs where `format` says, filtered by `--log-level`.
pub fn init_logging(level: &str, format: LogFormat) -> std::result::Result<(), String> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    #[cfg(target_os = "linux")]
    {
        // Under systemd with stderr on the journal, fields reach it as fields instead of
        // text inside MESSAGE.
        let journal =
            format == LogFormat::Journald || (format == LogFormat::Auto && stderr_is_journal());
        if journal {
            match tracing_journald::layer() {
                // No prefix: `network` becomes NETWORK=, as journalctl matches are written.
                Ok(layer) => {
                    registry
                        .with(
                            layer
                                .with_field_prefix(None)
                                .with_syslog_identifier("vmnet-broker".into()),
                        )
                        .init();
                    return Ok(());
                }
                Err(e) if format == LogFormat::Journald => {
                    return Err(format!("--log-format journald: cannot reach journald: {e}"));
                }
                // Under systemd without a journal socket: text to stderr still gets logged.
                Err(_) => {}
            }
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if format == LogFormat::Json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init();
    }
    Ok(())
}

/// True when stderr is the journal stream systemd set up: JOURNAL_STREAM holds its
/// `DEVICE:INODE`. A process whose stderr was redirected (a test harness, a pipe to a
/// file) inherits the variable all the same, so it counts only when stderr is still that
/// stream, as systemd.exec(5) advises.
#[cfg(target_os = "linux")]
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<libc::dev_t>(), ino.parse::<libc::ino_t>()) else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_fd())
        .is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
}

/// `acquire --hold`: waits for SIGINT or SIGTERM, so the caller releases what it holds
/// only then.
pub fn hold_until_signal(count: usize) -> nix::Result<()> {
    eprintln!("holding {count} network(s); press Ctrl-C to release");
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.thread_block()?;
    set.wait()?;
    Ok(())
}

/// `status`'s first line (the broker itself), then a blank line.
pub fn print_status_header(status: &vmnet_broker::protocol::Status) {
    outln!(
        "vmnet-broker {} (protocol {}), pid {}, idle timeout {}s",
        status.version,
        status.protocol,
        status.pid,
        status.idle_timeout_seconds
    );
    outln!();
}

/// `status`'s table of clients, after a blank line.
pub fn print_status_clients(status: &vmnet_broker::protocol::Status) {
    outln!();
    outln!("{:<6} {:>8} {:>6}  NETWORKS", "CLIENT", "PID", "UID");
    if status.truncated {
        outln!("(lists cut to fit one message: there are more clients or TAPs than shown)");
    }
    for c in &status.clients {
        outln!(
            "{:<6} {:>8} {:>6}  {}",
            c.id,
            c.pid,
            c.uid,
            c.networks.join(",")
        );
    }
}

/// A removal countdown as `status` shows it: `in 12s`, or `-` for none.
pub fn removal_text(seconds: Option<f64>) -> String {
    seconds
        .map(|s| format!("in {s:.0}s"))
        .unwrap_or_else(|| "-".into())
}
