//! Debian packages of another architecture, downloaded and unpacked under target/xtask, never
//! installed: apt reads the system's sources but keeps its lists, cache and an empty package
//! status of its own, so the host's apt state and architectures are left alone. An unpacked
//! package is kept until target/xtask is removed.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    bootstrap::{self, cache_dir, say},
    kernels,
    musl::Arch,
};

fn dir(arch: Arch) -> PathBuf {
    cache_dir().join("debs").join(arch.name())
}

fn apt_options(arch: Arch) -> Vec<OsString> {
    let apt = dir(arch).join("apt");
    [
        format!("-oAPT::Architecture={}", arch.name()),
        format!("-oAPT::Architectures={}", arch.name()),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        format!("-oDir::State::status={}", apt.join("status").display()),
        "-oAPT::Sandbox::User=root".into(),
        "-qq".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// Updates the private package lists of `arch`, at most once a day.
fn apt_update(arch: Arch) -> Result<()> {
    let apt = dir(arch).join("apt");
    let stamp = apt.join("updated");
    let fresh = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < 86_400));
    if fresh {
        return Ok(());
    }
    fs::create_dir_all(apt.join("lists/partial"))?;
    fs::create_dir_all(apt.join("cache/archives/partial"))?;
    fs::write(apt.join("status"), "")?;
    say(format!(
        "updating private apt lists of the system's sources for {}",
        arch.name()
    ));
    bootstrap::run(
        Command::new("apt-get")
            .args(apt_options(arch))
            .arg("update"),
    )?;
    fs::write(stamp, "")?;
    Ok(())
}

/// Debian's `package` for `arch`, unpacked (`dpkg-deb -x`): the folder holding its files.
pub fn unpacked(arch: Arch, package: &str) -> Result<PathBuf> {
    let root = dir(arch).join(package);
    if root.is_dir() {
        return Ok(root);
    }
    bootstrap::debian_packages(&[("dpkg-deb", "dpkg")])?;
    apt_update(arch)?;
    say(format!(
        "downloading Debian's {package} for {}",
        arch.name()
    ));
    let download = dir(arch).join("download");
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    bootstrap::run(
        Command::new("apt-get")
            .args(apt_options(arch))
            .arg("download")
            .arg(format!("{package}:{}", arch.name()))
            .current_dir(&download),
    )?;
    let deb = fs::read_dir(&download)?
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download {package} produced no .deb"))?;
    let partial = dir(arch).join(format!("{package}.partial"));
    let _ = fs::remove_dir_all(&partial);
    bootstrap::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, &root)?;
    let _ = fs::remove_dir_all(&download);
    Ok(root)
}

/// The file at `path` inside the unpacked `root`, following symbolic links inside it (an
/// absolute link names a path of the package, not of this machine).
pub fn resolve(root: &Path, path: &str) -> Result<PathBuf> {
    let mut current = PathBuf::from(path.trim_start_matches('/'));
    for _ in 0..16 {
        let host = root.join(&current);
        match fs::read_link(&host) {
            Ok(target) => {
                current = if target.is_absolute() {
                    target.strip_prefix("/")?.to_path_buf()
                } else {
                    current
                        .parent()
                        .map(|parent| parent.join(&target))
                        .unwrap_or(target)
                };
            }
            Err(_) if host.is_file() => return Ok(host),
            Err(_) => bail!("{} has no {path}", root.display()),
        }
    }
    bail!("{path} in {}: too many symbolic links", root.display())
}

/// What a dynamically linked ELF program or library asks the loader for: its program
/// interpreter (`.interp`) and the shared libraries it needs (`DT_NEEDED` of `.dynamic`).
pub fn dynamic_needs(elf: &[u8]) -> Result<(Option<String>, Vec<String>)> {
    let text = |bytes: &[u8]| {
        String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    };
    let interpreter = kernels::elf_section(elf, ".interp").map(text);
    let Some(dynamic) = kernels::elf_section(elf, ".dynamic") else {
        return Ok((interpreter, Vec::new()));
    };
    let strings = kernels::elf_section(elf, ".dynstr").context("a .dynamic without .dynstr")?;
    let mut needed = Vec::new();
    for entry in dynamic.chunks_exact(16) {
        let word = |at: usize| {
            entry[at..at + 8]
                .try_into()
                .map(u64::from_le_bytes)
                .unwrap_or_default()
        };
        match word(0) {
            0 => break,
            // DT_NEEDED: an offset into .dynstr.
            1 => {
                let offset = usize::try_from(word(8))?;
                let name = strings.get(offset..).context("DT_NEEDED out of .dynstr")?;
                needed.push(text(name));
            }
            _ => {}
        }
    }
    Ok((interpreter, needed))
}

/// Every file `program` (a path inside the unpacked `roots`) loads, itself first: its
/// interpreter and its shared libraries, theirs in turn, found in `arch`'s library folders of
/// the roots. Each is returned with its path on the target system.
pub fn program_closure(
    arch: Arch,
    roots: &[PathBuf],
    program: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let find = |path: &str| -> Result<PathBuf> {
        roots
            .iter()
            .find_map(|root| resolve(root, path).ok())
            .with_context(|| format!("{path} is in none of {roots:?}"))
    };
    let triplet = format!("{}-linux-gnu", arch.machine());
    let library_dirs = [
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib".to_owned(),
        "/usr/lib".to_owned(),
    ];
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut pending = vec![program.to_owned()];
    while let Some(path) = pending.pop() {
        if files.iter().any(|(known, _)| *known == path) {
            continue;
        }
        let host = find(&path)?;
        let (interpreter, needed) = dynamic_needs(&fs::read(&host)?)
            .with_context(|| format!("reading {}", host.display()))?;
        pending.extend(interpreter);
        for name in needed {
            let path = library_dirs
                .iter()
                .map(|dir| format!("{dir}/{name}"))
                .find(|path| find(path).is_ok())
                .with_context(|| format!("{name}, needed by {path}, is in none of {roots:?}"))?;
            pending.push(path);
        }
        files.push((path, host));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_a_dynamic_program_loads() {
        // This test program, linked against the host's C library.
        let elf = fs::read(std::env::current_exe().unwrap()).unwrap();
        let (interpreter, needed) = dynamic_needs(&elf).unwrap();
        assert!(interpreter.is_some_and(|path| path.starts_with("/lib")));
        assert!(needed.iter().any(|name| name == "libc.so.6"), "{needed:?}");
    }

    #[test]
    fn links_resolve_inside_the_unpacked_package() {
        let root = std::env::temp_dir().join(format!("xtask-debs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("lib/aarch64-linux-gnu")).unwrap();
        fs::write(
            root.join("lib/aarch64-linux-gnu/ld-linux-aarch64.so.1"),
            b"ld",
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "aarch64-linux-gnu/ld-linux-aarch64.so.1",
            root.join("lib/ld-linux-aarch64.so.1"),
        )
        .unwrap();
        // Absolute: the package's /lib, not this machine's.
        std::os::unix::fs::symlink("/lib/ld-linux-aarch64.so.1", root.join("lib/absolute.so.1"))
            .unwrap();
        let expected = root.join("lib/aarch64-linux-gnu/ld-linux-aarch64.so.1");
        assert_eq!(
            resolve(&root, "/lib/ld-linux-aarch64.so.1").unwrap(),
            expected
        );
        assert_eq!(resolve(&root, "/lib/absolute.so.1").unwrap(), expected);
        assert!(resolve(&root, "/lib/missing.so").is_err());
        fs::remove_dir_all(&root).unwrap();
    }
}
