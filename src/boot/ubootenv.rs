//! The U-Boot environment, read and written natively in the format of
//! U-Boot's `env export -c` / `saveenv` and of `fw_printenv`/`fw_setenv`
//! (libubootenv, u-boot-tools).
//!
//! One copy of the environment is a fixed-size block:
//!
//! | bytes        | single copy            | redundant copies               |
//! |--------------|------------------------|--------------------------------|
//! | 0..4         | CRC32 (little endian) of the data | the same            |
//! | 4            | data                   | flags: a counter, higher = newer |
//! | 4 or 5 .. size | `name=value\0` … `\0`, padded | the same                |
//!
//! With two copies (redundant), a write goes to the copy that is *not*
//! current, with the flags byte one higher (wrapping 255 → 0 the way U-Boot
//! compares them), so a power cut at any moment leaves the old copy valid:
//! either the new copy is complete and newer, or its CRC is wrong and the
//! old copy wins. Readers pick the valid copy with the newer flags.
//!
//! Variables are written sorted by name (as U-Boot and fw_setenv do) and the
//! rest of the block is zero-filled (as `env export` and `mkenvimage -p 0`).
//! Where each copy lives (a file, a device at an offset, a file on an
//! unmounted FAT partition) is behind [`EnvIo`].

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The variables of an environment, sorted by name.
pub type Vars = BTreeMap<String, String>;

/// Where one copy of the environment lives and how to read and rewrite it
/// in place.
pub trait EnvIo {
    /// Reads `len` bytes of the copy (its whole block).
    fn read(&self, len: usize) -> Result<Vec<u8>>;
    /// Rewrites the whole block in place and makes it durable.
    fn write(&self, data: &[u8]) -> Result<()>;
    /// How the copy is named in messages ("/boot/uboot.env at 0x0").
    fn describe(&self) -> String;
}

/// A copy in a file or block device, at a byte offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCopy {
    pub path: PathBuf,
    pub offset: u64,
}

impl EnvIo for FileCopy {
    fn read(&self, len: usize) -> Result<Vec<u8>> {
        let f = File::open(&self.path).with_context(|| format!("opening {}", self.describe()))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f
                .read_at(&mut buf[got..], self.offset + got as u64)
                .with_context(|| format!("reading {}", self.describe()))?;
            if n == 0 {
                bail!(
                    "{} is truncated: it ends {} bytes into the {len}-byte environment; \
                     check the size in the config (fw_env.config) or recreate the environment",
                    self.describe(),
                    got
                );
            }
            got += n;
        }
        Ok(buf)
    }

    fn write(&self, data: &[u8]) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .with_context(|| format!("opening {} for writing", self.describe()))?;
        f.write_all_at(data, self.offset)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", self.describe()))
    }

    fn describe(&self) -> String {
        format!("{} at {:#x}", self.path.display(), self.offset)
    }
}

/// The layout of an environment: its size and its one or two copies.
pub struct EnvStore {
    pub size: usize,
    pub copies: Vec<Box<dyn EnvIo>>,
}

/// An environment as read: its variables and, for redundant ones, which
/// copy is current and its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub vars: Vars,
    /// Index of the copy the variables came from.
    pub current: usize,
    /// Its flags byte (redundant environments only).
    pub flags: Option<u8>,
}

/// Smallest block that can hold a header and an empty environment.
const MIN_SIZE: usize = 16;

impl EnvStore {
    /// Checks the layout: one or two copies, a sane size.
    pub fn new(size: usize, copies: Vec<Box<dyn EnvIo>>) -> Result<EnvStore> {
        if !(MIN_SIZE..=16 << 20).contains(&size) {
            bail!("environment size {size:#x} is out of range ({MIN_SIZE:#x} to 16 MiB)");
        }
        if copies.is_empty() || copies.len() > 2 {
            bail!("an environment has one or two copies, not {}", copies.len());
        }
        Ok(EnvStore { size, copies })
    }

    fn redundant(&self) -> bool {
        self.copies.len() == 2
    }

