//! A writer for the `newc` cpio format the kernel unpacks as its initramfs.

use std::collections::BTreeSet;

pub struct Archive {
    data: Vec<u8>,
    dirs: BTreeSet<String>,
    next_inode: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            dirs: BTreeSet::new(),
            next_inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, content: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let fields = [
            inode,
            mode,
            0,
            0,
            if mode & S_IFDIR != 0 { 2 } else { 1 },
            0,
            content.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// Adds `path` and every missing parent directory.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut current = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !current.is_empty() {
                current.push('/');
            }
            current.push_str(part);
            if self.dirs.insert(current.clone()) {
                self.entry(&current.clone(), S_IFDIR | 0o755, &[], (0, 0));
            }
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_start_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | mode, content, (0, 0));
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | 0o600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.data.len().is_multiple_of(512) {
            self.data.push(0);
        }
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_newc_headers_and_parents() {
        let mut archive = Archive::new();
        archive.file("/a/b/c", 0o644, b"xyz");
        let data = archive.finish();
        let text = String::from_utf8_lossy(&data);
        assert!(text.starts_with("070701"));
        let a = text.find("a\0").expect("a");
        let b = text.find("a/b\0").expect("a/b");
        let c = text.find("a/b/c\0").expect("a/b/c");
        assert!(a < b && b < c, "parents come first");
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(data.len() % 512, 0);
    }
}
