//! `vmnet-broker man DIR`: man pages from the clap definition (clap_mangen), one per
//! command, each followed by the sections clap does not know: exit status, error codes,
//! files and environment. Section 8: the broker is a system daemon and its client
//! commands talk to it.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Section of every page.
const SECTION: &str = "8";

/// roff for the exit status of each command (client commands share one).
fn exit_status(name: &str) -> &'static str {
    match name {
        "serve" => {
            ".TP\n0\nStopped cleanly: SIGTERM or SIGINT with no client (networks removed), \
             SIGTERM handing clients over to the next broker through systemd's fd store, or \
             \\fB\\-\\-exit\\-on\\-idle\\fR.\n.TP\n1\nCould not start (socket, netlink, \
             nftables, state directory); the reason is logged and printed on stderr.\n.TP\n2\n\
             Invalid command line.\n"
        }
        "run" => {
            ".TP\nN\nThe exit status of COMMAND, or 128 plus the signal that ended it.\n.TP\n1\n\
             The broker refused an acquire (\\fBerror N: message\\fR on stderr, codes below) \
             or could not be reached; COMMAND did not run.\n.TP\n2\nInvalid command line.\n"
        }
        "check-config" => {
            ".TP\n0\nEvery network file is valid.\n.TP\n1\nAt least one file is invalid (each \
             is named on stderr with the reason) or the directory cannot be read.\n.TP\n2\n\
             Invalid command line.\n"
        }
        "completions" => ".TP\n0\nThe script was printed.\n.TP\n2\nUnknown shell.\n",
        _ => {
            ".TP\n0\nSuccess.\n.TP\n1\nThe broker answered with an error (printed on stderr \
             as \\fBerror N: message\\fR, codes below) or could not be reached (error 1).\n\
             .TP\n2\nInvalid command line.\n"
        }
    }
}

/// The protocol's error codes (docs/protocol.md, Errors), from the client crate's table.
fn error_codes() -> String {
    use vmnet_broker_client::protocol::strerror;
    let meaning = [
        "cannot connect to the broker, or the connection broke (client side)",
        "the broker's reply is malformed (client side)",
        "the caller's uid or groups are not allowed to use the network",
        "malformed request, bad network name or MAC, or MAC in use",
        "no such network, or its definition file is invalid",
        "creating the network or its TAP failed",
        "anything else, such as a broker that is shutting down",
    ];
    let mut s = String::new();
    for (i, m) in meaning.iter().enumerate() {
        let code = i as i64 + 1;
        s += &format!(".TP\n{code}\n{} \\(em {m}.\n", strerror(code));
    }
    s
}

const FILES: &str = ".TP\n/run/vmnet\\-broker/vmnet\\-broker.sock\nThe broker's socket \
    (SOCK_SEQPACKET), group vmnet\\-broker.\n.TP\n/etc/vmnet\\-broker.d/*.json\nOne network \
    per file; see example.json.disabled there and docs/configuration.md.\n.TP\n\
    /var/lib/vmnet\\-broker/\nDHCP leases and broker\\-state.json, which a restarted broker \
    adopts.\n";

const ENVIRONMENT: &str = ".TP\nVMNET_BROKER_SOCKET\nThe socket, instead of the default.\n\
    .TP\nVMNET_BROKER_LOG\n\\fBserve\\fR's log level or tracing filter.\n.TP\nJOURNAL_STREAM\n\
    Set by systemd to stderr's device and inode when it is the journal: \\fBserve\\fR then logs to journald with the fields NETWORK, CLIENT_PID, \
    CLIENT_UID and ERROR_CODE (\\fBjournalctl \\-u vmnet\\-broker NETWORK=shared\\fR).\n";

/// Renders one page: clap's sections, then ours.
fn render(cmd: clap::Command, short: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd).section(SECTION).render(out)?;
    write!(out, ".SH \"EXIT STATUS\"\n{}", exit_status(short))?;
    if !matches!(short, "completions" | "check-config") {
        write!(
            out,
            ".SH ERRORS\nError codes of the protocol, as \\fBerror N\\fR shows them \
            and client libraries return them:\n{}",
            error_codes()
        )?;
    }
    write!(out, ".SH FILES\n{FILES}.SH ENVIRONMENT\n{ENVIRONMENT}")?;
    Ok(())
}

/// Writes `vmnet-broker.8` and `vmnet-broker-<sub>.8` for every visible subcommand.
pub fn write_all(cmd: clap::Command, dir: &Path) -> super::Result {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    // Fills in each subcommand's display name (vmnet-broker-serve) and inherited settings.
    cmd.build();
    let mut pages = vec![(cmd.clone(), String::new())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages.push((sub.clone(), sub.get_name().to_string()));
    }
    for (page, short) in pages {
        let file = dir.join(format!(
            "{}.{SECTION}",
            page.get_display_name().unwrap_or(page.get_name())
        ));
        let mut text = Vec::new();
        render(page, &short, &mut text)?;
        std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_code_has_its_standard_string() {
        let codes = super::error_codes();
        for code in 1..=7 {
            let line = format!("{code}\n{}", vmnet_broker_client::protocol::strerror(code));
            assert!(codes.contains(&line), "{code}: {codes}");
        }
    }
}
