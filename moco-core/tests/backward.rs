//! The vendored candle-core's backward pass (vendor/README.md): the first gradient of a tensor
//! is stored as computed instead of being added to zeros, and a matrix product computes no
//! gradient for an operand that records no graph. These check the cases those changes touch
//! against gradients worked out by hand.
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

#[test]
fn a_matmul_gives_gradients_to_the_operands_that_record_a_graph_only() {
    let dev = Device::Cpu;
    let a = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &dev).unwrap();
    let b = Tensor::new(&[[1f32, 0.0, 2.0], [0.0, 1.0, -1.0]], &dev).unwrap();
    let w = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
    // d/da sum((a @ b) * w) = w @ b^T; b is a constant: no gradient.
    let g = (a.as_tensor().matmul(&b).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(values(g.get(&a).unwrap()), vec![7.0, -1.0, 16.0, -1.0]);
    assert!(g.get(&b).is_none());
    // The constant on the left, a variable computed from on the right: d/dc = a^T @ w.
    let c = Var::new(&[[1f32, 0.0, 1.0], [2.0, 1.0, 0.0]], &dev).unwrap();
    let c2 = (c.as_tensor() * 1.0).unwrap();
    let fixed = a.as_tensor().detach();
    let g = (fixed.matmul(&c2).unwrap() * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(
        values(g.get(&c).unwrap()),
        vec![13.0, 17.0, 21.0, 18.0, 24.0, 30.0]
    );
    assert!(g.get(&fixed).is_none() && g.get(&a).is_none());
}
