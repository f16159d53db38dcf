//! Encryption at rest (`--encryption-key-file`): the server key, the key each cache_salt's
//! records are sealed with, and sealing and opening a record's payload. Owns the cryptography
//! only; the byte layout of a record (and its version 2 flag "sealed") is `store::record`'s.
//!
//! - **Cipher**: AES-256-GCM from `ring`. `ring` is already in the build (rustls uses it for
//!   L3's TLS), its AEAD code is BoringSSL's, audited and constant time, with AES-NI/VAES and
//!   CLMUL on x86-64; RustCrypto's `aes-gcm` would add a second AES implementation for the
//!   same job.
//! - **Per-salt key**: HKDF-SHA256 (RFC 5869) of the 32-byte server key, salt
//!   [`HKDF_SALT`], info [`HKDF_INFO`] followed by the cache_salt's UTF-8 bytes. A standard
//!   KDF, so a record can be sealed or checked independently (`tests/fixtures/format-v2` are
//!   written by Python's `cryptography`). One tenant's key opens nothing of another's.
//! - **Nonce**: 12 random bytes per record (from the OS), stored with it. The same chunk is
//!   stored again with other bytes (engines round differently), so a nonce derived from the
//!   key would repeat under different plaintexts; random nonces stay unique far beyond what
//!   one salt ever writes (2^32 records per salt key keeps collisions below 2^-32).
//! - **Associated data**: [`AAD_CONTEXT`], codec, itemsize, raw length and the record's whole
//!   key section (rank, object group, chunk hash, model, cache_salt). A sealed payload moved
//!   under another key, or a header whose key, codec or length was rewritten (checksums
//!   recomputed), fails to open.
//!
//! What fails to open (no key, another key, another salt's key, tampering) is a
//! [`SealError`], counted here ([`SealStats`]) and by the tier that read it, and a miss for
//! the caller: never bytes. Records without the flag (version 1) are read as before, with or
//! without a key. L1 is never sealed: it is memory.
//!
//! **Blobs** (`seal_blob`/`open_blob`): the same cipher for the tenant's data in other formats
//! (window manifests' token ids, the session journal's tokens), each [`BlobKind`] under its
//! own per-salt key (HKDF info [`BlobKind::info`], so a manifest key never equals a record
//! key), with a fresh random nonce and associated data the owning format chooses (what the
//! blob belongs to). The byte layouts stay with their formats (`windows::catalog`,
//! `session::journal`).

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use connector_protocol::ObjectKey;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::codec::{self, Codec, CodecError, CompressionPolicy};
use crate::store::le::PutLe;
use crate::store::record::{self, Record, RecordHeader, FLAG_SEALED};

/// Bytes of the server key.
pub const KEY_LEN: usize = 32;
/// Bytes of the GCM tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a payload: the nonce before it, the tag after it.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// HKDF-SHA256's salt for every per-cache_salt key.
pub const HKDF_SALT: &[u8] = b"cwm record sealing, format 2";
/// HKDF-SHA256's info, before the cache_salt's bytes.
pub const HKDF_INFO: &[u8] = b"cwm cache_salt key\0";
/// The start of every sealed record's associated data.
pub const AAD_CONTEXT: &[u8] = b"CWMR sealed v2\0";

/// What a sealed blob holds: each kind has its own key per salt and its own associated data
/// prefix, so a blob of one kind never opens as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobKind {
    /// A window manifest's sealed part (`windows::catalog`, manifest version 2).
    WindowManifest,
    /// A session journal entry's tokens (`session::journal`, journal version 2).
    SessionJournal,
}

impl BlobKind {
    /// HKDF info of this kind's per-salt key, before the cache_salt's bytes.
    pub fn info(self) -> &'static [u8] {
        match self {
            BlobKind::WindowManifest => b"cwm window manifest key\0",
            BlobKind::SessionJournal => b"cwm session journal key\0",
        }
    }

    /// The start of this kind's associated data; the owning format appends what the blob
    /// belongs to.
    pub fn aad_context(self) -> &'static [u8] {
        match self {
            BlobKind::WindowManifest => b"CWMW sealed v2\0",
            BlobKind::SessionJournal => b"CWMS sealed v2\0",
        }
    }

    fn what(self) -> &'static str {
        match self {
            BlobKind::WindowManifest => "window manifest",
            BlobKind::SessionJournal => "session journal entry",
        }
    }
}

