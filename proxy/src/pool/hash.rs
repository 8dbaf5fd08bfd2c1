//! The one hash replicas must agree on.

/// A stable 64-bit hash: the same on every replica and every release, so
/// replicas agree on consistent-hash and split decisions.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}
