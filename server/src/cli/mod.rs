//! Subcommands of `surf`, and the one place where errors become exit codes.

pub mod embed;
pub mod engine_args;
pub mod http;
pub mod info;
pub mod predict;
pub mod rerank;
pub mod serve;
pub mod synth;

/// Exit status for input the user can fix: a bad model folder, bad flags, bad text.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit status for everything else: GPU failures, network faults, bugs.
pub const EXIT_FAILURE: i32 = 1;

/// 2 for what the user can fix (input, flags, the token), 1 for the rest.
fn exit_code_of(kind: surf_engine::ErrorKind) -> i32 {
    use surf_engine::ErrorKind;
    match kind {
        ErrorKind::BadInput | ErrorKind::Unauthorized => EXIT_BAD_INPUT,
        ErrorKind::Unavailable | ErrorKind::Gpu | ErrorKind::Internal => EXIT_FAILURE,
    }
}

/// Maps an error chain to the process exit status.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    for cause in error.chain() {
        if let Some(engine_error) = cause.downcast_ref::<surf_engine::Error>() {
            return exit_code_of(engine_error.kind());
        }
        if let Some(server_error) = cause.downcast_ref::<crate::Error>() {
            return if server_error.is_bad_input() {
                EXIT_BAD_INPUT
            } else {
                EXIT_FAILURE
            };
        }
        if let Some(transport_error) = cause.downcast_ref::<surf_transport::Error>() {
            return exit_code_of(transport_error.kind().into());
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return EXIT_BAD_INPUT;
        }
    }
    EXIT_FAILURE
}
