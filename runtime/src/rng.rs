//! A small, fast, seedable random source (SplitMix64) for sampling, initialisation and tests.
//! Not cryptographic; reproducible from the seed on every platform.

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The generator `n` draws of [`Rng::next_u64`] ahead of this one (SplitMix64's state is a
    /// counter, so jumping is one multiply): lets threads fill slices of one stream in parallel.
    pub fn jumped(&self, n: u64) -> Rng {
        Rng(self.0.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform(); // (0, 1]: ln is finite
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * self.uniform()).cos()
    }
    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod jump_tests {
    use super::Rng;

    #[test]
    fn jumped_equals_drawing_that_many() {
        let mut seq = Rng::new(42);
        for _ in 0..1000 {
            seq.next_u64();
        }
        let mut jumped = Rng::new(42).jumped(1000);
        for _ in 0..10 {
            assert_eq!(seq.next_u64(), jumped.next_u64());
        }
    }
}
