use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};
use vmnet_broker_client::client::Client;
use vmnet_broker_client::protocol::{BrokerError, Mac, parse_guest_mac};

/// One `--network` argument: `NAME[,mac=MAC][,persistent]`.
#[derive(Debug, PartialEq)]
struct NetworkArg<'a> {
    name: &'a str,
    mac: Option<Mac>,
    persistent: bool,
}

fn parse_network(arg: &str) -> Result<NetworkArg<'_>, BrokerError> {
    let mut parts = arg.split(',');
    let mut n = NetworkArg {
        name: parts.next().unwrap_or_default(),
        mac: None,
        persistent: false,
    };
    for option in parts {
        match option.split_once('=') {
            Some(("mac", mac)) if n.mac.is_none() => n.mac = Some(parse_guest_mac(mac)?),
            None if option == "persistent" => n.persistent = true,
            _ => {
                return Err(BrokerError::invalid(format!(
                    "--network {arg:?}: expected NAME[,mac=MAC][,persistent]"
                )));
            }
        }
    }
    Ok(n)
}

/// One `--forward` argument: `PROTO:EXT:INT[,network=NAME]`.
#[derive(Debug, PartialEq)]
struct ForwardArg<'a> {
    protocol: &'a str,
    external: u16,
    internal: u16,
    network: Option<&'a str>,
}

fn parse_forward(arg: &str) -> Result<ForwardArg<'_>, BrokerError> {
    let bad = || {
        BrokerError::invalid(format!(
            "--forward {arg:?}: expected PROTO:EXT:INT[,network=NAME] with PROTO tcp or udp \
             and ports from 1 to 65535"
        ))
    };
    let (spec, network) = match arg.split_once(',') {
        None => (arg, None),
        Some((spec, rest)) => match rest.split_once('=') {
            Some(("network", name)) if !name.is_empty() => (spec, Some(name)),
            _ => return Err(bad()),
        },
    };
    let mut parts = spec.split(':');
    let (Some(protocol), Some(external), Some(internal), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    if protocol != "tcp" && protocol != "udp" {
        return Err(bad());
    }
    Ok(ForwardArg {
        protocol,
        external: port(external)?,
        internal: port(internal)?,
        network,
    })
}

/// The signals `run` passes on to its command instead of dying of them.
const FORWARDED: [nix::sys::signal::Signal; 4] = [
    nix::sys::signal::Signal::SIGINT,
    nix::sys::signal::Signal::SIGTERM,
    nix::sys::signal::Signal::SIGHUP,
    nix::sys::signal::Signal::SIGQUIT,
];

