//! The Kubernetes API emulator (KMock, launched by `kube_emulator.py`) for the integration
//! tests that need one: where KMock is, starting it on a free port, a client for it, and the
//! skip-or-fail rule when it is not installed. Shared with `mod emulator;`.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use kube::Client;

/// Where `cargo xtask test` installs KMock (or MESH_KMOCK_PYTHON, a Python that has it).
pub fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MESH_KMOCK_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/kmock-venv/bin/python");
    venv.exists().then_some(venv)
}

/// The emulator process, killed when dropped.
pub struct Emulator {
    child: Child,
    pub port: u16,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    pub fn start(python: &PathBuf) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kube_emulator.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the emulator did not say where it listens within 30 s"));
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the emulator said {line:?}, not `listening on PORT`"));
        Self { child, port }
    }

    pub fn client(&self) -> Client {
        let url = format!("http://127.0.0.1:{}", self.port)
            .parse()
            .expect("url");
        Client::try_from(kube::Config::new(url)).expect("a client for the emulator")
    }

    /// POST /_emulator/{what} (`expire`: 410 Gone for resumed watches; `drop`: end watches).
    #[allow(dead_code)] // not every test drives the emulator's controls
    pub async fn control(&self, what: &str) {
        let url = format!("http://127.0.0.1:{}/_emulator/{what}", self.port);
        let client = self.client();
        let request = http::Request::post(url).body(Vec::new()).expect("request");
        client
            .request_text(request)
            .await
            .unwrap_or_else(|e| panic!("emulator control {what}: {e}"));
    }
}

/// KMock's Python, or `None` after saying the test is skipped; with
/// `MESH_REQUIRE_PRIVILEGED=1` (CI) a missing KMock fails the test instead.
pub fn not_skipped(test: &str) -> Option<PathBuf> {
    match python() {
        Some(p) => Some(p),
        None if std::env::var("MESH_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1") => panic!(
            "{test}: KMock is not installed (target/kmock-venv, or MESH_KMOCK_PYTHON): \
             cargo xtask test installs it"
        ),
        None => {
            eprintln!(
                "\n*** SKIPPED {test}: KMock is not installed (target/kmock-venv, or \
                 MESH_KMOCK_PYTHON); cargo xtask test installs it ***\n"
            );
            None
        }
    }
}
