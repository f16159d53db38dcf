//! Seeded synthetic data for the tests and benchmarks: one small generator and the 16-bit
//! float encodings, so "KV-like" bytes mean the same wherever they are made. A leaf module
//! (it uses nothing of cwm), so `store`'s tests and `bench` can both use it.

/// xorshift64: seeded, dependency-free. The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let r = (-2.0 * (1.0 - self.uniform()).ln()).sqrt();
        (r * (std::f64::consts::TAU * self.uniform()).cos()) as f32
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// f32 → bf16, round to nearest even (finite inputs).
pub fn bf16(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `n` bytes of little-endian bf16 drawn from N(0, 1).
pub fn bf16_normal(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v: Vec<u8> = (0..n.div_ceil(2))
        .flat_map(|_| bf16(rng.normal()).to_le_bytes())
        .collect();
    v.truncate(n);
    v
}
