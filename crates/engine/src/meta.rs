//! The data dir's identity: format version, shard count and executor count,
//! fixed when the data dir is created.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::layout::Layout;

pub const META_FILE: &str = "peakstack.meta";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("data dir {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("data dir {path} has an unreadable {META_FILE}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid layout: {shards} shards on {executors} executors (shards 1..=4096, executors 1..=256)")]
    Layout { shards: u32, executors: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub format: u32,
    pub shards: u32,
    pub executors: u16,
}

impl Meta {
    pub fn layout(&self) -> Layout {
        Layout::new(self.shards, self.executors).expect("validated when loaded")
    }

    /// Reads the data dir's meta file, or creates the data dir with the given
    /// counts. An existing data dir keeps its own counts (the flags are only
    /// used at creation) and says so in the log.
    pub fn load_or_create(dir: &Path, shards: u32, executors: u16) -> Result<Meta, MetaError> {
        let io = |source| MetaError::Io { path: dir.to_path_buf(), source };
        fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(META_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let meta = parse(&text).map_err(|reason| MetaError::Invalid { path: path.clone(), reason })?;
                if Layout::new(meta.shards, meta.executors).is_none() {
                    return Err(MetaError::Layout { shards: meta.shards, executors: meta.executors });
                }
                if meta.shards != shards || meta.executors != executors {
                    tracing::info!(
                        shards = meta.shards,
                        executors = meta.executors,
                        "data dir exists; its shard and executor counts are kept"
                    );
                }
                Ok(meta)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let layout = Layout::new(shards, executors).ok_or(MetaError::Layout { shards, executors })?;
                let meta = Meta { format: FORMAT_VERSION, shards: layout.shards(), executors: layout.executors() };
                let tmp = dir.join(format!("{META_FILE}.tmp"));
                let mut file = fs::File::create(&tmp).map_err(io)?;
                write!(file, "format={}\nshards={}\nexecutors={}\n", meta.format, meta.shards, meta.executors)
                    .map_err(io)?;
                file.sync_all().map_err(io)?;
                fs::rename(&tmp, &path).map_err(io)?;
                fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                Ok(meta)
            }
            Err(e) => Err(io(e)),
        }
    }
}

fn parse(text: &str) -> Result<Meta, String> {
    let mut format = None;
    let mut shards = None;
    let mut executors = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (key, value) = line.split_once('=').ok_or_else(|| format!("bad line {line:?}"))?;
        let value = value.trim();
        match key.trim() {
            "format" => format = Some(value.parse::<u32>().map_err(|e| e.to_string())?),
            "shards" => shards = Some(value.parse::<u32>().map_err(|e| e.to_string())?),
            "executors" => executors = Some(value.parse::<u16>().map_err(|e| e.to_string())?),
            other => return Err(format!("unknown key {other:?}")),
        }
    }
    let format = format.ok_or("missing format")?;
    if format != FORMAT_VERSION {
        return Err(format!("format {format} is not supported (this build reads {FORMAT_VERSION})"));
    }
    Ok(Meta { format, shards: shards.ok_or("missing shards")?, executors: executors.ok_or("missing executors")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let meta = Meta::load_or_create(dir.path(), 64, 2).unwrap();
        assert_eq!((meta.shards, meta.executors), (64, 2));
        let again = Meta::load_or_create(dir.path(), 8, 4).unwrap();
        assert_eq!(again, meta);
        assert!(Meta::load_or_create(&dir.path().join("x"), 0, 2).is_err());
        fs::write(dir.path().join(META_FILE), "format=9\nshards=1\nexecutors=1\n").unwrap();
        assert!(matches!(Meta::load_or_create(dir.path(), 64, 2), Err(MetaError::Invalid { .. })));
    }
}
