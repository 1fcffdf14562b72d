//! Debian's cloud kernels: resolve a series (5.10, 6.1, 6.12 ...) to the newest
//! `linux-image-*-cloud-<arch>` package (amd64 or arm64) of the suites that carry it, through a
//! private apt configuration (the system's sources are never touched), download it, cache it,
//! and extract the kernel image and its BTF.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, cache_dir, output, say},
    musl::Arch,
};

/// Suites searched for kernels, oldest first.
const SUITES: &[(&str, &str)] = &[
    ("http://deb.debian.org/debian", "bullseye"),
    ("http://deb.debian.org/debian-security", "bullseye-security"),
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
    ("http://deb.debian.org/debian", "bookworm-backports"),
    ("http://deb.debian.org/debian", "trixie"),
    ("http://deb.debian.org/debian-security", "trixie-security"),
    ("http://deb.debian.org/debian", "trixie-backports"),
    // The newest kernels, for trying a series no release carries yet (packages come and go).
    ("http://deb.debian.org/debian", "sid"),
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `5.10.0-46-cloud-amd64`.
    pub release: String,
    /// The unpacked package (boot/, lib/modules/).
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    pub btf: PathBuf,
    /// The kernel's build configuration (`boot/config-<release>`), when the package ships it
    /// (7.x's split packages do not).
    pub config: Option<PathBuf>,
}

/// The private apt folder: this machine's architecture's, as before arm64 kernels were
/// fetched, and one per other architecture.
fn apt_dir(arch: Arch) -> PathBuf {
    match Arch::host() == Some(arch) {
        true => cache_dir().join("apt"),
        false => cache_dir().join(format!("apt-{}", arch.name())),
    }
}

fn apt_options(arch: Arch) -> Vec<String> {
    let dir = apt_dir(arch);
    let mut options = vec![
        format!(
            "-oDir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/dev/null".into(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oAPT::Sandbox::User=root".into(),
        "-qq".into(),
    ];
    if Arch::host() != Some(arch) {
        // Another architecture's lists, and an empty package status: the host's packages,
        // of its own architecture, are nothing to this apt.
        options.extend([
            format!("-oAPT::Architecture={}", arch.name()),
            format!("-oAPT::Architectures={}", arch.name()),
            format!("-oDir::State::status={}", dir.join("status").display()),
        ]);
    }
    options
}

/// Writes the private sources list and updates its package lists (once per day).
fn apt_update(arch: Arch) -> Result<()> {
    let dir = apt_dir(arch);
    fs::create_dir_all(dir.join("lists").join("partial"))?;
    fs::create_dir_all(dir.join("cache").join("archives").join("partial"))?;
    if Arch::host() != Some(arch) {
        fs::write(dir.join("status"), "")?;
    }
    let sources: String = SUITES
        .iter()
        .map(|(uri, suite)| format!("deb [signed-by={KEYRING}] {uri} {suite} main\n"))
        .collect();
    let list = dir.join("sources.list");
    let stamp = dir.join("updated");
    let fresh = fs::read_to_string(&list).is_ok_and(|old| old == sources)
        && fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < 86_400));
    if fresh {
        return Ok(());
    }
    if !Path::new(KEYRING).exists() {
        bootstrap::debian_packages(&[("true", "debian-archive-keyring")])?;
    }
    fs::write(&list, sources)?;
    say(format!(
        "updating the private apt lists for Debian's {} kernel suites",
        arch.name()
    ));
    // One suite failing (sid moving under us, a mirror hiccup) leaves the others' lists in
    // place: carry on with them, and try again next time.
    match bootstrap::run(
        Command::new("apt-get")
            .args(apt_options(arch))
            .arg("update"),
    ) {
        Ok(()) => fs::write(stamp, "")?,
        Err(err) => say(format!(
            "apt-get update of the kernel suites failed ({err:#}); using the lists it fetched"
        )),
    }
    Ok(())
}

