//! Print what `smsflow check` would for a flows directory:
//! `cargo run --example check -- flows/`.

fn main() -> std::process::ExitCode {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "flows".into());
    let diags = smsflow::flow::check_dir(std::path::Path::new(&dir));
    for d in &diags {
        println!("{d}");
    }
    if diags
        .iter()
        .any(|d| d.severity == smsflow::flow::Severity::Error)
    {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
