//! `mesh-labtool probe`: connects again and again (connect, then close) until stdin closes, and
//! prints one line per attempt: its outcome and when it came (microseconds since the Unix
//! epoch), so that a test can tell when a path started being refused and that it never hung.

use std::{
    io,
    net::{SocketAddr, TcpStream},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;

/// Arguments of `mesh-labtool probe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to connect.
    #[arg(long)]
    to: SocketAddr,
    /// Pause between attempts.
    #[arg(long, default_value_t = 10)]
    interval_ms: u64,
    /// An attempt that takes longer is reported as `timeout`.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// `ok peer=<addr> <us>`, `refused <us>`, `reset <us>`, `timeout <us>` or `error=<kind> <us>`.
pub fn run(args: Args) -> Result<()> {
    let stop = crate::stdin_closed();
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let outcome = match TcpStream::connect_timeout(&args.to, timeout) {
            Ok(conn) => {
                let peer = conn
                    .peer_addr()
                    .map_or_else(|e| format!("?({e})"), |a| a.to_string());
                format!("ok peer={peer}")
            }
            Err(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => "refused".to_owned(),
                io::ErrorKind::ConnectionReset => "reset".to_owned(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout".to_owned(),
                _ => format!("error={}", e.raw_os_error().unwrap_or(0)),
            },
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        crate::say(&format!("{outcome} {now}"));
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
    Ok(())
}