pub fn main(
    socket: &Path,
    networks: &[String],
    forwards: &[String],
    command: &[String],
) -> super::Result {
    // All arguments are checked before anything is acquired.
    let forwards = forwards
        .iter()
        .map(|f| parse_forward(f))
        .collect::<Result<Vec<_>, _>>()?;
    let client = Client::connect(socket)?;
    // (network, TAP) of each acquire, for the forwards.
    let mut taps: Vec<(String, String)> = Vec::new();
    let first = 3 + networks.len() as i32;
    let mut replies = Vec::new();
    let mut staged: Vec<OwnedFd> = Vec::new();
    for (i, arg) in networks.iter().enumerate() {
        let n = parse_network(arg)?;
        let acquired = client.acquire_with(n.name, n.mac, n.persistent)?;
        super::acquire::verify(&acquired)?;
        taps.push((n.name.to_string(), acquired.info.interface.clone()));
        replies.push(super::acquire::describe(&acquired, 3 + i as i32));
        // Park every TAP above the target range first, so moving them down to 3, 4, ...
        // in the child can never overwrite one that is still to be moved.
        staged.push(
            nix::fcntl::fcntl(&acquired.fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(first))
                // SAFETY: F_DUPFD_CLOEXEC just returned a new descriptor that nothing else
                // refers to, so the OwnedFd is its only owner.
                .map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })?,
        );
    }
    for f in &forwards {
        let (network, tap) = match f.network {
            None => &taps[0],
            Some(name) => taps.iter().find(|(n, _)| n == name).ok_or_else(|| {
                BrokerError::invalid(format!("--forward: no --network named {name:?}"))
            })?,
        };
        client.forward(network, f.protocol, f.external, f.internal, tap)?;
    }
    let raw: Vec<i32> = staged.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]).env(
        "VMNET_BROKER_NETWORKS",
        serde_json::Value::Array(replies).to_string(),
    );
    let parent = nix::unistd::getpid().as_raw();
    // SAFETY: pre_exec's closure runs between fork and exec in a child that may have
    // inherited locks held by other threads, so it must only make async-signal-safe calls
    // and not allocate: it makes only dup2, signal, prctl, getppid and _exit, and reads
    // `raw`, `FORWARDED` and `parent`, all built before the fork (last_os_error() does
    // not allocate either).
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                // dup2 onto a new number clears FD_CLOEXEC there, so exactly these survive.
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Until exec the child still has our (tokio's) handlers, which would swallow
            // the death signal below; exec resets them to the default anyway.
            for sig in FORWARDED {
                libc::signal(sig as libc::c_int, libc::SIG_DFL);
            }
            // If we die without forwarding (SIGKILL, OOM killer), our connection and with
            // it the lease end while the command would keep using the TAPs: have the
            // kernel send it SIGTERM. The signal is sent when the *thread* that forked
            // exits, not the process: the spawn below runs on the main thread (in
            // block_on of a current-thread runtime), which lives until we exit. Keep it so.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died before the prctl: then no signal will ever come.
            if libc::getppid() != parent {
                libc::_exit(128 + libc::SIGTERM);
            }
            Ok(())
        });
    }
    // Handlers go in before the command starts: a signal in between would otherwise
    // kill us with the default action instead of reaching the command.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut sigquit = signal(SignalKind::quit())?;
        // Handlers are reset to the default on exec, so the command is unaffected.
        let mut child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run {:?}: {e}", command[0])))?;
        drop(staged);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let waiter = tokio::task::spawn_blocking(move || child.wait());
        tokio::pin!(waiter);
        loop {
            tokio::select! {
                status = &mut waiter => return status.expect("wait task"),
                _ = sigint.recv() => { let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT); }
                _ = sigterm.recv() => { let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM); }
                _ = sighup.recv() => { let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP); }
                _ = sigquit.recv() => { let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT); }
            }
        }
    })?;
    // The lease ends only now that the command is gone.
    drop(client);
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(ExitCode::from(code as u8))
}

#[cfg(test)]
mod tests {
    use super::{ForwardArg, Mac, parse_forward, parse_network};

    #[test]
    fn forward_arguments() {
        assert_eq!(
            parse_forward("tcp:2222:22").unwrap(),
            ForwardArg {
                protocol: "tcp",
                external: 2222,
                internal: 22,
                network: None
            }
        );
        let f = parse_forward("udp:5353:53,network=host").unwrap();
        assert_eq!((f.protocol, f.network), ("udp", Some("host")));
        for bad in [
            "tcp:2222",
            "sctp:1:2",
            "tcp:0:22",
            "tcp:70000:22",
            "tcp:1:2:3",
            "tcp:1:2,net=x",
            "tcp:1:2,network=",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn network_arguments() {
        let n = parse_network("shared").unwrap();
        assert_eq!((n.name, n.mac, n.persistent), ("shared", None, false));
        let n = parse_network("host,mac=52:54:00:00:00:01").unwrap();
        assert_eq!(
            (n.name, n.mac),
            ("host", Some(Mac::new([0x52, 0x54, 0, 0, 0, 1])))
        );
        let n = parse_network("fc,persistent,mac=52:54:00:00:00:02").unwrap();
        assert!(n.persistent && n.mac.is_some());
        assert!(parse_network("host,mtu=9000").is_err());
        assert!(parse_network("host,persistent=1").is_err());
        assert!(parse_network("host,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02").is_err());
        assert!(parse_network("host,mac=ff:ff:ff:ff:ff:ff").is_err());
    }
}
