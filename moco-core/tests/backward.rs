//! The vendored candle-core's backward pass (vendor/README.md): the first gradient of a tensor
//! is stored as computed instead of being added to zeros. These check the cases that change
//! touches against gradients worked out by hand.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn a_tensor_used_twice_gets_the_sum_of_its_gradients() {
    let x = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
    // d/dx sum(x*x + x + x) = 2x + 2; the add's two sides are the same tensor.
    let y = ((x.as_tensor() * x.as_tensor()).unwrap() + (x.as_tensor() + x.as_tensor()).unwrap())
        .unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(g.get(&x).unwrap()), vec![4.0, -2.0, 8.0]);
}

#[test]
fn a_strided_first_gradient_is_stored_contiguous_and_sums_correctly() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(
        &Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap(),
    )
    .unwrap();
    let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
    // x^T used through a transpose (a strided gradient), then x again directly.
    let a = (x.as_tensor().t().unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap();
    let b = (x.as_tensor() * 10.0).unwrap().sum_all().unwrap();
    let g = (a + b).unwrap().backward().unwrap();
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    assert_eq!(gx.dims(), &[2, 3]);
    // d/dx = w^T + 10
    assert_eq!(values(gx), vec![11.0, 13.0, 15.0, 12.0, 14.0, 16.0]);
}

#[test]
fn the_gradient_does_not_alias_what_later_ops_overwrite() {
    let dev = Device::Cpu;
    let x = Var::new(&[1f32, 2.0], &dev).unwrap();
    let y = (x.as_tensor() + 0.0).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(&x).unwrap().clone();
    // Updating the variable in place leaves the stored gradient as it was.
    x.set(&Tensor::new(&[7f32, 8.0], &dev).unwrap()).unwrap();
    assert_eq!(values(&gx), vec![1.0, 1.0]);
}
