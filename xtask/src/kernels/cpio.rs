//! A writer of the kernel's initramfs format: cpio "newc" (SVR4 without CRC), uncompressed.
//! The kernel unpacks it into its root file system before running `/init`.

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

/// An archive being written. Entries go in order: a directory before what it holds.
pub struct Writer {
    out: BufWriter<File>,
    ino: u32,
    written: u64,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;

impl Writer {
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Writer {
            out: BufWriter::with_capacity(1 << 20, File::create(path)?),
            ino: 1,
            written: 0,
        })
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.header(name, DIR | 0o755, 0)
    }

    pub fn bytes(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, FILE | mode, data.len() as u64)?;
        self.data(data)
    }

    /// A file with the contents of `src`.
    pub fn file(&mut self, name: &str, mode: u32, src: &Path) -> io::Result<()> {
        let mut f = File::open(src)?;
        let len = f.metadata()?.len();
        self.header(name, FILE | mode, len)?;
        let copied = io::copy(&mut f, &mut self.out)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed while it was archived",
                src.display()
            )));
        }
        self.written += copied;
        self.pad()
    }

    /// Writes the trailer; returns the archive's size.
    pub fn finish(mut self) -> io::Result<u64> {
        self.header("TRAILER!!!", 0, 0)?;
        self.out.flush()?;
        Ok(self.written)
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name} is over 4 GiB: cpio cannot hold it")))?;
        let name = name.trim_start_matches('/');
        let nlink = if mode & DIR == DIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            0,
            0,
            // The name's length counts its terminating NUL.
            u32::try_from(name.len() + 1).map_err(io::Error::other)?,
            0,
        ];
        self.ino += 1;
        let mut h = String::from("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(h.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (h.len() + name.len() + 1) as u64;
        self.pad()
    }

    fn data(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Pads to a multiple of 4 bytes, as headers and data must start.
    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4)) % 4;
        self.out.write_all(&[0; 3][..pad as usize])?;
        self.written += pad;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// What we write, GNU cpio reads back: names, modes, kinds.
    #[test]
    fn gnu_cpio_reads_what_we_write() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let archive = dir.join("a.cpio");
        let mut w = Writer::create(&archive).expect("create");
        w.dir("bin").expect("dir");
        w.bytes("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .expect("file");
        w.bytes("odd", 0o644, b"12345").expect("file");
        let size = w.finish().expect("finish");
        assert_eq!(size % 4, 0);
        assert_eq!(std::fs::metadata(&archive).expect("written").len(), size);
        // cpio is in preflight::UNIT: `cargo xtask test` installs it.
        let out = Command::new("cpio")
            .args(["-itv", "-F"])
            .arg(&archive)
            .output()
            .expect("GNU cpio (package cpio) reads the archive back");
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (mode, name) in [
            ("drwxr-xr-x", "bin"),
            ("-rwxr-xr-x", "bin/hello"),
            ("-rw-r--r--", "odd"),
        ] {
            assert!(
                listing
                    .lines()
                    .any(|l| l.starts_with(mode) && l.ends_with(name)),
                "{mode} {name} not in {listing}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