/// The series that names the newest cloud kernel of every suite searched (trixie-backports and
/// sid carry the newest): a kernel always there, whichever versions the archive holds today.
pub const NEWEST: &str = "newest";

/// The end of `arch`'s cloud kernel package names.
fn flavour(arch: Arch) -> String {
    format!("-cloud-{}", arch.name())
}

/// `linux-image-<series>.<...>-cloud-<arch>` package names, excluding debug and unsigned ones.
fn matches_series(package: &str, series: &str, arch: Arch) -> bool {
    let Some(rest) = package.strip_prefix("linux-image-") else {
        return false;
    };
    let Some(version) = rest.strip_suffix(&flavour(arch)) else {
        return false;
    };
    if series == NEWEST {
        // Any versioned kernel, not a metapackage (`linux-image-cloud-amd64`).
        return version.split(['.', '-']).nth(2).is_some()
            && version.chars().next().is_some_and(|c| c.is_ascii_digit());
    }
    // "5.10.0-46", "6.12.48+deb13", "6.12.12+bpo": the series, then a '.' or '-'.
    // An exact ABI name (`5.10.0-30`, with its dash) picks that very package; a series
    // (`6.1`) needs more after it, which also keeps out metapackages such as
    // `linux-image-6.1-cloud-amd64`.
    let exact = series.contains('-') && version == series;
    exact
        || version
            .strip_prefix(series)
            .is_some_and(|tail| tail.starts_with('.') || tail.starts_with('-'))
            && version.chars().next().is_some_and(|c| c.is_ascii_digit())
}