/// Why a sealed blob did not open: its contents stay unknown, never guessed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum BlobError {
    #[error(
        "{what} of cache_salt {salt:?} is sealed (encryption at rest) and this server has no \
         --encryption-key-file"
    )]
    NoKey { what: &'static str, salt: String },
    #[error(
        "{what} of cache_salt {salt:?} does not open with this server's key (sealed under \
         another --encryption-key-file, moved, or altered)"
    )]
    WrongKey { what: &'static str, salt: String },
}

/// Why a key file was refused at start.
#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("encryption key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("encryption key file {path} is not a regular file")]
    NotAFile { path: String },
    #[error(
        "encryption key file {path} has mode {mode:04o}: group or others may read it; it must \
         be readable by its owner only (chmod 600 {path})"
    )]
    Permissions { path: String, mode: u32 },
    #[error(
        "encryption key file {path}: expected {} hex digits ({KEY_LEN} random bytes; make one \
         with `openssl rand -hex 32`), found {found}",
        KEY_LEN * 2
    )]
    Malformed { path: String, found: String },
}

/// The server key (`--encryption-key-file`). Never printed.
pub struct ServerKey([u8; KEY_LEN]);

impl fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerKey(***)")
    }
}

impl ServerKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ServerKey {
        ServerKey(bytes)
    }

    /// Read a key file: 64 hex digits (surrounding whitespace allowed), in a regular file no
    /// one but its owner may read or write.
    pub fn load(path: &Path) -> Result<ServerKey, KeyFileError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read = |source| KeyFileError::Read {
            path: shown.clone(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        // The open file's own metadata: what is checked is what is read.
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(KeyFileError::NotAFile { path: shown });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: shown, mode });
        }
        let mut text = String::new();
        // Bounded: a key file is 64 digits and a newline; a larger file is malformed.
        (&mut file)
            .take(1024)
            .read_to_string(&mut text)
            .map_err(read)?;
        ServerKey::from_hex(&text).map_err(|found| KeyFileError::Malformed { path: shown, found })
    }

    /// Parse 64 hex digits; the error describes the text without repeating it (it may be a
    /// key).
    fn from_hex(text: &str) -> Result<ServerKey, String> {
        let digits = text.trim();
        if digits.len() != KEY_LEN * 2 {
            return Err(format!("{} characters", digits.chars().count()));
        }
        let mut key = [0; KEY_LEN];
        hex::decode_to_slice(digits, &mut key)
            .map_err(|_| "a character that is not a hex digit".to_string())?;
        Ok(ServerKey(key))
    }

    /// The AES-256-GCM key of `cache_salt`'s records.
    fn salt_key(&self, cache_salt: &str) -> LessSafeKey {
        self.derived_key(HKDF_INFO, cache_salt)
    }

    /// The AES-256-GCM key for `info` (a kind's label) and `cache_salt`.
    fn derived_key(&self, label: &[u8], cache_salt: &str) -> LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.0);
        let info = [label, cache_salt.as_bytes()];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .expect("32 bytes is within HKDF-SHA256's output limit");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    /// A non-secret name of the key for logs (16 hex digits: HKDF of the key for a fixed
    /// label), so operators can tell two nodes' keys apart without seeing either.
    pub fn fingerprint(&self) -> String {
        struct Len8;
        impl hkdf::KeyType for Len8 {
            fn len(&self) -> usize {
                8
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.0);
        let mut id = [0; 8];
        prk.expand(&[b"cwm key fingerprint".as_slice()], Len8)
            .and_then(|okm| okm.fill(&mut id))
            .expect("8 bytes is within HKDF-SHA256's output limit");
        hex::encode(id)
    }
}

