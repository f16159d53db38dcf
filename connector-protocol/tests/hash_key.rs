//! TokenHasher vectors (spec §4.5, verified against the real TokenHasher), NONE_HASH, kv_rank,
//! ObjectKey canonical strings (§4.3) and the salt/model rules.

use std::sync::Arc;

use connector_protocol::*;

fn hexes(hashes: &[ChunkHash]) -> Vec<String> {
    hashes.iter().map(ChunkHash::to_hex).collect()
}

#[test]
fn none_hash_matches_its_definition() {
    assert_eq!(TokenHasher::none_hash(), NONE_HASH);
    assert_eq!(
        NONE_HASH.to_hex(),
        "7e3eff9ef7613a50340eb12677ee03b83ac759fcba9bb32705f07248d56d473b"
    );
}

#[test]
fn spec_vectors() {
    let h = TokenHasher::new(256);
    let range = |n: u32| (0..n).collect::<Vec<u32>>();
    assert_eq!(
        hexes(&h.chunk_hashes(&range(512), 0, usize::MAX)),
        [
            "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4",
            "e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0"
        ]
    );
    // 600 tokens: the 88-token tail is dropped.
    assert_eq!(
        hexes(&h.chunk_hashes(&[1; 600], 0, usize::MAX)),
        [
            "1aba48f88227a4108ac116a95210aa28dbb81168ba3917338c4f1ddcf01c0852",
            "ccd5592fb368cdf5c6f1655362981ac98f3e5ae4e2c2ce18ff58aa254a534294"
        ]
    );
    assert_eq!(
        hexes(&h.chunk_hashes(&[0; 256], 0, usize::MAX)),
        ["03edbe7e49c9198da23fa92679fd592f12679bb4ccc65b5c91f31dda79bf1fa9"]
    );
    assert!(h.chunk_hashes(&range(100), 0, usize::MAX).is_empty());
    // start=256, end=512 of 768 tokens: only the second chunk, chained from token 0.
    assert_eq!(
        hexes(&h.chunk_hashes(&range(768), 256, 512)),
        ["e5ffee45c2b9db326814c9692dc594369887ba3b0df5761817820b60f864c8e0"]
    );
    let h16 = TokenHasher::new(16);
    assert_eq!(
        hexes(&h16.chunk_hashes(&range(32), 0, usize::MAX)),
        [
            "32748aa00c5090e4f0e1f149078a07381f4f618d898c1cbac17e36521c3de48f",
            "b41527751e5bac5a664450d89585d03c64c3985924969dfb1808b151dd214695"
        ]
    );
}

#[test]
fn chunk_hashes_respect_start_and_end() {
    let h = TokenHasher::new(256);
    let tokens: Vec<u32> = (0..1024).collect();
    let all = h.chunk_hashes(&tokens, 0, usize::MAX);
    assert_eq!(all.len(), 4);
    // end beyond the tokens is clamped; an unaligned end drops the partial chunk.
    assert_eq!(h.chunk_hashes(&tokens, 0, 5000), all);
    assert_eq!(h.chunk_hashes(&tokens, 0, 767), all[..2]);
    assert_eq!(h.chunk_hashes(&tokens, 0, 768), all[..3]);
    // start selects chunks whose first token index is >= start.
    assert_eq!(h.chunk_hashes(&tokens, 256, 1024), all[1..]);
    assert_eq!(h.chunk_hashes(&tokens, 257, 1024), all[2..]);
    assert!(h.chunk_hashes(&tokens, 1024, 1024).is_empty());
    assert!(h.chunk_hashes(&tokens, 0, 0).is_empty());
    // The chain is rolling: chunk i depends on every earlier token.
    let mut other = tokens.clone();
    other[0] = 99;
    let changed = h.chunk_hashes(&other, 0, usize::MAX);
    assert!(all.iter().zip(&changed).all(|(a, b)| a != b));
    // hash_chunk is the chain step.
    assert_eq!(TokenHasher::hash_chunk(&NONE_HASH, &tokens[..256]), all[0]);
    assert_eq!(TokenHasher::hash_chunk(&all[0], &tokens[256..512]), all[1]);
}

#[test]
fn chunk_hash_hex() {
    let h = NONE_HASH.to_hex();
    assert_eq!(ChunkHash::from_hex(&h), Some(NONE_HASH));
    assert_eq!(ChunkHash::from_hex(&h.to_uppercase()), Some(NONE_HASH));
    assert_eq!(ChunkHash::from_hex(&h[..62]), None);
    assert_eq!(ChunkHash::from_hex(&format!("{h}00")), None);
    assert_eq!(ChunkHash::from_hex(&h.replace('7', "g")), None);
    assert_eq!(format!("{NONE_HASH}"), h);
    assert_eq!(format!("{NONE_HASH:?}"), "ChunkHash(7e3eff9ef7613a50)");
}

