//! The mesh's eBPF programs. One file per hook; maps and shared helpers in `maps.rs`.
//!
//! Every program is a thin entry that calls `try_<name>()`; only the entry turns the outcome
//! into a verdict, and every outcome is counted with a reason code in `MESH_COUNTERS`.
#![no_std]
#![no_main]

mod connect;
mod maps;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic; this is never executed.
    loop {}
}

/// The kernel only loads GPL-compatible programs that use GPL-only helpers (sk_assign).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
