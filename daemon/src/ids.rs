//! Random identifiers and entropy from the host's CSPRNG.

/// A fresh sandbox id such as `sb-3f9c2a7d5e1b0c44`.
pub fn new_sandbox_id() -> String {
    let bytes = random_bytes::<8>();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sb-{hex}")
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS RNG only fails when the kernel has no entropy source at all,
    // which leaves nothing safe to do but stop.
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_well_formed() {
        let a = super::new_sandbox_id();
        let b = super::new_sandbox_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 19);
        assert!(a[3..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