/// Sorts Debian versions with `dpkg --compare-versions` semantics, good enough for ABI names.
fn version_key(package: &str, arch: Arch) -> Vec<u64> {
    // Only the version part: the `64` of `amd64` is not a version number.
    let version = package
        .trim_start_matches("linux-image-")
        .trim_end_matches(&flavour(arch));
    version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// The newest cloud kernel package of `series`.
fn newest_package(series: &str, arch: Arch) -> Result<String> {
    let names = output(
        Command::new("apt-cache")
            .args(apt_options(arch))
            .args(["pkgnames", "linux-image-"]),
    )?;
    let mut candidates: Vec<&str> = names
        .lines()
        .filter(|p| matches_series(p, series, arch))
        .collect();
    candidates.sort_by_key(|p| version_key(p, arch));
    candidates.last().map(|p| (*p).to_owned()).with_context(|| {
        format!(
            "no linux-image-{series}*{} in {}",
            flavour(arch),
            SUITES
                .iter()
                .map(|(_, s)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Downloads (or reuses) and unpacks the newest amd64 kernel of `series`, and extracts its BTF.
pub fn fetch(series: &str) -> Result<Kernel> {
    fetch_arch(Arch::Amd64, series)
}

/// Downloads (or reuses) and unpacks the newest `arch` kernel of `series`, and extracts its BTF.
pub fn fetch_arch(arch: Arch, series: &str) -> Result<Kernel> {
    bootstrap::debian_packages(&[("dpkg-deb", "dpkg"), ("xz", "xz-utils"), ("zstd", "zstd")])?;
    let kernels = cache_dir().join("kernels");
    fs::create_dir_all(&kernels)?;
    // The last package fetched for the series, for working offline.
    let pinned = match Arch::host() == Some(arch) {
        true => kernels.join(format!("{series}.package")),
        false => kernels.join(format!("{series}-{}.package", arch.name())),
    };
    let package = match apt_update(arch).and_then(|()| newest_package(series, arch)) {
        Ok(package) => {
            fs::write(&pinned, &package)?;
            package
        }
        // Offline: reuse the last kernel fetched for this series.
        Err(err) => match fs::read_to_string(&pinned) {
            Ok(package) => {
                say(format!("{err:#}; reusing cached {package}"));
                package
            }
            Err(_) => return Err(err),
        },
    };
    let release = package.trim_start_matches("linux-image-").to_owned();
    let root = kernels.join(&release);
    if find_vmlinuz(&root, &release).is_none() {
        let download = kernels.join("download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        say(format!("downloading {package}"));
        bootstrap::run(
            Command::new("apt-get")
                .args(apt_options(arch))
                .args(["download", &package])
                .current_dir(&download),
        )?;
        let image = fs::read_dir(&download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download produced no .deb")?;
        // Since 7.x (forky/sid) the image package is empty and depends on the kernel
        // (`linux-binary-*`) and its modules (`linux-modules-*`) of the same release.
        let depends = output(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(&image)
                .arg("Depends"),
        )?;
        let parts = split_packages(&depends, &release);
        if !parts.is_empty() {
            say(format!("downloading {}", parts.join(" ")));
            bootstrap::run(
                Command::new("apt-get")
                    .args(apt_options(arch))
                    .arg("download")
                    .args(&parts)
                    .current_dir(&download),
            )?;
        }
        let unpacking = kernels.join(format!("{release}.partial"));
        let _ = fs::remove_dir_all(&unpacking);
        for deb in fs::read_dir(&download)?.flatten().map(|e| e.path()) {
            if deb.extension().is_some_and(|e| e == "deb") {
                bootstrap::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
            }
        }
        let _ = fs::remove_dir_all(&root);
        fs::rename(&unpacking, &root)?;
        let _ = fs::remove_dir_all(&download);
    }
    let vmlinuz = find_vmlinuz(&root, &release)
        .with_context(|| format!("{package} holds no kernel image (boot/vmlinuz-{release})"))?;
    let btf = kernels.join(format!("{release}.btf"));
    if !btf.exists() {
        say(format!("extracting BTF from {}", vmlinuz.display()));
        let section = match arch {
            Arch::Amd64 => {
                let vmlinux = decompress_bzimage(&vmlinuz)?;
                elf_section(&vmlinux, ".BTF").map(<[u8]>::to_vec)
            }
            Arch::Arm64 => arm64_btf(&arm64_image(&vmlinuz)?),
        }
        .with_context(|| format!("{release} has no BTF (built without CONFIG_DEBUG_INFO_BTF)"))?;
        fs::write(&btf, section)?;
    }
    let config = root.join("boot").join(format!("config-{release}"));
    Ok(Kernel {
        release,
        root,
        vmlinuz,
        btf,
        config: config.is_file().then_some(config),
    })
}

/// The kernel image in an unpacked package: `boot/vmlinuz-<release>`, or
/// `usr/lib/modules/<release>/vmlinuz` in the split packaging of 7.x.
fn find_vmlinuz(root: &Path, release: &str) -> Option<PathBuf> {
    [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("usr/lib/modules").join(release).join("vmlinuz"),
        root.join("lib/modules").join(release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|path| path.is_file())
}

/// The packages of a split kernel among an image package's `Depends`: the kernel itself and
/// its modules, of exactly this release.
fn split_packages(depends: &str, release: &str) -> Vec<String> {
    depends
        .split([',', '|'])
        .filter_map(|alternative| alternative.split_whitespace().next())
        .filter(|name| {
            ["linux-binary-", "linux-modules-"]
                .iter()
                .any(|prefix| name.strip_prefix(prefix) == Some(release))
        })
        .map(str::to_owned)
        .collect()
}

/// The ELF `vmlinux` inside an x86 bzImage: the boot header says where the compressed payload
/// is; its magic says how it is compressed.
pub fn decompress_bzimage(path: &Path) -> Result<Vec<u8>> {
    let image = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u32_at = |at: usize| -> Result<u32> {
        let bytes = image.get(at..at + 4).context("bzImage header truncated")?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} is not an x86 bzImage", path.display());
    }
    let setup_sectors = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let protected_mode = (setup_sectors + 1) * 512;
    let offset = protected_mode + u32_at(0x248)? as usize;
    let length = u32_at(0x24c)? as usize;
    let payload = image
        .get(offset..offset + length)
        .context("bzImage payload out of bounds")?;
    let tool: &[&str] = match payload {
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x02, 0x21, 0x4c, 0x18, ..] => &["lz4", "-dc"],
        [0x5d, 0x00, 0x00, ..] => &["xz", "--format=lzma", "-dc"],
        _ => bail!("{}: unknown kernel compression", path.display()),
    };
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let payload = payload.to_vec();
    // The payload carries the size of the decompressed image in its last bytes, which some
    // decompressors call trailing garbage: feed it all and accept a non-zero exit if the ELF
    // came out whole.
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &payload));
    let result = child.wait_with_output()?;
    let _ = writer.join();
    if !result.stdout.starts_with(b"\x7fELF") {
        bail!(
            "decompressing {} with {} did not give an ELF image",
            path.display(),
            tool[0]
        );
    }
    Ok(result.stdout)
}

/// An arm64 kernel `Image`: Debian ships it as is (6.1, 6.12), or gzip-compressed.
fn arm64_image(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let image = match bytes.starts_with(&[0x1f, 0x8b]) {
        true => output_bytes(Command::new("gzip").arg("-dc").arg(path))?,
        false => bytes,
    };
    // The arm64 boot header: its magic, "ARM\x64", at offset 56.
    if image.get(56..60) != Some(b"ARM\x64") {
        bail!("{} is not an arm64 kernel Image", path.display());
    }
    Ok(image)
}

fn output_bytes(command: &mut Command) -> Result<Vec<u8>> {
    let result = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !result.status.success() {
        bail!("{command:?} failed with {}", result.status);
    }
    Ok(result.stdout)
}

/// The kernel's BTF inside a raw `Image`, which keeps no section headers: the `.BTF` section
/// is where a BTF header (magic 0xeb9f, version 1, 24 bytes, types right after it, strings
/// right after the types) describes a blob that fits, and whose string table starts and ends
/// with a NUL; the largest such blob, as the kernel's BTF is megabytes.
fn arm64_btf(image: &[u8]) -> Option<Vec<u8>> {
    const HEADER: [u8; 12] = [0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0];
    let u32_at = |at: usize| -> Option<usize> {
        let bytes = image.get(at..at.checked_add(4)?)?;
        usize::try_from(u32::from_le_bytes(bytes.try_into().ok()?)).ok()
    };
    let blob = |at: usize| -> Option<&[u8]> {
        let (type_len, str_off, str_len) = (u32_at(at + 12)?, u32_at(at + 16)?, u32_at(at + 20)?);
        if str_off != type_len || str_len == 0 {
            return None;
        }
        let strings = at.checked_add(24)?.checked_add(str_off)?;
        let end = strings.checked_add(str_len)?;
        let table = image.get(strings..end)?;
        (table.first() == Some(&0) && table.last() == Some(&0)).then(|| &image[at..end])
    };
    image
        .windows(HEADER.len())
        .enumerate()
        .filter(|(_, window)| *window == HEADER)
        .filter_map(|(at, _)| blob(at))
        .max_by_key(|blob| blob.len())
        .map(<[u8]>::to_vec)
}

/// The contents of section `name` of a little-endian ELF64 file.
pub fn elf_section<'a>(elf: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize)
    };
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None;
    }
    let section_headers = u64_at(0x28)?;
    let entry_size = u16_at(0x3a)?;
    let count = u16_at(0x3c)?;
    let names_index = u16_at(0x3e)?;
    let header = |index: usize| section_headers + index * entry_size;
    let names_offset = u64_at(header(names_index) + 0x18)?;
    (0..count).find_map(|index| {
        let at = header(index);
        let name_offset = names_offset + u32_at(at)?;
        let section_name = elf.get(name_offset..)?.split(|&b| b == 0).next()?;
        if section_name != name.as_bytes() {
            return None;
        }
        let offset = u64_at(at + 0x18)?;
        let size = u64_at(at + 0x20)?;
        elf.get(offset..offset + size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_kernel_packages_from_depends() {
        let depends = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                       linux-base-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), \
                       linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), \
                       linux-modules-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)";
        assert_eq!(
            split_packages(depends, "7.2.13+deb14-cloud-amd64"),
            [
                "linux-binary-7.2.13+deb14-cloud-amd64",
                "linux-modules-7.2.13+deb14-cloud-amd64"
            ]
        );
        // An older image package holds the kernel itself.
        assert!(split_packages(
            "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool",
            "6.1.0-57-cloud-amd64"
        )
        .is_empty());
    }

    #[test]
    fn matches_series_names() {
        assert!(matches_series(
            "linux-image-5.10.0-46-cloud-amd64",
            "5.10",
            Arch::Amd64
        ));
        assert!(matches_series(
            "linux-image-7.3.4+deb13-cloud-amd64",
            NEWEST,
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-cloud-amd64",
            NEWEST,
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-6.1-cloud-amd64",
            NEWEST,
            Arch::Amd64
        ));
        assert!(matches_series(
            "linux-image-6.12.48+deb13-cloud-amd64",
            "6.12",
            Arch::Amd64
        ));
        assert!(matches_series(
            "linux-image-6.12.12+bpo-cloud-amd64",
            "6.12",
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-6.1.0-57-cloud-amd64",
            "6.12",
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-6.12.48+deb13-cloud-amd64-dbg",
            "6.12",
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "6.1",
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-cloud-amd64",
            "6.1",
            Arch::Amd64
        ));
        assert!(matches_series(
            "linux-image-5.10.0-30-cloud-amd64",
            "5.10.0-30",
            Arch::Amd64
        ));
        assert!(!matches_series(
            "linux-image-5.10.0-30-cloud-amd64",
            "5.10.0-3",
            Arch::Amd64
        ));
    }

    #[test]
    fn arm64_kernels_by_their_flavour() {
        assert!(matches_series(
            "linux-image-6.1.0-57-cloud-arm64",
            "6.1",
            Arch::Arm64
        ));
        assert!(!matches_series(
            "linux-image-6.1.0-57-cloud-amd64",
            "6.1",
            Arch::Arm64
        ));
        assert!(!matches_series(
            "linux-image-6.1.0-57-cloud-arm64",
            "6.1",
            Arch::Amd64
        ));
        assert_eq!(
            version_key("linux-image-6.12.117+deb13-cloud-arm64", Arch::Arm64),
            [6, 12, 117, 13]
        );
    }

    #[test]
    fn finds_the_btf_blob_in_a_raw_image() {
        // A BTF header, 4 bytes of types, 3 of strings ("\0a\0"), inside other bytes; and a
        // header whose strings do not start with a NUL, which is not BTF.
        let mut btf = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0];
        for field in [4u32, 4, 3] {
            btf.extend(field.to_le_bytes());
        }
        btf.extend([1, 2, 3, 4, 0, b'a', 0]);
        let mut fake = btf.clone();
        fake[28] = b'x';
        let image = [&[7u8; 100][..], &fake, &[0; 9], &btf, &[5; 50]].concat();
        assert_eq!(arm64_btf(&image), Some(btf));
        assert_eq!(arm64_btf(&image[..150]), None);
    }

    #[test]
    fn sorts_abi_versions_numerically() {
        let mut names = [
            "linux-image-6.1.0-9-cloud-amd64",
            "linux-image-6.1.0-57-cloud-amd64",
            "linux-image-6.1.0-10-cloud-amd64",
        ];
        names.sort_by_key(|p| version_key(p, Arch::Amd64));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-57-cloud-amd64"));
    }
}
