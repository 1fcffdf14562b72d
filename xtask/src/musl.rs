//! Static builds of `leak` for the image: the `*-unknown-linux-musl` targets, a C compiler for
//! the C inside the agent (ring's, and SQLite's from rusqlite's `bundled`), and a linker.
//!
//! The host's own architecture compiles that C with Debian's `musl-gcc` (`musl-tools`) and links
//! with the host's `cc`, rustc's default for musl. Another architecture compiles it with
//! `clang --target=<arch>-linux-musl` against the headers of Debian's `musl-dev` for that
//! architecture (downloaded and unpacked under target/xtask, never installed: the host's apt and
//! dpkg stay single-architecture) and links with the toolchain's own `rust-lld`. Either way the
//! musl libc and start files linked in are the ones the rustup target ships (self-contained),
//! so no cross libc is installed.

use std::{ffi::OsString, fs, path::PathBuf, process::Command, time::Instant};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, output, say, workspace_root},
    debs,
};

/// Debian packages for building another architecture's C: the compiler, the archiver cc-rs
/// needs for its static libraries (the host's GNU `ar` writes no symbol index for foreign
/// objects, and rust-lld refuses archives without one), and the tool that unpacks `musl-dev`.
const CROSS_PACKAGES: [(&str, &str); 3] = [
    ("clang", "clang"),
    ("llvm-ar", "llvm"),
    ("dpkg-deb", "dpkg"),
];

/// An architecture of the image, by the name OCI images, Debian and Go give it (`TARGETARCH`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub const ALL: [Self; 2] = [Self::Amd64, Self::Arm64];

    /// The OCI (and Debian) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// The Rust target of the static build.
    pub fn target(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-unknown-linux-musl",
            Self::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The name Rust, the kernel (`uname -m`) and musl's include folder use.
    pub fn machine(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64",
            Self::Arm64 => "aarch64",
        }
    }

    /// `e_machine` of its ELF files.
    pub fn elf_machine(self) -> u16 {
        match self {
            Self::Amd64 => 62,
            Self::Arm64 => 183,
        }
    }

    /// The architecture xtask runs on, when it is one of the image's.
    pub fn host() -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|arch| arch.machine() == std::env::consts::ARCH)
    }

    /// How to run one of its programs here: directly, or under QEMU's user-mode emulator (a
    /// command of Debian's `qemu-user`).
    pub fn runner(self) -> Option<String> {
        (Self::host() != Some(self)).then(|| format!("qemu-{}", self.machine()))
    }
}

/// The environment cargo needs to build for `arch`'s musl target, after installing what is
/// missing: the rustup target, a C compiler (and, for another architecture, musl's headers, an
/// archiver and the linker).
pub fn cargo_env(arch: Arch) -> Result<Vec<(String, OsString)>> {
    bootstrap::rustup_targets(
        &[arch.target()],
        "the static build links the musl libc the rustup target ships",
    )?;
    let key = arch.target().replace('-', "_");
    if Arch::host() == Some(arch) {
        bootstrap::debian_packages(&[("musl-gcc", "musl-tools")])?;
        return Ok(vec![(format!("CC_{key}"), "musl-gcc".into())]);
    }
    bootstrap::debian_packages(&CROSS_PACKAGES)?;
    let include = musl_headers(arch)?;
    let clang_resources = output(Command::new("clang").arg("-print-resource-dir"))?;
    // cc-rs splits these at whitespace: a workspace path with a space in it would break them.
    let cflags = format!(
        "--target={}-linux-musl -nostdinc -isystem {} -isystem {}/include",
        arch.machine(),
        include.display(),
        clang_resources.trim()
    );
    Ok(vec![
        (format!("CC_{key}"), "clang".into()),
        (format!("AR_{key}"), "llvm-ar".into()),
        (format!("CFLAGS_{key}"), cflags.into()),
        (
            format!("CARGO_TARGET_{}_LINKER", key.to_uppercase()),
            "rust-lld".into(),
        ),
    ])
}

/// Builds `leak` for `arch` in release, static, and returns the binary. The kernel programs are
/// built along with it by leak-user's build script, for the target's architecture (aya-build
/// sets `bpf_target_arch` from the target: kprobe arguments are read from that
/// architecture's `pt_regs`).
pub fn build_leak(arch: Arch) -> Result<PathBuf> {
    let env = cargo_env(arch)?;
    say(format!(
        "building leak (release, static) for {} ({})",
        arch.name(),
        arch.target()
    ));
    let started = Instant::now();
    crate::run::cargo_build_leak(Some(arch.target()), env)?;
    let binary = workspace_root()
        .join("target")
        .join(arch.target())
        .join("release/leak");
    let elf = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
    let linking = check_static(&elf, arch).with_context(|| binary.display().to_string())?;
    say(format!(
        "built {} ({linking}, {:.1} MiB) in {:.0?}",
        binary.display(),
        mebibytes(elf.len() as u64),
        started.elapsed()
    ));
    Ok(binary)
}