#[test]
fn kv_rank_examples() {
    assert_eq!(kv_rank(1, 0), 0x0100_0100);
    assert_eq!(kv_rank(2, 1), 0x0201_0201);
    assert_eq!(kv_rank(4, 3), 0x0403_0403);
    assert_eq!(kv_rank(255, 254), 0xfffe_fffe);
    assert_eq!(checked_kv_rank(8, 7), Ok(0x0807_0807));
    assert_eq!(
        checked_kv_rank(0, 0),
        Err(KeyError::Rank {
            world_size: 0,
            worker_id: 0
        })
    );
    assert_eq!(
        checked_kv_rank(2, 2),
        Err(KeyError::Rank {
            world_size: 2,
            worker_id: 2
        })
    );
    assert_eq!(
        checked_kv_rank(256, 0),
        Err(KeyError::Rank {
            world_size: 256,
            worker_id: 0
        })
    );
}

fn spec_key(salt: &str) -> ObjectKey {
    ObjectKey {
        model: Arc::from("meta-llama/Llama-3.1-8B"),
        kv_rank: kv_rank(1, 0),
        object_group: 0,
        chunk_hash: ChunkHash::from_hex(
            "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4",
        )
        .unwrap(),
        cache_salt: Arc::from(salt),
    }
}

#[test]
fn object_key_canonical_string_of_the_spec() {
    let key = spec_key("");
    let s = "meta-llama/Llama-3.1-8B@01000100@0@084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4";
    assert_eq!(key.to_canonical_string(), s);
    assert_eq!(format!("{key:?}"), s);
    assert_eq!(ObjectKey::parse_canonical(s), Some(key));

    let salted = ObjectKey {
        object_group: 0x1f,
        ..spec_key("tenant-a")
    };
    let s = salted.to_canonical_string();
    assert!(s.ends_with(
        "@1f@084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4@tenant-a"
    ));
    assert_eq!(ObjectKey::parse_canonical(&s), Some(salted));
}

#[test]
fn object_key_parse_rejects_non_canonical_forms() {
    let good = spec_key("").to_canonical_string();
    let hash = "084547b6c40ed5b05ba8cd0305db5bf74d5617673948d9ed193ab7d6cbc484d4";
    for bad in [
        String::new(),
        "m".to_string(),
        format!("@01000100@0@{hash}"),                   // empty model
        format!("m@1000100@0@{hash}"),                   // 7-digit rank
        format!("m@0100010G@0@{hash}"),                  // not hex
        format!("m@01000100@00@{hash}"),                 // leading zero in group
        format!("m@01000100@@{hash}"),                   // empty group
        format!("m@01000100@0@{}", hash.to_uppercase()), // uppercase hash
        format!("m@01000100@0@{}", &hash[..63]),         // short hash
        format!("m@01000100@0@{hash}@"),                 // empty salt part
        format!("m@01000100@0@{hash}@a@b"),              // too many parts
        format!("m@01000100@0@{hash}@a/b"),              // bad salt char
        format!("m@01000100@0@{hash}@{}", "s".repeat(129)), // salt too long
        format!("m@01000100@+1@{hash}"),                 // sign
        good.replace("01000100", "0100010+"),
    ] {
        assert_eq!(ObjectKey::parse_canonical(&bad), None, "{bad:?}");
    }
}

#[test]
fn object_keys_separate_salts_ranks_and_groups() {
    let a = spec_key("");
    let b = spec_key("x");
    let c = ObjectKey {
        kv_rank: kv_rank(2, 1),
        ..spec_key("")
    };
    let d = ObjectKey {
        object_group: 1,
        ..spec_key("")
    };
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
    assert_ne!(a.to_canonical_string(), b.to_canonical_string());
}

#[test]
fn salt_validation() {
    assert_eq!(validate_cache_salt(""), Ok(()));
    assert_eq!(validate_cache_salt("tenant-a_1.2"), Ok(()));
    assert_eq!(validate_cache_salt(&"x".repeat(128)), Ok(()));
    // 128 characters, more than 128 bytes: characters count, as in Python.
    assert_eq!(validate_cache_salt(&"é".repeat(128)), Ok(()));
    assert_eq!(
        validate_cache_salt(&"x".repeat(129)),
        Err(KeyError::SaltTooLong("x".repeat(129)))
    );
    for c in ['@', '/', '\\', '\0'] {
        let salt = format!("a{c}b");
        assert_eq!(
            validate_cache_salt(&salt),
            Err(KeyError::SaltChar(salt.clone(), c))
        );
    }
}

#[test]
fn model_name_validation() {
    assert_eq!(validate_model_name("meta-llama/Llama-3.1-8B"), Ok(()));
    assert_eq!(
        validate_model_name("m##lmcache-dcp-layout-v1-d2-interleave1"),
        Ok(())
    );
    for bad in ["", "a@b", "a\0b"] {
        assert_eq!(
            validate_model_name(bad),
            Err(KeyError::ModelName(bad.to_string()))
        );
    }
}
