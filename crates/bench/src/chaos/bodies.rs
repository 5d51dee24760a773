//! The bodies of the campaign, each one rebuilt from a short name, so that the origin can
//! serve a download the client asked for by name and every body can be unique.

use virus_scanner_test_support::{EICAR, clean_bytes, hash_signature_sample};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bytes that match no signature.
    Clean,
    /// Clean bytes with the EICAR test file in the first half (a body signature).
    Eicar,
    /// The 64 KiB file of the shipped hash signature (the whole file is the signature).
    HashSample,
}

impl Kind {
    pub fn infected(self) -> bool {
        self != Kind::Clean
    }

    fn letter(self) -> char {
        match self {
            Kind::Clean => 'c',
            Kind::Eicar => 'e',
            Kind::HashSample => 'h',
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodySpec {
    pub kind: Kind,
    pub size: usize,
    pub seed: u64,
}

impl BodySpec {
    pub fn new(kind: Kind, size: usize, seed: u64) -> BodySpec {
        let size = match kind {
            Kind::HashSample => 65536,
            _ => size.max(EICAR.len() * 2 + 8),
        };
        BodySpec { kind, size, seed }
    }

    /// `c-1024-7`: what the origin is asked for.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.kind.letter(), self.size, self.seed)
    }

    pub fn parse(name: &str) -> Option<BodySpec> {
        let mut parts = name.split('-');
        let kind = match parts.next()? {
            "c" => Kind::Clean,
            "e" => Kind::Eicar,
            "h" => Kind::HashSample,
            _ => return None,
        };
        let size: usize = parts.next()?.parse().ok()?;
        let seed: u64 = parts.next()?.parse().ok()?;
        // The origin builds what it is asked for: keep that bounded.
        (size <= 64 << 20).then(|| BodySpec::new(kind, size, seed))
    }

    pub fn bytes(&self) -> Vec<u8> {
        match self.kind {
            Kind::HashSample => hash_signature_sample(),
            Kind::Clean => clean_bytes(self.size, self.seed),
            Kind::Eicar => {
                let mut b = clean_bytes(self.size, self.seed);
                // In the first half, so that a client that aborts half-way has sent it.
                let room = self.size / 2 - EICAR.len();
                let at = (self.seed as usize).wrapping_mul(7919) % room.max(1);
                b[at..at + EICAR.len()].copy_from_slice(EICAR);
                b
            }
        }
    }
}

/// Finds EICAR in a body that arrives in pieces.
#[derive(Default)]
pub struct MarkerScan {
    carry: Vec<u8>,
    pub found: bool,
}

impl MarkerScan {
    pub fn feed(&mut self, piece: &[u8]) {
        if self.found {
            return;
        }
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(piece);
        self.found = memchr::memmem::find(&window, EICAR).is_some();
        let keep = window.len().min(EICAR.len() - 1);
        self.carry = window[window.len() - keep..].to_vec();
    }
}

pub fn contains_eicar(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, EICAR).is_some()
}

/// Small deterministic generator for the load and fault choices (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index into `weights`, chosen in proportion to them.
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u32 = weights.iter().sum();
        let mut pick = self.below(total as u64) as u32;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                return i;
            }
            pick -= w;
        }
        weights.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_rebuilt_from_its_name() {
        for kind in [Kind::Clean, Kind::Eicar, Kind::HashSample] {
            let spec = BodySpec::new(kind, 3000, 42);
            assert_eq!(BodySpec::parse(&spec.name()), Some(spec));
            let bytes = spec.bytes();
            assert_eq!(bytes.len(), spec.size);
            assert_eq!(contains_eicar(&bytes), kind == Kind::Eicar);
        }
        assert_eq!(BodySpec::parse("x-1-1"), None);
        assert_eq!(BodySpec::parse("c-999999999999-1"), None);
    }

    #[test]
    fn eicar_split_across_pieces_is_found() {
        let body = BodySpec::new(Kind::Eicar, 4096, 9).bytes();
        for cut in [1, 7, 33, 100, 1000] {
            let mut scan = MarkerScan::default();
            for piece in body.chunks(cut) {
                scan.feed(piece);
            }
            assert!(scan.found, "pieces of {cut}");
        }
        let mut scan = MarkerScan::default();
        scan.feed(&BodySpec::new(Kind::Clean, 4096, 9).bytes());
        assert!(!scan.found);
    }
}