    /// Names the copies in messages.
    pub fn describe(&self) -> String {
        self.copies
            .iter()
            .map(|c| c.describe())
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// Reads the current copy. A copy with a bad CRC is skipped when the
    /// other is valid; when none is valid this is an error naming the fix,
    /// never an empty default.
    pub fn load(&self) -> Result<Loaded> {
        let header = if self.redundant() { 5 } else { 4 };
        let mut valid = Vec::new();
        let mut problems = Vec::new();
        for (i, c) in self.copies.iter().enumerate() {
            // A copy that cannot be read whole is a layout problem (wrong
            // size or offset), not a torn write: refuse rather than write
            // past the end of a file.
            let block = c.read(self.size)?;
            match decode(&block, header) {
                Ok(vars) => valid.push((
                    i,
                    if self.redundant() {
                        Some(block[4])
                    } else {
                        None
                    },
                    vars,
                )),
                Err(e) => problems.push(format!("{}: {e}", c.describe())),
            }
        }
        let pick = match valid.as_slice() {
            [] => bail!(
                "no valid U-Boot environment in {} ({}); restore it (fw_setenv with a default \
                 environment, or mkenvimage) before using abup",
                self.describe(),
                problems.join("; ")
            ),
            [_] => 0,
            [a, b] => {
                let (fa, fb) = (a.1.unwrap_or(0), b.1.unwrap_or(0));
                // U-Boot's rule (env_import_redund): 255 → 0 wraps around.
                usize::from(if fa == 255 && fb == 0 {
                    true
                } else if fb == 255 && fa == 0 {
                    false
                } else {
                    fb > fa
                })
            }
            _ => unreachable!("at most two copies"),
        };
        let (current, flags, vars) = valid.swap_remove(pick);
        Ok(Loaded {
            vars,
            current,
            flags,
        })
    }

    /// Writes `vars` as the new environment, after `loaded` (what
    /// [`EnvStore::load`] returned): into the stale copy with the next flags
    /// for a redundant environment, in place for a single one.
    pub fn store(&self, loaded: &Loaded, vars: &Vars) -> Result<()> {
        let (target, flags) = match loaded.flags {
            Some(f) => (1 - loaded.current, Some(f.wrapping_add(1))),
            None => (0, None),
        };
        let block = encode(vars, self.size, flags)?;
        self.copies[target].write(&block)
    }
}

/// Parses one block: checks the CRC and the variable list.
pub fn decode(block: &[u8], header: usize) -> std::result::Result<Vars, String> {
    if block.len() <= header {
        return Err("block is too small".into());
    }
    let stored = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
    let data = &block[header..];
    if crc32fast::hash(data) != stored {
        return Err("CRC mismatch (corrupt or never written)".into());
    }
    let mut vars = Vars::new();
    let mut rest = data;
    loop {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err("the variable list has no end marker".into());
        };
        let entry = &rest[..end];
        rest = &rest[end + 1..];
        if entry.is_empty() {
            return Ok(vars);
        }
        let text = std::str::from_utf8(entry).map_err(|_| {
            format!(
                "a variable is not UTF-8: {:?}",
                String::from_utf8_lossy(entry)
            )
        })?;
        let Some((name, value)) = text.split_once('=') else {
            return Err(format!("entry {text:?} is not name=value"));
        };
        vars.insert(name.to_string(), value.to_string());
    }
}

/// Builds one block of `size` bytes: header (CRC, and flags when given),
/// sorted variables, end marker, zero padding.
pub fn encode(vars: &Vars, size: usize, flags: Option<u8>) -> Result<Vec<u8>> {
    let header = if flags.is_some() { 5 } else { 4 };
    let mut data = Vec::new();
    for (name, value) in vars {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            bail!("U-Boot variable {name:?} cannot be stored (empty, or '=' or NUL in it)");
        }
        data.extend_from_slice(name.as_bytes());
        data.push(b'=');
        data.extend_from_slice(value.as_bytes());
        data.push(0);
    }
    data.push(0);
    let room = size - header;
    if data.len() + 1 > room {
        bail!(
            "the variables need {} bytes but the environment holds {room}; \
             make the environment bigger or remove variables",
            data.len() + 1
        );
    }
    data.resize(room, 0);
    let mut block = crc32fast::hash(&data).to_le_bytes().to_vec();
    block.extend(flags);
    block.extend_from_slice(&data);
    Ok(block)
}

