//! One module per subcommand. Client commands report broker errors as
//! `error N: message` on stderr and exit 1.

pub mod acquire;
pub mod check_config;
pub mod run;
pub mod serve;
pub mod status;

/// What a subcommand ends with; the message is printed to stderr.
pub type Result = std::result::Result<std::process::ExitCode, Box<dyn std::error::Error>>;
