//! The snapshot state file: a fixed header (magic, format version,
//! payload length, CRC-32 of the payload) followed by the postcard-encoded
//! state. A file of another major version, or whose checksum fails, is
//! refused before anything is decoded.

use serde::{de::DeserializeOwned, Serialize};

const MAGIC: &[u8; 8] = b"SBXSNAP\0";
/// Bumped when old files can no longer be read.
pub const FORMAT_MAJOR: u16 = 2;
/// Bumped for compatible additions.
pub const FORMAT_MINOR: u16 = 0;
const HEADER_LEN: usize = 8 + 2 + 2 + 8 + 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a sandboxd snapshot (bad magic): rebuild the template")]
    BadMagic,
    #[error("snapshot format {found}.x is not supported by this build ({FORMAT_MAJOR}.x): rebuild the template")]
    Version { found: u16 },
    #[error("snapshot is truncated ({0} bytes): the file is incomplete; rebuild the template")]
    Truncated(usize),
    #[error("snapshot checksum mismatch: the file is corrupt; rebuild the template")]
    Checksum,
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
    #[error("cannot decode the snapshot state: {0}; rebuild the template")]
    Decode(String),
}

/// CRC-32 (IEEE 802.3, reflected), computed bytewise from a table.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|n| (0..8).fold(n as u32, |c, _| if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 }))
    });
    !data.iter().fold(!0u32, |crc, &byte| table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8))
}

/// Header and payload of `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Encode(e.to_string()))?;
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    file.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&crc32(&payload).to_le_bytes());
    file.extend_from_slice(&payload);
    Ok(file)
}

/// Checks the header and checksum, then decodes the state.
pub fn decode<T: DeserializeOwned>(file: &[u8]) -> Result<T, FormatError> {
    if file.len() < HEADER_LEN {
        return Err(FormatError::Truncated(file.len()));
    }
    if &file[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let read_u16 = |at: usize| u16::from_le_bytes([file[at], file[at + 1]]);
    let major = read_u16(8);
    if major != FORMAT_MAJOR {
        return Err(FormatError::Version { found: major });
    }
    let len = u64::from_le_bytes(file[12..20].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(file[20..24].try_into().expect("4 bytes"));
    let payload = file.get(HEADER_LEN..HEADER_LEN.saturating_add(len)).ok_or(FormatError::Truncated(file.len()))?;
    if crc32(payload) != crc {
        return Err(FormatError::Checksum);
    }
    postcard::from_bytes(payload).map_err(|e| FormatError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Sample {
        counter: u64,
        name: String,
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn round_trip_and_refusals() {
        let sample = Sample { counter: 7, name: "vm".into() };
        let mut file = encode(&sample).unwrap();
        assert_eq!(decode::<Sample>(&file).unwrap(), sample);

        let last = file.len() - 1;
        file[last] ^= 0x40;
        assert_eq!(decode::<Sample>(&file).unwrap_err(), FormatError::Checksum);
        file[last] ^= 0x40;

        file[8] = 9;
        assert_eq!(decode::<Sample>(&file).unwrap_err(), FormatError::Version { found: 9 });
        file[8] = FORMAT_MAJOR as u8;

        assert_eq!(decode::<Sample>(&file[..10]).unwrap_err(), FormatError::Truncated(10));
        file[0] = b'X';
        assert_eq!(decode::<Sample>(&file).unwrap_err(), FormatError::BadMagic);
    }
}