/// One line of an `fw_env.config`: device or file, offset, size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwEnvLine {
    pub path: PathBuf,
    pub offset: u64,
    pub size: usize,
}

/// Parses an `fw_env.config` (the format fw_printenv reads): one line per
/// copy, `device offset size [sector-size [sectors]]`, `#` comments.
pub fn parse_fw_env_config(text: &str, source: &Path) -> Result<Vec<FwEnvLine>> {
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let where_ = || format!("{} line {}", source.display(), n + 1);
        if fields.len() < 3 {
            bail!(
                "{}: expected `device offset size`, found {line:?}",
                where_()
            );
        }
        let num = |s: &str| -> Result<u64> {
            let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            parsed.with_context(|| format!("{}: {s:?} is not a number", where_()))
        };
        let path = PathBuf::from(fields[0]);
        if !path.is_absolute() {
            bail!("{}: {} must be an absolute path", where_(), path.display());
        }
        lines.push(FwEnvLine {
            path,
            offset: num(fields[1])?,
            size: usize::try_from(num(fields[2])?)
                .with_context(|| format!("{}: size too large", where_()))?,
        });
    }
    match lines.as_slice() {
        [_] => {}
        [a, b] if a.size == b.size => {}
        [_, _] => bail!(
            "{}: the two copies of a redundant environment must have the same size",
            source.display()
        ),
        _ => bail!(
            "{}: expected one line (single) or two lines (redundant environment), found {}",
            source.display(),
            lines.len()
        ),
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vars {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trip_single_and_redundant() {
        let v = vars(&[("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3"), ("x", "")]);
        for flags in [None, Some(7)] {
            let b = encode(&v, 0x400, flags).unwrap();
            assert_eq!(b.len(), 0x400);
            let header = if flags.is_some() { 5 } else { 4 };
            assert_eq!(decode(&b, header).unwrap(), v);
            assert_eq!(&b[header..header + 11], b"BOOT_A_LEFT");
        }
    }

    /// The same variables give the same bytes as U-Boot's `mkenvimage`
    /// (zero padding), single and redundant; and a redundant environment
    /// written by `fw_setenv` is read from its newer copy.
    #[test]
    fn matches_mkenvimage_and_reads_fw_setenv() {
        let dir = tempfile::tempdir().unwrap();
        let v = vars(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("bootcmd", "run x; echo"),
        ]);
        let txt = dir.path().join("v.txt");
        std::fs::write(&txt, "BOOT_A_LEFT=3\nBOOT_ORDER=A B\nbootcmd=run x; echo\n").unwrap();
        for redundant in [false, true] {
            let out = dir.path().join("env.bin");
            let mut cmd = std::process::Command::new("mkenvimage");
            if redundant {
                cmd.arg("-r");
            }
            let st = cmd
                .args(["-p", "0", "-s", "8192", "-o"])
                .arg(&out)
                .arg(&txt)
                .status()
                .unwrap();
            assert!(st.success());
            let ours = encode(&v, 8192, redundant.then_some(1)).unwrap();
            // mkenvimage keeps the file's order: the file is sorted.
            assert!(
                std::fs::read(&out).unwrap() == ours,
                "redundant={redundant}"
            );
        }
        // Two copies at offsets of one file; fw_setenv writes the stale one.
        let flash = dir.path().join("flash");
        let block = encode(&v, 0x1000, Some(1)).unwrap();
        std::fs::write(&flash, [vec![0xff; 0x400], block.clone(), block].concat()).unwrap();
        let cfg = dir.path().join("fw_env.config");
        let f = flash.display();
        std::fs::write(&cfg, format!("{f} 0x400 0x1000\n{f} 0x1400 0x1000\n")).unwrap();
        let st = std::process::Command::new("fw_setenv")
            .arg("-c")
            .arg(&cfg)
            .args(["BOOT_A_LEFT", "2"])
            .status()
            .unwrap();
        assert!(st.success());
        let lines = parse_fw_env_config(&std::fs::read_to_string(&cfg).unwrap(), &cfg).unwrap();
        let store = EnvStore::new(
            0x1000,
            lines
                .into_iter()
                .map(|l| {
                    Box::new(FileCopy {
                        path: l.path,
                        offset: l.offset,
                    }) as Box<dyn EnvIo>
                })
                .collect(),
        )
        .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.vars["BOOT_A_LEFT"], "2");
        assert_eq!((loaded.current, loaded.flags), (1, Some(2)));
        // Our write goes to copy 0 with flags 3, and fw_printenv reads it.
        let mut v2 = loaded.vars.clone();
        v2.insert("BOOT_A_LEFT".into(), "1".into());
        store.store(&loaded, &v2).unwrap();
        assert_eq!(std::fs::read(&flash).unwrap()[0x404], 3);
        let out = std::process::Command::new("fw_printenv")
            .arg("-c")
            .arg(&cfg)
            .arg("BOOT_A_LEFT")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "BOOT_A_LEFT=1\n");
        // Flags wrap like U-Boot's: 0 is newer than 255.
        let wrap = dir.path().join("wrap");
        let old = encode(&vars(&[("x", "old")]), 64, Some(255)).unwrap();
        let new = encode(&vars(&[("x", "new")]), 64, Some(0)).unwrap();
        std::fs::write(&wrap, [old, new].concat()).unwrap();
        let copies: Vec<Box<dyn EnvIo>> = [0, 64]
            .into_iter()
            .map(|o| {
                Box::new(FileCopy {
                    path: wrap.clone(),
                    offset: o,
                }) as Box<dyn EnvIo>
            })
            .collect();
        assert_eq!(
            EnvStore::new(64, copies).unwrap().load().unwrap().vars["x"],
            "new"
        );
    }

    #[test]
    fn corrupt_blocks_are_refused() {
        let v = vars(&[("a", "1")]);
        let mut b = encode(&v, 64, None).unwrap();
        b[10] ^= 1;
        assert!(decode(&b, 4).unwrap_err().contains("CRC"));
        // A valid CRC over data without an end marker or without '='.
        let mut data = vec![b'x'; 60];
        let mut blk = crc32fast::hash(&data).to_le_bytes().to_vec();
        blk.extend_from_slice(&data);
        assert!(decode(&blk, 4).unwrap_err().contains("end marker"));
        data[1] = 0;
        data[2] = 0;
        let mut blk = crc32fast::hash(&data).to_le_bytes().to_vec();
        blk.extend_from_slice(&data);
        assert!(decode(&blk, 4).unwrap_err().contains("name=value"));
    }

    #[test]
    fn too_many_variables_are_refused() {
        let v = vars(&[("a", &"x".repeat(100))]);
        let e = encode(&v, 64, None).unwrap_err().to_string();
        assert!(e.contains("bigger"), "{e}");
        assert!(encode(&vars(&[("a=b", "1")]), 64, None).is_err());
    }

    #[test]
    fn fw_env_config_lines() {
        let text =
            "# comment\n/boot/uboot.env 0x0 0x4000 0x4000\n\n/dev/mmcblk0 0x100000 16384 # x\n";
        let l = parse_fw_env_config(text, Path::new("f")).unwrap();
        assert_eq!(l[0].offset, 0);
        assert_eq!(l[0].size, 0x4000);
        assert_eq!(l[1].offset, 0x100000);
        assert_eq!(l[1].size, 0x4000);
        for bad in ["", "/a 0 zz", "rel 0 16", "/a 0 16\n/b 0 32", "/a 0"] {
            assert!(parse_fw_env_config(bad, Path::new("f")).is_err(), "{bad}");
        }
    }
}
