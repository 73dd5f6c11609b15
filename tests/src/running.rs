//! A child process whose output a test waits on, line by line, with deadlines.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

/// A spawned child with piped stdin, stdout (delivered line by line) and stderr (collected).
/// Killed (SIGKILL) and reaped on drop if still running.
#[derive(Debug)]
pub struct Running {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
}

impl Running {
    /// Spawns `cmd` (described as `what` in messages) with piped stdio; panics if it cannot start.
    pub fn spawn(what: &str, cmd: &mut Command) -> Running {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what} ({cmd:?}): {e}"));
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Running {
            what: what.to_owned(),
            child,
            stdin,
            lines,
            stdout_seen: Vec::new(),
            stderr,
            status: None,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next stdout line starting with `prefix` and returns it; panics with the
    /// output so far if the child ends or `timeout` passes first.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let output = self.describe();
                    panic!(
                        "timed out after {timeout:?} waiting for {prefix:?} from {}{output}",
                        self.what
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait_status(Duration::from_secs(5));
                    let output = self.describe();
                    panic!(
                        "{} exited ({status:?}) before printing {prefix:?}{output}",
                        self.what
                    )
                }
            }
        }
    }

    /// Writes one line to the child's stdin; panics if it cannot.
    pub fn write_stdin_line(&mut self, line: &str) {
        use std::io::Write as _;
        let stdin = self
            .stdin
            .as_mut()
            .unwrap_or_else(|| panic!("stdin of {} is closed", self.what));
        if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            panic!("writing to the stdin of {}: {e}", self.what);
        }
    }

    /// Closes the child's stdin (for `mesh-labtool stream`, the signal to finish).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the child to exit; panics if it does not within `timeout` (it is then killed).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match self.wait_status(timeout) {
            Some(status) => status,
            None => {
                let output = self.describe();
                panic!("{} did not exit within {timeout:?}{output}", self.what)
            }
        }
    }

    /// The child's exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the child to exit successfully and returns all its stdout lines; panics with
    /// its output otherwise.
    pub fn wait_success(&mut self, timeout: Duration) -> Vec<String> {
        let status = self.wait(timeout);
        self.drain_lines(Duration::from_secs(5));
        if !status.success() {
            let output = self.describe();
            panic!("{} failed ({status}){output}", self.what);
        }
        self.stdout_seen.clone()
    }

    /// The stdout lines received so far (those already consumed by [`Running::wait_line`] too).
    pub fn stdout_lines(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.try_recv() {
            self.stdout_seen.push(line);
        }
        self.stdout_seen.clone()
    }

    /// What the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Kills the child (SIGKILL) if it is still running and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            // It may have exited on its own in the meantime; wait reaps it either way.
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    fn wait_status(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.status = Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) | Err(_) => {
                    self.kill();
                    return None;
                }
            }
        }
        self.status
    }

    /// Collects the remaining stdout lines until the pipe closes (bounded by `timeout`).
    fn drain_lines(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.stdout_seen.push(line);
        }
    }

    fn describe(&mut self) -> String {
        let stdout = self.stdout_lines().join("\n  ");
        format!(
            "\n stdout:\n  {stdout}\n stderr:\n  {}",
            self.stderr().trim_end().replace('\n', "\n  ")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}