pub fn mebibytes(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// musl's C headers for `arch`, from Debian's `musl-dev` of that architecture, unpacked (never
/// installed).
fn musl_headers(arch: Arch) -> Result<PathBuf> {
    let root = debs::unpacked(arch, "musl-dev")?;
    let include = root
        .join("usr/include")
        .join(format!("{}-linux-musl", arch.machine()));
    if !include.join("stdio.h").exists() {
        bail!(
            "Debian's musl-dev for {} has no {}: did Debian move musl's headers?",
            arch.name(),
            include.join("stdio.h").display()
        );
    }
    Ok(include)
}

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NEEDED: u64 = 1;

/// Checks that `elf` is an `arch` executable that needs nothing from the system it runs on: no
/// program interpreter (dynamic loader) and no shared library. Returns how it is linked:
/// `static` or `static-pie` (a dynamic section that only relocates the binary itself).
pub fn check_static(elf: &[u8], arch: Arch) -> Result<&'static str> {
    let u16_at = |at: usize| -> Result<u16> {
        elf.get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
            .context("truncated ELF file")
    };
    let u32_at = |at: usize| -> Result<u32> {
        elf.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .context("truncated ELF file")
    };
    let u64_at = |at: usize| -> Result<u64> {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .context("truncated ELF file")
    };
    // 64-bit (class 2), little-endian (data 1).
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        bail!("not a 64-bit little-endian ELF file");
    }
    let machine = u16_at(18)?;
    if machine != arch.elf_machine() {
        bail!(
            "built for ELF machine {machine}, not {} ({})",
            arch.elf_machine(),
            arch.name()
        );
    }
    let program_headers = usize::try_from(u64_at(32)?)?;
    let entry_size = usize::from(u16_at(54)?);
    let entries = usize::from(u16_at(56)?);
    let mut linking = "static";
    for index in 0..entries {
        let header = program_headers.saturating_add(index.saturating_mul(entry_size));
        match u32_at(header)? {
            PT_INTERP => bail!("it asks for a dynamic loader (PT_INTERP): it is not static"),
            PT_DYNAMIC => {
                let offset = usize::try_from(u64_at(header + 8)?)?;
                let size = usize::try_from(u64_at(header + 32)?)?;
                for entry in (offset..offset.saturating_add(size)).step_by(16) {
                    match u64_at(entry)? {
                        0 => break,
                        DT_NEEDED => bail!("it needs shared libraries (DT_NEEDED)"),
                        _ => {}
                    }
                }
                linking = "static-pie";
            }
            _ => {}
        }
    }
    Ok(linking)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An ELF header and `segments` (type, dynamic entries) with their dynamic sections.
    fn elf(machine: u16, segments: &[(u32, &[u64])]) -> Vec<u8> {
        let mut bytes = vec![0; 64];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[18..20].copy_from_slice(&machine.to_le_bytes());
        bytes[32..40].copy_from_slice(&64u64.to_le_bytes());
        bytes[54..56].copy_from_slice(&56u16.to_le_bytes());
        let count = u16::try_from(segments.len()).unwrap_or_default();
        bytes[56..58].copy_from_slice(&count.to_le_bytes());
        let mut data_at = 64 + 56 * segments.len();
        let mut data = Vec::new();
        for (kind, tags) in segments {
            let mut header = vec![0; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&(data_at as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(tags.len() as u64 * 16).to_le_bytes());
            bytes.extend(header);
            for tag in *tags {
                data.extend(tag.to_le_bytes());
                data.extend(0u64.to_le_bytes());
            }
            data_at += tags.len() * 16;
        }
        bytes.extend(data);
        bytes
    }

    #[test]
    fn static_and_static_pie_pass() {
        assert_eq!(
            check_static(&elf(62, &[(1, &[])]), Arch::Amd64).ok(),
            Some("static")
        );
        // Relocations of the binary itself (DT_RELA 7, DT_FLAGS_1 0x6fff_fffb), then DT_NULL.
        let pie = elf(183, &[(1, &[]), (PT_DYNAMIC, &[7, 0x6fff_fffb, 0])]);
        assert_eq!(check_static(&pie, Arch::Arm64).ok(), Some("static-pie"));
    }

    #[test]
    fn a_loader_a_shared_library_or_another_machine_fail() {
        let interp = elf(62, &[(PT_INTERP, &[])]);
        assert!(check_static(&interp, Arch::Amd64).is_err());
        let needed = elf(62, &[(PT_DYNAMIC, &[7, DT_NEEDED, 0])]);
        assert!(check_static(&needed, Arch::Amd64).is_err());
        // DT_NEEDED after DT_NULL is not an entry.
        let after_null = elf(62, &[(PT_DYNAMIC, &[0, DT_NEEDED])]);
        assert!(check_static(&after_null, Arch::Amd64).is_ok());
        assert!(check_static(&elf(62, &[]), Arch::Arm64).is_err());
        assert!(check_static(b"#!/bin/sh\n", Arch::Amd64).is_err());
        assert!(check_static(&elf(62, &[])[..40], Arch::Amd64).is_err());
    }

    #[test]
    fn the_host_runs_its_own_architecture_and_emulates_the_other() {
        for arch in Arch::ALL {
            match arch.runner() {
                None => assert_eq!(Arch::host(), Some(arch)),
                Some(qemu) => assert_eq!(qemu, format!("qemu-{}", arch.machine())),
            }
        }
    }
}
