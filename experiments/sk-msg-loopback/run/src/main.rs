//! Measures what sk_msg redirection saves on a loopback TCP hop: `mesh-labtool rr` against
//! `mesh-labtool serve` on 127.0.0.1:7100, both in a cgroup of their own, alternately in three
//! modes: `tcp` (no programs), `skmsg` (the programs of ../ebpf redirect both directions) and
//! `half` (they redirect only what the server sends). Prints one line per run: the mode, rr's
//! latency percentiles and the CPU both processes spent (their rusage, which on loopback
//! includes the receiving side's softirq work done in the sender's context; the warm-up's
//! requests are in it too, the same in every mode).
//!
//! usage: skmsg-run LABTOOL OBJECT ROUNDS -- RR-ARGS...

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};

fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        let (left, right) = line.split_once(" - ").context("mountinfo")?;
        if right.split(' ').next() == Some("cgroup2") {
            return Ok(left.split(' ').nth(4).context("mountinfo")?.into());
        }
    }
    bail!("no cgroup2 mount")
}

fn rusage_children() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn in_cgroup(cmd: &mut Command, procs: &Path) {
    let procs = procs.to_owned();
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
}

fn counts(bpf: &Ebpf) -> Result<[u64; 4]> {
    let c: PerCpuArray<_, u64> = PerCpuArray::try_from(bpf.map("COUNTS").context("COUNTS")?)?;
    let mut out = [0; 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o = c.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sep = args.iter().position(|a| a == "--").context("usage")?;
    let (labtool, object, rounds) = (&args[1], &args[2], args[3].parse::<u32>()?);
    let rr_args = &args[sep + 1..];
    let cg = cgroup2_mount()?.join(format!("skmsg-exp-{}", std::process::id()));
    std::fs::create_dir(&cg).with_context(|| format!("mkdir {}", cg.display()))?;
    let result = run(labtool, object, rounds, rr_args, &cg);
    let _ = std::fs::remove_dir(&cg);
    result
}

fn run(labtool: &str, object: &str, rounds: u32, rr_args: &[String], cg: &Path) -> Result<()> {
    let procs = cg.join("cgroup.procs");
    for round in 1..=rounds {
        for mode in ["tcp", "skmsg", "half"] {
            let bpf = if mode != "tcp" {
                let mut bpf = Ebpf::load(&std::fs::read(object)?)?;
                let cgf = std::fs::File::open(cg)?;
                let p: &mut SockOps = bpf.program_mut("skmsg_sock_ops").unwrap().try_into()?;
                p.load()?;
                p.attach(&cgf, CgroupAttachMode::Single)?;
                let socks: SockHash<_, [u32; 4]> =
                    SockHash::try_from(bpf.map("SOCKS").context("SOCKS")?)?;
                let fd = socks.fd().try_clone()?;
                let p: &mut SkMsg = bpf.program_mut("skmsg_redirect").unwrap().try_into()?;
                p.load()?;
                p.attach(&fd)?;
                let mut cfg: aya::maps::Array<_, u32> =
                    aya::maps::Array::try_from(bpf.map_mut("CONFIG").context("CONFIG")?)?;
                cfg.set(0, u32::from(mode == "half"), 0)?;
                Some(bpf)
            } else {
                None
            };
            let cpu0 = rusage_children();
            let mut serve = Command::new(labtool);
            serve
                .args(["serve", "--port", "7100", "--bind", "127.0.0.1"])
                .stdout(Stdio::piped());
            in_cgroup(&mut serve, &procs);
            let mut serve = serve.spawn()?;
            let mut out = BufReader::new(serve.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line)?;
            if !line.starts_with("listening") {
                bail!("serve: {line}");
            }
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            let mut rr = Command::new(labtool);
            rr.arg("rr").args(["--to", "127.0.0.1:7100"]).args(rr_args);
            in_cgroup(&mut rr, &procs);
            let o = rr.stderr(Stdio::inherit()).output()?;
            if !o.status.success() {
                bail!("rr failed");
            }
            serve.kill()?;
            serve.wait()?;
            let cpu = rusage_children() - cpu0;
            let report: serde_json::Value = serde_json::from_slice(
                o.stdout
                    .split(|b| *b == b'\n')
                    .find(|l| l.starts_with(b"{"))
                    .context("rr output")?,
            )?;
            let reqs = report["requests"].as_f64().unwrap_or(0.0);
            let c = bpf.as_ref().map(counts).transpose()?.unwrap_or_default();
            println!(
                "round {round} {mode:5} p50 {:>5} p90 {:>5} p99 {:>5} p99.9 {:>6} us; rate {:.0}/s; cpu {:.3} s = {:.1} us per request (recorded {reqs}); sockops inserted {} failed {}, msgs redirected {} passed {}",
                report["p50_us"], report["p90_us"], report["p99_us"], report["p999_us"],
                report["achieved_rate"].as_f64().unwrap_or(0.0), cpu,
                cpu * 1e6 / (reqs.max(1.0)), c[0], c[1], c[2], c[3]
            );
            drop(bpf);
        }
    }
    Ok(())
}
