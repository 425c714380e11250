//! `vmnet-broker`: the daemon (`serve`) and its client commands.

mod cmd;

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(target_os = "macos")]
use vmnet_broker::xpc::{MACH_SERVICE, SERVICE_ENV};
#[cfg(target_os = "linux")]
use vmnet_broker_client::protocol::{DEFAULT_SOCKET, SOCKET_ENV};

#[derive(Parser)]
#[command(
    name = "vmnet-broker",
    version,
    about = "Shared, named virtual networks for unprivileged VM launchers",
    long_about = "Shared, named virtual networks for unprivileged VM launchers.\n\n\
        `serve` runs the broker (as root). Clients acquire networks by name and receive a TAP \
        file descriptor already attached to the network's bridge; the connection is the lease."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[cfg(target_os = "linux")]
#[derive(clap::Args, Clone)]
struct SocketArg {
    /// The broker's socket.
    #[arg(long, env = SOCKET_ENV, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    socket: PathBuf,
}

/// On macOS the broker is a Mach service, not a socket (docs/macos.md).
#[cfg(target_os = "macos")]
#[derive(clap::Args, Clone)]
struct SocketArg {
    /// The broker's Mach service.
    #[arg(long = "service", env = SERVICE_ENV, default_value = MACH_SERVICE, value_name = "NAME")]
    socket: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker in the foreground.
    Serve(cmd::serve::Args),
    /// Acquire networks, verify the TAPs and print one JSON object per network.
    Acquire {
        #[command(flatten)]
        socket: SocketArg,
        /// Keep the connection (the lease) open until interrupted.
        #[arg(long)]
        hold: bool,
        /// Ask for persistent TAPs owned by your uid, which VMMs such as firecracker open
        /// by name; they are deleted when this command ends (use with --hold).
        #[arg(long)]
        persistent: bool,
        /// Network names.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Acquire networks and run COMMAND with the TAPs as fds 3, 4, ...
    #[command(
        long_about = "Acquire networks and run COMMAND with the TAPs as fds 3, 4, ... in --network order.\n\n\
        VMNET_BROKER_NETWORKS holds a JSON array of the acquire replies (each with its `fd` and the \
        guest `mac`). The broker connection stays open while COMMAND runs; SIGINT and SIGTERM are \
        forwarded to it, and its exit status becomes ours.\n\n\
        Example: vmnet-broker run --network shared -- qemu-system-x86_64 ... \
        -netdev tap,id=n0,fd=3,vnet_hdr=on -device virtio-net-pci,netdev=n0,mac=$MAC"
    )]
    Run {
        #[command(flatten)]
        socket: SocketArg,
        /// A network to acquire: NAME, optionally with `,mac=MAC` (the guest MAC to ask
        /// for) and `,persistent` (a TAP owned by your uid that VMMs such as firecracker
        /// open by name; deleted when this command ends).
        #[arg(
            long = "network",
            required = true,
            value_name = "NAME[,mac=MAC][,persistent]"
        )]
        networks: Vec<String>,
        /// Forward the host's port EXT (every address, loopback included) to port INT of
        /// the guest on the first --network's TAP (or on NAME's), while COMMAND runs.
        /// Ports below 1024 need root. Example: --forward tcp:2222:22, then
        /// `ssh -p 2222 localhost`.
        #[arg(long = "forward", value_name = "PROTO:EXT:INT[,network=NAME]")]
        forwards: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Show the broker's networks and clients.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    #[cfg(target_os = "linux")]
    /// List every network the broker knows (defined or active) that you may use.
    List {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON (docs/protocol.md, `list`).
        #[arg(long)]
        json: bool,
    },
    #[cfg(target_os = "linux")]
    /// Show one network: configuration, addresses, bridge, forwards and TAPs.
    Show {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON (docs/protocol.md, `show`).
        #[arg(long)]
        json: bool,
        /// The network.
        #[arg(value_name = "NAME")]
        name: String,
    },
    #[cfg(target_os = "linux")]
    /// Show the DHCP leases of one network, or of every network you may use.
    Leases {
        #[command(flatten)]
        socket: SocketArg,
        /// Print JSON (docs/protocol.md, `leases`).
        #[arg(long)]
        json: bool,
        /// The network (all by default).
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    #[cfg(target_os = "linux")]
    /// Print the broker's metrics as OpenMetrics text (docs/operations.md, Metrics).
    Metrics {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Validate every network file in the config directory.
    CheckConfig {
        /// The drop-in directory.
        #[arg(long, default_value = vmnet_broker::config::DEFAULT_CONFIG_DIR, value_name = "DIR")]
        config_dir: PathBuf,
    },
    /// Print a completion script for SHELL to stdout.
    #[command(long_about = "Print a completion script for SHELL to stdout.\n\n\
        bash: vmnet-broker completions bash > /etc/bash_completion.d/vmnet-broker (the package \
        installs all three shells' scripts).")]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (vmnet-broker.8 and one page per subcommand) into DIR; the
    /// package build uses it (scripts/build-deb).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::main(args),
        Command::Acquire {
            socket,
            hold,
            persistent,
            names,
        } => cmd::acquire::main(&socket.socket, &names, hold, persistent),
        Command::Run {
            socket,
            networks,
            forwards,
            command,
        } => cmd::run::main(&socket.socket, &networks, &forwards, &command),
        Command::Status { socket, json } => cmd::status::main(&socket.socket, json),
        #[cfg(target_os = "linux")]
        Command::List { socket, json } => cmd::list::main(&socket.socket, json),
        #[cfg(target_os = "linux")]
        Command::Show { socket, json, name } => cmd::show::main(&socket.socket, &name, json),
        #[cfg(target_os = "linux")]
        Command::Leases { socket, json, name } => {
            cmd::leases::main(&socket.socket, name.as_deref(), json)
        }
        #[cfg(target_os = "linux")]
        Command::Metrics { socket } => cmd::metrics::main(&socket.socket),
        Command::CheckConfig { config_dir } => cmd::check_config::main(&config_dir),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "vmnet-broker", &mut out);
            cmd::write_stdout(format_args!("{}", String::from_utf8_lossy(&out)));
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => cmd::man::write_all(Cli::command(), &dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
