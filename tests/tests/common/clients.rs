//! Other projects' client libraries, run as their users run them: the
//! test command installs them (`tests/run-all.sh`); outside it a test
//! that needs a missing one is skipped, in CI it fails.

use std::process::{Command, Output};

fn missing(what: &str) -> Option<String> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing in CI: the test command installs it"
    );
    eprintln!("SKIPPED: {what} is not installed (tests/run-all.sh installs it)");
    None
}

/// The interpreter of the test command's venv (`KINDRED_PYTHON`) if it
/// can import `module`.
pub fn python_with(module: &str) -> Option<String> {
    let python = std::env::var("KINDRED_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        missing(&format!("the Python module {module}"))
    }
}

/// `node` if the npm package `package` is installed under `tests/node`.
pub fn node_with(package: &str) -> Option<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/node/node_modules/");
    let ok = std::path::Path::new(&format!("{dir}{package}")).is_dir()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        Some("node".into())
    } else {
        missing(&format!("node with the npm package {package}"))
    }
}

/// Runs `program script args…` off the async runtime; fails the test
/// with the script's stderr if it does not succeed.
pub async fn run(program: String, script: &str, args: Vec<String>) -> Output {
    let script = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
