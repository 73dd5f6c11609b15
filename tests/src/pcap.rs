//! Packet captures on the lab's underlay bridge (dumpcap), read back with tshark: what crossed
//! between nodes, and whether a payload ever did in clear.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{traffic::WAIT, wait_until, Lab, Running};

/// A capture on the underlay bridge, stopped (and flushed) by SIGINT.
#[derive(Debug)]
pub struct Pcap {
    proc: Running,
    file: PathBuf,
}

impl Pcap {
    /// Starts capturing every packet on the underlay bridge into `<run dir>/<name>.pcapng`.
    pub fn start(lab: &Lab, name: &str) -> Pcap {
        let file = lab.run_dir().join(format!("{name}.pcapng"));
        let netns = format!("--net=/run/netns/mlab-{}-underlay", lab.id());
        let proc = Running::spawn(
            "dumpcap on the underlay bridge",
            Command::new("nsenter")
                .args([netns.as_str(), "dumpcap", "-q", "-i", "br0", "-w"])
                .arg(&file),
        );
        wait_until("dumpcap to start writing", WAIT, || {
            std::fs::metadata(&file).is_ok_and(|m| m.len() > 0)
        });
        Pcap { proc, file }
    }

    /// Waits until the capture file holds `needle` (dumpcap hands packets over in blocks and
    /// flushes the file now and then, so a payload shows some time after it crossed); panics
    /// after `timeout`. Waiting for a control payload sent last means every packet before it
    /// is in the file too.
    pub fn wait_for(&self, needle: &[u8], timeout: std::time::Duration) {
        wait_until(
            &format!(
                "the capture {} to show {:?}",
                self.file.display(),
                String::from_utf8_lossy(needle)
            ),
            timeout,
            || contains(&self.file, needle),
        );
    }

    /// Stops the capture; returns the file.
    pub fn stop(mut self) -> PathBuf {
        let pid = libc::pid_t::try_from(self.proc.pid()).expect("pid fits");
        // SAFETY: signals a child process this capture started and still owns.
        let rc = unsafe { libc::kill(pid, libc::SIGINT) };
        assert_eq!(rc, 0, "signalling dumpcap");
        self.proc.wait(WAIT);
        self.file
    }
}

/// `tshark -r FILE -Y FILTER -T fields -e FIELD`, one line per packet.
pub fn tshark(file: &Path, filter: &str, field: &str) -> Vec<String> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(["-Y", filter, "-T", "fields", "-e", field])
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Whether a capture file holds `needle` anywhere (a payload that crossed in clear).
pub fn contains(file: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(file).expect("reading the capture");
    bytes.windows(needle.len()).any(|w| w == needle)
}
