//! Compiles the TAP guard (bpf/tap_guard.c) to BPF bytecode with clang, for Linux targets
//! only: the macOS backend has no use for it, and its builds (and the Apple-target clippy
//! run) must not need clang. The object lands in OUT_DIR, where
//! src/backend/linux/firewall/guard.rs includes it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf/tap_guard.c");
    println!("cargo:rerun-if-env-changed=CLANG");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("tap_guard.o");
    // <linux/bpf.h> includes <asm/types.h>, which Debian keeps under the target's
    // multiarch directory; `-target bpf` does not look there by itself.
    let multiarch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64-linux-gnu",
        Ok("aarch64") => "aarch64-linux-gnu",
        Ok("arm") => "arm-linux-gnueabihf",
        Ok("riscv64") => "riscv64-linux-gnu",
        Ok("powerpc64") => "powerpc64le-linux-gnu",
        Ok("s390x") => "s390x-linux-gnu",
        _ => "x86_64-linux-gnu",
    };
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let status = Command::new(&clang)
        .args(["-O2", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .args(["-c", "bpf/tap_guard.c", "-o"])
        .arg(&object)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {clang} to compile bpf/tap_guard.c ({e}): install clang (scripts/deps)"
            )
        });
    assert!(
        status.success(),
        "{clang} failed to compile bpf/tap_guard.c"
    );
}
