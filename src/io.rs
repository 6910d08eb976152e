//! Mask files: safetensors, one uint8 tensor per mask, bit-packed along each row.
//!
//! Format `wandapp-masks` version 1:
//! - tensor `<module name>`: uint8 [rows, ceil(cols / 8)]; bit j (least significant first) of
//!   byte b in row r is column 8b + j; 1 = keep. Padding bits at the end of a row are 0.
//! - metadata `format` = "wandapp-masks", `format_version` = "1",
//!   `shape/<name>` = "rows,cols", `sha256/<name>` = `mask_hash` of the mask;
//!   any other key is the caller's (sparsity, method, config, versions).
//!
//! Loading parses only the safetensors header and raw bytes: nothing in the file is executed.

use crate::error::{Error, Result};
use crate::tensor_check::{require_bool, require_rank};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

pub const FORMAT: &str = "wandapp-masks";
pub const FORMAT_VERSION: &str = "1";
const SHAPE_KEY: &str = "shape/";
const HASH_KEY: &str = "sha256/";

fn file_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::MaskFile { path: path.display().to_string(), reason: reason.into() }
}

/// Row-wise LSB-first bit packing of a 2-D bool mask.
fn pack(mask: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    require_rank(mask, "mask", 2)?;
    require_bool(mask, "mask")?;
    let (rows, cols) = (mask.size()[0] as usize, mask.size()[1] as usize);
    let bytes = Vec::<u8>::try_from(&mask.f_to(Device::Cpu)?.f_to_kind(Kind::Uint8)?.f_contiguous()?.f_view([-1])?)?;
    let row_bytes = cols.div_ceil(8);
    let mut packed = vec![0u8; rows * row_bytes];
    for r in 0..rows {
        for c in 0..cols {
            if bytes[r * cols + c] != 0 {
                packed[r * row_bytes + c / 8] |= 1 << (c % 8);
            }
        }
    }
    Ok((rows, cols, packed))
}

fn unpack(packed: &[u8], rows: usize, cols: usize) -> Result<Tensor> {
    let row_bytes = cols.div_ceil(8);
    let keep: Vec<bool> =
        (0..rows * cols).map(|i| packed[(i / cols) * row_bytes + (i % cols) / 8] >> ((i % cols) % 8) & 1 == 1).collect();
    Ok(Tensor::from_slice(&keep).f_view([rows as i64, cols as i64])?)
}

fn digest(rows: usize, cols: usize, packed: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((rows as u64).to_le_bytes());
    h.update((cols as u64).to_le_bytes());
    h.update(packed);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 (hex) of a mask's shape and packed bits: equal masks, equal hashes, on any device.
pub fn mask_hash(mask: &Tensor) -> Result<String> {
    let (rows, cols, packed) = pack(mask)?;
    Ok(digest(rows, cols, &packed))
}

fn is_reserved(key: &str) -> bool {
    key.starts_with(SHAPE_KEY) || key.starts_with(HASH_KEY) || key == "format" || key == "format_version"
}

pub fn save_masks(path: &Path, masks: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    if let Some(key) = metadata.keys().find(|k| is_reserved(k)) {
        return Err(Error::InvalidArgument {
            arg: "metadata",
            reason: format!("key {key:?} is reserved by the mask format; rename it"),
        });
    }
    let mut meta = metadata.clone();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("format_version".into(), FORMAT_VERSION.into());
    let mut packed = Vec::with_capacity(masks.len());
    for (name, mask) in masks {
        let (rows, cols, bytes) = pack(mask)?;
        meta.insert(format!("{SHAPE_KEY}{name}"), format!("{rows},{cols}"));
        meta.insert(format!("{HASH_KEY}{name}"), digest(rows, cols, &bytes));
        packed.push((name.clone(), rows, cols.div_ceil(8), bytes));
    }
    let views = packed
        .iter()
        .map(|(name, rows, row_bytes, bytes)| Ok((name.as_str(), TensorView::new(Dtype::U8, vec![*rows, *row_bytes], bytes)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| file_error(path, e.to_string()))?;
    safetensors::tensor::serialize_to_file(views, &Some(meta), path).map_err(|e| file_error(path, e.to_string()))
}

/// (module name, bool keep-mask) pairs.
pub type NamedMasks = Vec<(String, Tensor)>;

/// Masks in file order of names (sorted), and the caller's metadata.
pub fn load_masks(path: &Path) -> Result<(NamedMasks, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| file_error(path, format!("not a valid safetensors file ({e}); it may be truncated or corrupt")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| file_error(path, e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(file_error(path, "not a wandapp mask file (metadata `format` is missing)"));
    }
    if meta.get("format_version").map(String::as_str) != Some(FORMAT_VERSION) {
        return Err(file_error(path, format!("unsupported format_version {:?}; expected {FORMAT_VERSION}", meta.get("format_version"))));
    }
    let mut names: Vec<String> = file.names().into_iter().cloned().collect();
    names.sort();
    let mut masks = Vec::with_capacity(names.len());
    for name in names {
        let view = file.tensor(&name).map_err(|e| file_error(path, e.to_string()))?;
        let shape = meta
            .get(&format!("{SHAPE_KEY}{name}"))
            .and_then(|s| s.split_once(',').and_then(|(r, c)| Some((r.parse::<usize>().ok()?, c.parse::<usize>().ok()?))))
            .ok_or_else(|| file_error(path, format!("mask {name:?} has no valid shape entry")))?;
        let (rows, cols) = shape;
        if view.dtype() != Dtype::U8 || view.shape() != [rows, cols.div_ceil(8)] {
            return Err(file_error(path, format!("mask {name:?} is stored as {:?} {:?}, inconsistent with shape {rows}x{cols}", view.dtype(), view.shape())));
        }
        let expected = meta.get(&format!("{HASH_KEY}{name}")).ok_or_else(|| file_error(path, format!("mask {name:?} has no hash")))?;
        if &digest(rows, cols, view.data()) != expected {
            return Err(file_error(path, format!("mask {name:?} does not match its sha256; the file is corrupt")));
        }
        masks.push((name.clone(), unpack(view.data(), rows, cols)?));
    }
    let user_meta = meta.into_iter().filter(|(k, _)| !is_reserved(k)).collect();
    Ok((masks, user_meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tensor {
        Tensor::from_slice(&[true, false, true, true, false, false, true, false, true, true, false])
            .view([1, 11])
            .repeat([3, 1])
    }

    /// A folder of the test's own, removed when the test ends (also when it fails).
    struct ScratchDir(std::path::PathBuf);

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn round_trip_and_hash() {
        let dir = ScratchDir(std::env::temp_dir().join(format!("wandapp-io-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let path = dir.0.join("m.safetensors");
        let m = sample();
        let meta = HashMap::from([("method".to_string(), "wanda".to_string())]);
        save_masks(&path, &[("a.b".into(), m.shallow_clone())], &meta).unwrap();
        let (loaded, user) = load_masks(&path).unwrap();
        assert!(loaded[0].1.equal(&m));
        assert_eq!(user, meta);
        assert_eq!(mask_hash(&loaded[0].1).unwrap(), mask_hash(&m).unwrap());

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(load_masks(&path), Err(Error::MaskFile { .. })));
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(load_masks(&path), Err(Error::MaskFile { .. })));
    }
}
