//! Shuffle-BN on one device: the key batch goes through the key encoder in a random order and
//! comes back in the original one, so that with split BatchNorm (the official demo's
//! `--bn-splits`) a query and its positive key never share BatchNorm statistics.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;

use crate::Result;

/// A random permutation of a batch and its inverse.
#[derive(Debug, Clone)]
pub struct BatchShuffle {
    shuffle: Tensor, // N, u32: row i of the shuffled batch is row shuffle[i] of the input
    unshuffle: Tensor, // N, u32: the inverse permutation (argsort of `shuffle`)
}

impl BatchShuffle {
    /// A uniformly random permutation of `n` rows.
    pub fn new(n: usize, rng: &mut impl Rng, device: &Device) -> Result<Self> {
        let mut perm: Vec<u32> = (0..n as u32).collect();
        perm.shuffle(rng);
        Self::from_permutation(&perm, device)
    }

    /// A given permutation (each of 0..n exactly once).
    pub fn from_permutation(perm: &[u32], device: &Device) -> Result<Self> {
        let n = perm.len();
        let mut inverse = vec![u32::MAX; n];
        for (i, &p) in perm.iter().enumerate() {
            let slot = inverse.get_mut(p as usize).filter(|s| **s == u32::MAX);
            match slot {
                Some(s) => *s = i as u32,
                None => {
                    return Err(crate::Error::config(
                        "permutation",
                        format!("{perm:?} is not a permutation of 0..{n}"),
                    ))
                }
            }
        }
        Ok(Self {
            shuffle: Tensor::new(perm, device)?,
            unshuffle: Tensor::new(inverse.as_slice(), device)?,
        })
    }

    /// Rows of `x` (N x ...) in shuffled order.
    pub fn shuffle(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.index_select(&self.shuffle, 0)?)
    }

    /// Undoes [`shuffle`](Self::shuffle): `unshuffle(shuffle(x)) == x`.
    pub fn unshuffle(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.index_select(&self.unshuffle, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn unshuffle_inverts_shuffle() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((8, 3))
            .unwrap();
        let s = BatchShuffle::new(8, &mut StdRng::seed_from_u64(3), &dev).unwrap();
        let y = s.shuffle(&x).unwrap();
        assert_ne!(y.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        assert_eq!(
            s.unshuffle(&y).unwrap().to_vec2::<f32>().unwrap(),
            x.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn rejects_a_non_permutation() {
        assert!(BatchShuffle::from_permutation(&[0, 0, 1], &Device::Cpu).is_err());
        assert!(BatchShuffle::from_permutation(&[0, 3, 1], &Device::Cpu).is_err());
    }
}
