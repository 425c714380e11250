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