/// Why a record's payload was not opened: for the caller, a miss.
#[derive(Debug, Error)]
pub enum SealError {
    #[error(
        "record of cache_salt {salt:?} is sealed (encryption at rest) and this server has no \
         --encryption-key-file: treated as a miss"
    )]
    NoKey { salt: String },
    #[error(
        "sealed record of cache_salt {salt:?} does not open with this server's key (sealed \
         under another key, moved from another key or salt, or altered): treated as a miss"
    )]
    WrongKey { salt: String },
    #[error("sealed payload of {len} bytes is shorter than its nonce and tag ({OVERHEAD})")]
    Short { len: usize },
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[derive(Debug, Default)]
struct SealCounters {
    sealed: AtomicU64,
    opened: AtomicU64,
    no_key: AtomicU64,
    wrong_key: AtomicU64,
    manifests_sealed: AtomicU64,
    manifests_unopened: AtomicU64,
    journal_sealed: AtomicU64,
    journal_unopened: AtomicU64,
}

impl SealCounters {
    /// (sealed, did not open) of `kind`.
    fn of(&self, kind: BlobKind) -> (&AtomicU64, &AtomicU64) {
        match kind {
            BlobKind::WindowManifest => (&self.manifests_sealed, &self.manifests_unopened),
            BlobKind::SessionJournal => (&self.journal_sealed, &self.journal_unopened),
        }
    }
}

/// Encryption at rest, as `/status` and `/metrics` show it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SealStats {
    /// A key file is configured: records written to L2, L3 and exports are sealed.
    pub enabled: bool,
    pub sealed_records: u64,
    pub opened_records: u64,
    /// Sealed records met without a key: misses.
    pub unopened_no_key: u64,
    /// Sealed records that did not open with this server's key: misses.
    pub unopened_wrong_key: u64,
    /// Window manifests sealed (written locally, to L3, into exports).
    #[serde(default)]
    pub sealed_manifests: u64,
    /// Sealed window manifests that did not open (no key or another key): those windows are
    /// listed as unreadable (local) or skipped (L3), never thawed.
    #[serde(default)]
    pub unopened_manifests: u64,
    /// Session journal entries sealed.
    #[serde(default)]
    pub sealed_journal_entries: u64,
    /// Sealed session journal entries that did not open at start: skipped.
    #[serde(default)]
    pub unopened_journal_entries: u64,
}

/// Seals records as they are encoded and opens them as they are decoded; without a key it
/// encodes plain records and refuses sealed ones. Cheap to clone (shared key and counters).
#[derive(Clone, Default)]
pub struct Sealer {
    key: Option<Arc<ServerKey>>,
    counters: Arc<SealCounters>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("sealing", &self.key.is_some())
            .finish()
    }
}

impl Sealer {
    /// Seal with `key`, or (None) write plain records.
    pub fn new(key: Option<ServerKey>) -> Sealer {
        Sealer {
            key: key.map(Arc::new),
            counters: Arc::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.key.is_some()
    }

    /// The key's fingerprint, when sealing.
    pub fn fingerprint(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.fingerprint())
    }

    /// Compress `raw` and encode it as one record under `key`: sealed with a fresh random
    /// nonce when a server key is set, else exactly `record::encode`'s plain record.
    pub fn encode(
        &self,
        key: &ObjectKey,
        raw: &[u8],
        itemsize: u8,
        policy: CompressionPolicy,
    ) -> Vec<u8> {
        let Some(server_key) = &self.key else {
            return record::encode(key, raw, itemsize, policy);
        };
        let mut nonce = [0; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the OS random number generator fails only on a broken system");
        self.counters.sealed.fetch_add(1, Relaxed);
        seal(server_key, key, raw, itemsize, policy, nonce)
    }

    /// `encode` with a given nonce: for fixtures and tests that compare bytes. A nonce must
    /// never be used twice under one key.
    #[doc(hidden)]
    pub fn encode_with_nonce(
        &self,
        key: &ObjectKey,
        raw: &[u8],
        itemsize: u8,
        policy: CompressionPolicy,
        nonce: [u8; NONCE_LEN],
    ) -> Option<Vec<u8>> {
        let server_key = self.key.as_ref()?;
        Some(seal(server_key, key, raw, itemsize, policy, nonce))
    }

    /// Decode a verified record into `out` (exactly its raw length), opening it first when
    /// sealed. On an error `out` holds no plaintext of the record and the failure is counted.
    pub fn decode_into(&self, record: &Record<'_>, out: &mut [u8]) -> Result<(), SealError> {
        let h = &record.header;
        if !h.sealed {
            return Ok(record.decode_into(out)?);
        }
        let result = self.open_into(h, record.payload, out);
        match &result {
            Ok(()) => &self.counters.opened,
            Err(SealError::NoKey { .. }) => &self.counters.no_key,
            Err(_) => &self.counters.wrong_key,
        }
        .fetch_add(1, Relaxed);
        if result.is_err() {
            out.fill(0);
        }
        result
    }

    fn open_into(&self, h: &RecordHeader, sealed: &[u8], out: &mut [u8]) -> Result<(), SealError> {
        let salt = || h.key.cache_salt.to_string();
        let Some(server_key) = &self.key else {
            return Err(SealError::NoKey { salt: salt() });
        };
        if sealed.len() < OVERHEAD {
            return Err(SealError::Short { len: sealed.len() });
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("NONCE_LEN bytes");
        let tag = Tag::try_from(tag).expect("TAG_LEN bytes");
        let aad = Aad::from(associated_data(&h.key, h.codec, h.itemsize, h.raw_len));
        let aead = server_key.salt_key(&h.key.cache_salt);
        let wrong_key = |_| SealError::WrongKey { salt: salt() };
        if h.codec == Codec::Raw {
            // Opened in place in `out`: no copy of the plaintext elsewhere.
            if ciphertext.len() != out.len() {
                return Err(CodecError::RawLength {
                    stored: ciphertext.len(),
                    expected: out.len(),
                }
                .into());
            }
            out.copy_from_slice(ciphertext);
            aead.open_in_place_separate_tag(nonce, aad, tag, out, 0..)
                .map_err(wrong_key)?;
            return Ok(());
        }
        let mut payload = ciphertext.to_vec();
        aead.open_in_place_separate_tag(nonce, aad, tag, &mut payload, 0..)
            .map_err(wrong_key)?;
        Ok(codec::decompress(h.codec, &payload, out)?)
    }

    /// Seal `plain` as a blob of `kind` for `cache_salt`: nonce (12 random bytes) ++
    /// ciphertext ++ tag, `aad` (after the kind's context) bound to it. None without a key:
    /// the caller writes its plain format.
    pub fn seal_blob(
        &self,
        kind: BlobKind,
        cache_salt: &str,
        aad: &[u8],
        plain: &[u8],
    ) -> Option<Vec<u8>> {
        let server_key = self.key.as_ref()?;
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.resize(NONCE_LEN, 0);
        SystemRandom::new()
            .fill(&mut out)
            .expect("the OS random number generator fails only on a broken system");
        let nonce = Nonce::try_assume_unique_for_key(&out).expect("NONCE_LEN bytes");
        out.extend_from_slice(plain);
        let tag = server_key
            .derived_key(kind.info(), cache_salt)
            .seal_in_place_separate_tag(
                nonce,
                Aad::from(blob_aad(kind, aad)),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-GCM seals any blob below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        self.counters.of(kind).0.fetch_add(1, Relaxed);
        Some(out)
    }

    /// Open a blob `seal_blob` made for the same kind, salt and `aad`. A failure is counted
    /// for `kind` and gives no byte of the contents.
    pub fn open_blob(
        &self,
        kind: BlobKind,
        cache_salt: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, BlobError> {
        let result = self.open_blob_uncounted(kind, cache_salt, aad, sealed);
        if result.is_err() {
            self.counters.of(kind).1.fetch_add(1, Relaxed);
        }
        result
    }

    fn open_blob_uncounted(
        &self,
        kind: BlobKind,
        cache_salt: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, BlobError> {
        let (what, salt) = (kind.what(), cache_salt.to_string());
        let Some(server_key) = &self.key else {
            return Err(BlobError::NoKey { what, salt });
        };
        let wrong_key = || BlobError::WrongKey { what, salt };
        if sealed.len() < OVERHEAD {
            return Err(wrong_key());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("NONCE_LEN bytes");
        let mut plain = rest.to_vec();
        let opened = server_key
            .derived_key(kind.info(), cache_salt)
            .open_in_place(nonce, Aad::from(blob_aad(kind, aad)), &mut plain)
            .map_err(|_| wrong_key())?
            .len();
        plain.truncate(opened);
        Ok(plain)
    }

    pub fn stats(&self) -> SealStats {
        let c = &self.counters;
        SealStats {
            enabled: self.key.is_some(),
            sealed_records: c.sealed.load(Relaxed),
            opened_records: c.opened.load(Relaxed),
            unopened_no_key: c.no_key.load(Relaxed),
            unopened_wrong_key: c.wrong_key.load(Relaxed),
            sealed_manifests: c.manifests_sealed.load(Relaxed),
            unopened_manifests: c.manifests_unopened.load(Relaxed),
            sealed_journal_entries: c.journal_sealed.load(Relaxed),
            unopened_journal_entries: c.journal_unopened.load(Relaxed),
        }
    }
}

/// A blob's associated data: its kind's context, then what the owning format binds.
fn blob_aad(kind: BlobKind, aad: &[u8]) -> Vec<u8> {
    [kind.aad_context(), aad].concat()
}

/// What a sealed record's tag also covers: everything the header says about the payload.
fn associated_data(key: &ObjectKey, codec: Codec, itemsize: u8, raw_len: u64) -> Vec<u8> {
    let key_bytes = record::encode_key_bytes(key);
    let mut aad = Vec::with_capacity(AAD_CONTEXT.len() + 10 + key_bytes.len());
    aad.extend_from_slice(AAD_CONTEXT);
    aad.push(codec.code());
    aad.push(itemsize);
    aad.put_u64(raw_len);
    aad.extend_from_slice(&key_bytes);
    aad
}

/// One sealed record: header (version 2, `FLAG_SEALED`) ++ nonce ++ ciphertext ++ tag, built
/// in one buffer (the payload is copied once and encrypted in place).
fn seal(
    server_key: &ServerKey,
    key: &ObjectKey,
    raw: &[u8],
    itemsize: u8,
    policy: CompressionPolicy,
    nonce: [u8; NONCE_LEN],
) -> Vec<u8> {
    let (codec, payload) = codec::compress(raw, itemsize as usize, policy);
    let header_len = record::FIXED + record::encode_key_bytes(key).len() + 4;
    let mut out = Vec::with_capacity(header_len + OVERHEAD + payload.len());
    out.resize(header_len, 0);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&payload);
    drop(payload);
    let aad = Aad::from(associated_data(key, codec, itemsize, raw.len() as u64));
    let tag = server_key
        .salt_key(&key.cache_salt)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            aad,
            &mut out[header_len + NONCE_LEN..],
        )
        .expect("AES-GCM seals any payload below 64 GiB (records stay far below)");
    out.extend_from_slice(tag.as_ref());
    let header = record::encode_header_flagged(
        key,
        codec,
        itemsize,
        raw.len() as u64,
        &out[header_len..],
        FLAG_SEALED,
    );
    out[..header_len].copy_from_slice(&header);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::record::tests::key;
    use connector_protocol::ChunkHash;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(Some(ServerKey::from_bytes([byte; KEY_LEN])))
    }

    /// bf16-like bytes with a pattern that shows up if it is ever stored in the clear.
    fn object() -> Vec<u8> {
        (0..8192u32).flat_map(|i| [(i % 251) as u8, 0x3f]).collect()
    }

    fn decode(s: &Sealer, rec: &[u8]) -> Result<Vec<u8>, SealError> {
        let r = Record::parse(rec, 0).expect("checksums hold without the key");
        let mut out = vec![0xAA; r.header.raw_len as usize];
        s.decode_into(&r, &mut out).map(|()| out)
    }

    #[test]
    fn sealed_records_round_trip_for_every_codec() {
        let s = sealer(1);
        for policy in [CompressionPolicy::DISABLED, CompressionPolicy::default()] {
            let raw = object();
            let rec = s.encode(&key("alice"), &raw, 2, policy);
            let h = record::decode_header(&rec, 0).unwrap();
            assert!(h.sealed);
            assert_eq!(&rec[4..6], &2u16.to_le_bytes());
            assert_eq!(decode(&s, &rec).unwrap(), raw);
        }
        let st = s.stats();
        assert_eq!((st.sealed_records, st.opened_records), (2, 2));
    }

    #[test]
    fn the_payload_holds_no_plaintext_and_nonces_differ() {
        let s = sealer(1);
        let raw = object();
        let a = s.encode(&key("alice"), &raw, 2, CompressionPolicy::DISABLED);
        let b = s.encode(&key("alice"), &raw, 2, CompressionPolicy::DISABLED);
        assert_ne!(a, b, "a fresh nonce per record");
        let window = &raw[1000..1032];
        assert!(!a.windows(32).any(|w| w == window));
        // Without a key the same object is stored in the clear: the search above can fail.
        let plain = Sealer::default().encode(&key("alice"), &raw, 2, CompressionPolicy::DISABLED);
        assert!(plain.windows(32).any(|w| w == window));
    }

    #[test]
    fn another_key_no_key_or_another_salt_is_a_counted_miss() {
        let raw = object();
        let rec = sealer(1).encode(&key("alice"), &raw, 2, CompressionPolicy::DISABLED);
        let other = sealer(2);
        assert!(matches!(
            decode(&other, &rec),
            Err(SealError::WrongKey { .. })
        ));
        let none = Sealer::default();
        assert!(matches!(decode(&none, &rec), Err(SealError::NoKey { .. })));
        assert_eq!(
            (
                other.stats().unopened_wrong_key,
                none.stats().unopened_no_key
            ),
            (1, 1)
        );
        // The same payload under bob's key section (header checksums recomputed).
        let s = sealer(1);
        let moved = rekey(&rec, &key("bob"));
        assert!(matches!(
            decode(&s, &moved),
            Err(SealError::WrongKey { .. })
        ));
        // A rewritten chunk hash, same salt: the associated data no longer matches.
        let mut k = key("alice");
        k.chunk_hash = ChunkHash([1; 32]);
        assert!(matches!(
            decode(&s, &rekey(&rec, &k)),
            Err(SealError::WrongKey { .. })
        ));
        assert_eq!(decode(&s, &rec).unwrap(), raw);
    }

    /// The sealed payload of `rec` under another key section, with valid checksums.
    fn rekey(rec: &[u8], to: &ObjectKey) -> Vec<u8> {
        let h = record::decode_header(rec, 0).unwrap();
        let payload = &rec[h.header_len as usize..];
        let mut out =
            record::encode_header_flagged(to, h.codec, h.itemsize, h.raw_len, payload, FLAG_SEALED);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_failed_open_leaves_no_plaintext_in_the_output() {
        let raw = object();
        let rec = sealer(1).encode(&key("alice"), &raw, 2, CompressionPolicy::DISABLED);
        let r = Record::parse(&rec, 0).unwrap();
        let mut out = vec![0xAA; raw.len()];
        assert!(sealer(2).decode_into(&r, &mut out).is_err());
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn plain_records_stay_readable_with_a_key_and_plain_decoding_refuses_sealed_ones() {
        let raw = object();
        let plain = record::encode(&key("a"), &raw, 2, CompressionPolicy::default());
        let s = sealer(1);
        assert_eq!(decode(&s, &plain).unwrap(), raw);
        let sealed = s.encode(&key("a"), &raw, 2, CompressionPolicy::default());
        let r = Record::parse(&sealed, 0).unwrap();
        let mut out = vec![0; raw.len()];
        assert!(matches!(r.decode_into(&mut out), Err(CodecError::Sealed)));
    }

    #[test]
    fn blobs_open_only_with_their_kind_salt_context_and_key() {
        let s = sealer(1);
        let plain = b"token ids 1 2 3".to_vec();
        let m = BlobKind::WindowManifest;
        let a = s.seal_blob(m, "alice", b"win-a", &plain).unwrap();
        let b = s.seal_blob(m, "alice", b"win-a", &plain).unwrap();
        assert_ne!(a, b, "a fresh nonce per seal");
        assert!(!a.windows(plain.len()).any(|w| w == plain));
        assert_eq!(s.open_blob(m, "alice", b"win-a", &a).unwrap(), plain);
        let wrong = |r: Result<Vec<u8>, BlobError>| matches!(r, Err(BlobError::WrongKey { .. }));
        assert!(wrong(s.open_blob(m, "bob", b"win-a", &a)));
        assert!(wrong(s.open_blob(m, "alice", b"win-b", &a)));
        assert!(wrong(s.open_blob(
            BlobKind::SessionJournal,
            "alice",
            b"win-a",
            &a
        )));
        assert!(wrong(sealer(2).open_blob(m, "alice", b"win-a", &a)));
        assert!(wrong(s.open_blob(m, "alice", b"win-a", &a[..20])));
        assert!(matches!(
            Sealer::default().open_blob(m, "alice", b"win-a", &a),
            Err(BlobError::NoKey { .. })
        ));
        assert!(Sealer::default()
            .seal_blob(m, "alice", b"", &plain)
            .is_none());
        // A manifest key is not the record key of the same salt.
        let k = ServerKey::from_bytes([1; KEY_LEN]);
        let n = [0; NONCE_LEN];
        let seal_with = |key: LessSafeKey| {
            let mut buf = plain.clone();
            key.seal_in_place_append_tag(Nonce::assume_unique_for_key(n), Aad::empty(), &mut buf)
                .unwrap();
            buf
        };
        assert_ne!(
            seal_with(k.salt_key("alice")),
            seal_with(k.derived_key(m.info(), "alice"))
        );
        let st = s.stats();
        assert_eq!((st.sealed_manifests, st.unopened_manifests), (2, 3));
        assert_eq!(
            (st.sealed_journal_entries, st.unopened_journal_entries),
            (0, 1)
        );
    }

    #[test]
    fn key_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let hex64 = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        write(&format!("{hex64}\n"), 0o600);
        let k = ServerKey::load(&path).unwrap();
        assert_eq!(k.0[1], 0x11);
        assert_eq!(k.fingerprint().len(), 16);
        write(hex64, 0o640);
        let e = ServerKey::load(&path).unwrap_err();
        assert!(
            matches!(e, KeyFileError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        write(hex64, 0o604);
        assert!(matches!(
            ServerKey::load(&path),
            Err(KeyFileError::Permissions { .. })
        ));
        write(&hex64[..63], 0o400);
        let e = ServerKey::load(&path).unwrap_err();
        assert!(e.to_string().contains("63 characters"), "{e}");
        write(&format!("{}g", &hex64[..63]), 0o600);
        let e = ServerKey::load(&path).unwrap_err();
        assert!(matches!(e, KeyFileError::Malformed { .. }), "{e}");
        assert!(
            !e.to_string().contains(&hex64[..63]),
            "the key is never shown"
        );
        assert!(matches!(
            ServerKey::load(&dir.path().join("absent")),
            Err(KeyFileError::Read { .. })
        ));
        assert!(matches!(
            ServerKey::load(dir.path()),
            Err(KeyFileError::NotAFile { .. }) | Err(KeyFileError::Permissions { .. })
        ));
    }
}
